"""Tables as CSV (the numbers), Markdown and LaTeX (what a reader sees); figures as PNG and PDF. Every file is written
to a temporary name and renamed, so an interrupted report never leaves half a table."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from emalib.core.io import atomic_write_text, save_figure  # noqa: F401 (the figure writer lives in core.io)

# LaTeX for the characters the tables use (booktabs for the rules pandas writes; amssymb for the marks).
LATEX_SYMBOLS = {"✓": r"\checkmark{}", "∼": r"$\sim$", "✗": r"$\times$", "†": r"$^\dagger$", "Δ": r"$\Delta$",
                 "λ": r"$\lambda$", "α": r"$\alpha$", "τ": r"$\tau$", "−": "-"}


LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
                 "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def latex_escape(text: str) -> str:
    return "".join(LATEX_SPECIAL.get(c, c) for c in text)


def to_latex(shown: pd.DataFrame, caption: str = "") -> str:
    # pandas escapes the cells but not the caption (an unescaped % would comment out the rest of its line).
    text = shown.to_latex(index=False, escape=True, caption=latex_escape(caption) or None, na_rep="")
    for symbol, latex in LATEX_SYMBOLS.items():
        text = text.replace(symbol, latex)
    return text


def write_table(numbers: pd.DataFrame, shown: pd.DataFrame, folder: str | Path, name: str,
                caption: str = "") -> dict[str, Path]:
    """<name>.csv from `numbers` (plain values, one column each), <name>.md and <name>.tex from `shown`."""
    folder = Path(folder)
    markdown = (f"{caption}\n\n" if caption else "") + shown.to_markdown(index=False) + "\n"
    return {"csv": atomic_write_text(folder / f"{name}.csv", numbers.to_csv(index=False)),
            "md": atomic_write_text(folder / f"{name}.md", markdown),
            "tex": atomic_write_text(folder / f"{name}.tex", to_latex(shown, caption))}


def percent(value) -> str:
    return "" if value is None or pd.isna(value) else f"{100 * value:.2f}"


def percent_with_interval(value, lo, hi) -> str:
    if value is None or pd.isna(value):
        return "n/a"
    if lo is None or hi is None or pd.isna(lo) or pd.isna(hi):
        return f"{100 * value:.2f}"
    return f"{100 * value:.2f} [{100 * lo:.2f}, {100 * hi:.2f}]"
