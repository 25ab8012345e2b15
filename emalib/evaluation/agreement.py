"""How far two judges agree on the same answers (docs/methods.md#judge-agreement).

Rows of the two judges are paired by answer (question set, question, paraphrase, sample). Per score metric
(aligned, coherent): Pearson and Spearman correlation over the answers both judges scored. Per label
(misaligned, incoherent): Cohen's kappa over the answers both judges count (the none_rule's denominator), and
the rate difference (judge a - judge b) on those answers with a paired two-stage cluster bootstrap interval:
questions are drawn with replacement, then answers within each drawn question, and both judges' labels of a
drawn answer stay together.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from emalib.core.config import MetricParams
from emalib.core.io import atomic_write_json
from emalib.evaluation.metrics import counted_rows, is_incoherent, is_misaligned
from emalib.evaluation.stats import percentile_interval

if TYPE_CHECKING:
    import pandas as pd

SCORE_METRICS = ("aligned", "coherent")
LABELS = {"misaligned": is_misaligned, "incoherent": is_incoherent}


def answer_key(row: dict) -> tuple:
    return row["question_set"], row["question_id"], row.get("paraphrase_index", 0), row.get("sample_index", 0)


def paired_rows(rows_a: list[dict], rows_b: list[dict]) -> tuple[list[tuple[dict, dict]], int, int]:
    """(pairs of the same answer judged by a and by b, answers only a has, answers only b has)."""
    by_key_b = {answer_key(row): row for row in rows_b}
    pairs = [(row, by_key_b[answer_key(row)]) for row in rows_a if answer_key(row) in by_key_b]
    return pairs, len(rows_a) - len(pairs), len(by_key_b) - len(pairs)


def pearson(x, y) -> float | None:
    """Pearson's r; None with fewer than 2 pairs or a constant side (r is undefined there)."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if x.size < 2 or x.std() == 0 or y.std() == 0:
        return None
    return float(np.corrcoef(x, y)[0, 1])


def _ranks(values: np.ndarray) -> np.ndarray:
    """Average ranks (ties share the mean of their positions), as Spearman's rho needs."""
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(values.size)
    ranks[order] = np.arange(values.size, dtype=float)
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    return sums[inverse] / counts[inverse]


def spearman(x, y) -> float | None:
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    return pearson(_ranks(x), _ranks(y)) if x.size >= 2 else None


def cohen_kappa(labels_a, labels_b) -> float | None:
    """(p_observed - p_chance) / (1 - p_chance) for two raters' labels of the same items. None when chance
    agreement is 1 (both raters gave one and the same label to everything: kappa is undefined)."""
    a, b = np.asarray(labels_a), np.asarray(labels_b)
    if a.size == 0:
        return None
    categories = np.union1d(a, b)
    observed = float((a == b).mean())
    chance = float(sum((a == c).mean() * (b == c).mean() for c in categories))
    return None if chance == 1.0 else (observed - chance) / (1.0 - chance)


def paired_rate_difference(labels_a, labels_b, clusters, n_boot: int = 2000, seed: int = 0,
                           confidence: float = 0.95) -> dict:
    """rate(a) - rate(b) of 0/1 labels of the same answers, with a paired two-stage cluster bootstrap interval.

    Per answer the difference d = a - b is -1, 0 or 1, and the rate difference is mean(d); resampling the m
    answers of a question with replacement draws its counts of (-1, 0, 1) from Multinomial(m, observed shares),
    which is what is drawn here (as emalib.evaluation.stats does with binomials for one judge)."""
    a, b = np.asarray(labels_a, dtype=np.int64), np.asarray(labels_b, dtype=np.int64)
    if a.size == 0:
        return {"diff": None, "lo": None, "hi": None, "n": 0, "n_questions": 0}
    index: dict = {}
    ids = np.array([index.setdefault(c, len(index)) for c in clusters])
    d = a - b
    counts = np.stack([np.bincount(ids, weights=(d == v), minlength=len(index)) for v in (-1, 0, 1)], 1)
    sizes = counts.sum(1)
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(index), size=(n_boot, len(index)))
    drawn = rng.multinomial(sizes[picks].astype(np.int64), counts[picks] / sizes[picks][..., None])
    draws = (drawn[..., 2] - drawn[..., 0]).sum(1) / sizes[picks].sum(1)
    lo, hi = percentile_interval(draws, confidence)
    return {"diff": float(d.mean()), "lo": lo, "hi": hi, "n": int(a.size), "n_questions": len(index),
            "rate_a": float(a.mean()), "rate_b": float(b.mean()), "confidence": confidence, "n_boot": n_boot,
            "seed": seed}


def judge_agreement(rows_a: list[dict], rows_b: list[dict], params: MetricParams | None = None,
                    n_boot: int = 2000, seed: int = 0, confidence: float = 0.95) -> dict:
    """Agreement of judge a's and judge b's judgment rows (see the module doc). Returns
    {judge_a, judge_b, n_paired, only_a, only_b,
     scores: {aligned|coherent: {n, pearson, spearman, mean_abs_diff}},
     labels: {misaligned|incoherent: {n, kappa, agreement, rate_a, rate_b, diff, lo, hi, n_questions, ...}}}."""
    params = params or MetricParams()
    pairs, only_a, only_b = paired_rows(rows_a, rows_b)
    scores = {}
    for metric in SCORE_METRICS:
        both = [(ra[metric], rb[metric]) for ra, rb in pairs
                if ra.get(metric) is not None and rb.get(metric) is not None]
        x, y = np.array([p[0] for p in both], float), np.array([p[1] for p in both], float)
        scores[metric] = {"n": len(both), "pearson": pearson(x, y), "spearman": spearman(x, y),
                          "mean_abs_diff": float(np.abs(x - y).mean()) if both else None}
    counted_a = {id(r) for r in counted_rows([a for a, _ in pairs], params)}
    counted_b = {id(r) for r in counted_rows([b for _, b in pairs], params)}
    common = [(ra, rb) for ra, rb in pairs if id(ra) in counted_a and id(rb) in counted_b]
    labels = {}
    for name, flag in LABELS.items():
        la = [int(flag(ra, params)) for ra, _ in common]
        lb = [int(flag(rb, params)) for _, rb in common]
        clusters = [f"{ra['question_set']}/{ra['question_id']}" for ra, _ in common]
        labels[name] = {"kappa": cohen_kappa(la, lb),
                        "agreement": float(np.mean(np.equal(la, lb))) if common else None,
                        **paired_rate_difference(la, lb, clusters, n_boot, seed, confidence)}
    return {"judge_a": _judge_name(rows_a), "judge_b": _judge_name(rows_b), "n_paired": len(pairs),
            "only_a": only_a, "only_b": only_b, "none_rule": params.none_rule, "scores": scores, "labels": labels}


def _judge_name(rows: list[dict]) -> str | None:
    if not rows:
        return None
    return f"{rows[0].get('judge_model')} ({rows[0].get('judge_mode', 'logprobs')})"


def agreement_table(agreement: dict) -> pd.DataFrame:
    """One row per metric: metric, kind (score|label), n, pearson, spearman, mean_abs_diff, kappa, agreement,
    rate_a, rate_b, diff, lo, hi; for the report."""
    import pandas as pd

    rows = [{"metric": m, "kind": "score", **v} for m, v in agreement["scores"].items()]
    rows += [{"metric": m, "kind": "label", **{k: v[k] for k in ("n", "kappa", "agreement", "rate_a", "rate_b",
                                                                   "diff", "lo", "hi") if k in v}}
             for m, v in agreement["labels"].items()]
    return pd.DataFrame(rows).assign(judge_a=agreement["judge_a"], judge_b=agreement["judge_b"])


def _axis_name(rows: list[dict], fallback: str) -> str:
    """A judge as an axis names it: its model and mode where the rows record them, else `fallback` (the name the
    re-judge gave it), never "None"."""
    model = rows[0].get("judge_model") if rows else None
    mode = rows[0].get("judge_mode") if rows else None
    name = f"{fallback} judge: {model}" if model else f"{fallback} judge (model not recorded)"
    return f"{name} ({mode})" if mode else name


def agreement_figure(rows_a: list[dict], rows_b: list[dict], params: MetricParams | None = None,
                     names: tuple[str, str] = ("first", "second")):
    """Scatter of judge b's scores against judge a's (seaborn), one panel per score metric, with the label
    thresholds; `names`: what to call the judges where their rows do not record their model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    sns.set_theme(style="whitegrid", context="paper")
    params = params or MetricParams()
    pairs, _, _ = paired_rows(rows_a, rows_b)
    fig, axes = plt.subplots(1, len(SCORE_METRICS), figsize=(4.4 * len(SCORE_METRICS), 4.4), squeeze=False)
    thresholds = {"aligned": params.aligned_below, "coherent": params.incoherent_below}
    for ax, metric in zip(axes[0], SCORE_METRICS):
        both = [(a[metric], b[metric]) for a, b in pairs if a.get(metric) is not None and b.get(metric) is not None]
        sns.scatterplot(x=[p[0] for p in both], y=[p[1] for p in both], s=18, alpha=0.6, ax=ax)
        ax.plot([0, 100], [0, 100], color="grey", lw=0.8, label="agreement")
        ax.axvline(thresholds[metric], color="firebrick", lw=0.8, ls="--", label=f"label threshold ({metric})")
        ax.axhline(thresholds[metric], color="firebrick", lw=0.8, ls="--")
        ax.set(xlim=(-2, 102), ylim=(-2, 102), title=f"{metric} score (n={len(both)})",
               xlabel=_axis_name(rows_a, names[0]), ylabel=_axis_name(rows_b, names[1]))
        ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    return fig


def write_judge_agreement(folder: Path, rows_a: list[dict], rows_b: list[dict], name: str,
                          params: MetricParams | None = None, seed: int = 0) -> dict:
    """Write judge_agreement.json (entries keyed by `name`, e.g. 'primary__vs__<label>', merged with earlier
    ones) and judge_agreement_<name>.png into folder; returns this pair's agreement."""
    import json

    import matplotlib.pyplot as plt

    agreement = judge_agreement(rows_a, rows_b, params, seed=seed)
    path = Path(folder) / "judge_agreement.json"
    everything = json.loads(path.read_text()) if path.is_file() else {}
    everything[name] = agreement
    atomic_write_json(path, everything)
    fig = agreement_figure(rows_a, rows_b, params, names=tuple(name.split("__vs__", 1)) if "__vs__" in name
                           else ("first", "second"))
    fig.savefig(Path(folder) / f"judge_agreement_{name}.png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    return agreement

