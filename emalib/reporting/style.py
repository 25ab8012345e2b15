"""The one look of every report figure: matplotlib without a display (Agg) and seaborn's paper theme."""

from __future__ import annotations


def pyplot():
    """(pyplot, seaborn), themed; imported on first use so that reading tables never loads matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    sns.set_theme(style="whitegrid", context="paper")
    return plt, sns
