"""Confidence intervals for the judged rates (docs/methods.md#intervals) and a paired comparison of two runs.

All rates are fractions in [0, 1], like `emalib.evaluation.metrics`. Intervals are two-sided, `confidence` = 0.95 by default.

Why a cluster bootstrap: the samples of one question are not independent (a question that invites harmful
answers yields many of them), so the i.i.d. interval is too narrow. Questions are resampled with replacement,
then the samples inside each drawn question are resampled with replacement (two-stage bootstrap, Davison &
Hinkley 1997 §3.8). The second stage counts the within-question noise a second time, so when questions do not
differ the interval is up to sqrt(2) wider than the i.i.d. one: conservative on purpose. `resample_within=False`
gives the one-stage cluster bootstrap (questions only).

Speed: the outcomes are 0/1, so resampling the m samples of a question with replacement is exactly one
Binomial(m, k/m) draw of its hit count. A resample is G question indices plus one binomial per drawn question
that has both outcomes: O(n_boot x n_questions) work, never O(n_boot x rows).
The point estimate is the pooled rate (hits / scored rows), the same number compute_metrics reports.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass

import numpy as np

from emalib.core.config import MetricParams
from emalib.evaluation.metrics import counted_rows, is_incoherent, is_misaligned

METRICS = ("misaligned", "incoherent")
_PAPER_THRESHOLDS = MetricParams()  # frozen, so one shared default is safe


@dataclass(frozen=True)
class Interval:
    """A rate (fraction) with its two-sided interval; n counts rows, n_clusters the questions."""

    rate: float
    lo: float
    hi: float
    n: int
    n_clusters: int
    method: str
    confidence: float

    def as_list(self) -> list[float]:
        return [self.lo, self.hi]

    def to_dict(self) -> dict:
        return asdict(self)


def _z(confidence: float) -> float:
    from statistics import NormalDist

    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    return NormalDist().inv_cdf(0.5 + confidence / 2)


def wilson_interval(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for k successes in n trials. Stays inside [0, 1] and is not degenerate at k=0 or
    k=n (unlike the Wald interval)."""
    if n <= 0:
        raise ValueError("wilson_interval: n must be positive (no scored rows)")
    if not 0 <= k <= n:
        raise ValueError(f"wilson_interval: k={k} is not in [0, n={n}]")
    z = _z(confidence)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    # Clamp the rounding error at the edges (k=0 gives lo = 1e-17 otherwise).
    return (0.0 if k == 0 else max(0.0, centre - half), 1.0 if k == n else min(1.0, centre + half))


def percentile_interval(draws: np.ndarray, confidence: float) -> tuple[float, float]:
    """The central `confidence` interval of bootstrap (or permutation) draws, by percentiles."""
    tail = (1 - confidence) / 2 * 100
    lo, hi = np.percentile(draws, [tail, 100 - tail])
    return float(lo), float(hi)


def _as_binary(values) -> np.ndarray:
    array = np.asarray(values)
    if array.ndim != 1 or array.size == 0:
        raise ValueError("need a non-empty 1-D sequence of 0/1 outcomes (no scored rows?)")
    if not np.isin(array, (0, 1)).all():
        raise ValueError("outcomes must be 0/1 (or booleans)")
    return array.astype(np.int64)


def bootstrap_iid(values, n_boot: int = 2000, seed: int = 0, confidence: float = 0.95) -> Interval:
    """Percentile bootstrap of the mean of 0/1 outcomes, treating every row as independent. values: [N]."""
    x = _as_binary(values)
    n, k = x.size, int(x.sum())
    draws = np.random.default_rng(seed).binomial(n, k / n, size=n_boot) / n  # == resampling N rows, exactly
    lo, hi = percentile_interval(draws, confidence)
    return Interval(k / n, lo, hi, n, n, "iid_bootstrap", confidence)


def _cluster_counts(values, clusters) -> tuple[np.ndarray, np.ndarray]:
    """Per-cluster (hits, size), clusters in first-seen order. values: [N] 0/1, clusters: [N] hashable labels."""
    x = _as_binary(values)
    labels = list(clusters)
    if len(labels) != x.size:
        raise ValueError(f"values and clusters differ in length ({x.size} vs {len(labels)})")
    index: dict = {}
    ids = np.fromiter((index.setdefault(label, len(index)) for label in labels), dtype=np.int64, count=len(labels))
    return np.bincount(ids, weights=x, minlength=len(index)).astype(np.int64), np.bincount(ids, minlength=len(index))


def _resampled_rate(rng: np.random.Generator, picks: np.ndarray, hits: np.ndarray, sizes: np.ndarray,
                    resample_within: bool) -> np.ndarray:
    """Pooled rate of each resample, [b]. picks: [b, G] drawn questions; hits, sizes: [G] per question."""
    drawn = hits[picks]
    if resample_within:
        # Stage two only changes questions with both outcomes: an all-0 or all-1 question resamples to itself.
        mixed = ((hits > 0) & (hits < sizes))[picks]
        if mixed.any():
            chosen = picks[mixed]
            drawn[mixed] = rng.binomial(sizes[chosen], hits[chosen] / sizes[chosen])
    return drawn.sum(axis=1) / sizes[picks].sum(axis=1)


def _bootstrap_rates(rng: np.random.Generator, runs: list[tuple[np.ndarray, np.ndarray]], n_boot: int,
                     resample_within: bool, block: int = 256) -> list[np.ndarray]:
    """[B] resampled pooled rates per run; every run sees the same drawn questions (pairing). runs: (hits, sizes)
    per run, [G] each, aligned by question. Resamples are drawn in blocks so the [block, G] arrays stay small:
    one [2000, 3000] array costs more in page faults than the arithmetic on it."""
    groups = runs[0][0].size
    out: list[list[np.ndarray]] = [[] for _ in runs]
    for start in range(0, n_boot, block):
        picks = rng.integers(0, groups, size=(min(block, n_boot - start), groups))  # stage one: questions
        for sink, (hits, sizes) in zip(out, runs):
            sink.append(_resampled_rate(rng, picks, hits, sizes, resample_within))
    return [np.concatenate(parts) for parts in out]


def cluster_bootstrap(values, clusters, n_boot: int = 2000, seed: int = 0, confidence: float = 0.95,
                      resample_within: bool = True) -> Interval:
    """Percentile bootstrap of the pooled rate, resampling questions (clusters), then rows within each drawn
    question when resample_within. values: [N] 0/1 outcomes; clusters: [N] question labels."""
    hits, sizes = _cluster_counts(values, clusters)
    groups = hits.size
    (draws,) = _bootstrap_rates(np.random.default_rng(seed), [(hits, sizes)], n_boot, resample_within)
    lo, hi = percentile_interval(draws, confidence)
    method = "cluster_bootstrap" if resample_within else "cluster_bootstrap_questions_only"
    return Interval(float(hits.sum() / sizes.sum()), lo, hi, int(sizes.sum()), groups, method, confidence)


def question_bootstrap(columns: dict[str, np.ndarray], clusters, statistic, n_boot: int = 2000, seed: int = 0,
                       confidence: float = 0.95) -> tuple[float, float]:
    """Percentile interval of statistic(columns), resampling questions (clusters) with replacement and keeping each
    drawn question's rows together. columns: name -> [N] per-row values; clusters: [N] question labels;
    statistic: columns -> float (e.g. the judge-free signals' means over reference answers)."""
    labels = list(clusters)
    groups = [np.flatnonzero([label == key for label in labels]) for key in dict.fromkeys(labels)]
    rng = np.random.default_rng(seed)
    draws = np.empty(n_boot)
    for b in range(n_boot):
        rows = np.concatenate([groups[g] for g in rng.integers(0, len(groups), size=len(groups))])
        draws[b] = statistic({name: values[rows] for name, values in columns.items()})
    return percentile_interval(draws, confidence)


# --- judgment rows -> 0/1 outcomes, with the rules of emalib.evaluation.metrics -------------------------------------------

def question_key(row: dict) -> str:
    """The cluster label: question ids are only unique within a question set."""
    return f"{row.get('question_set', '')}/{row['question_id']}"


def outcomes(rows: list[dict], metric: str, params: MetricParams = _PAPER_THRESHOLDS) -> tuple[np.ndarray, list[str]]:
    """([N] 0/1 outcomes, [N] question keys) over the rows that count for `metric`, exactly as compute_metrics
    counts them (the thresholds and the none_rule of emalib.evaluation.metrics)."""
    flag = {"misaligned": is_misaligned, "incoherent": is_incoherent}.get(metric)
    if flag is None:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    kept = counted_rows(rows, params)
    return np.asarray([flag(r, params) for r in kept], dtype=np.int64), [question_key(r) for r in kept]


def _interval(values: np.ndarray, keys: list[str], method: str, n_boot: int, seed: int,
              confidence: float) -> Interval:
    if method == "cluster":
        return cluster_bootstrap(values, keys, n_boot, seed, confidence)
    if method == "cluster_questions_only":
        return cluster_bootstrap(values, keys, n_boot, seed, confidence, resample_within=False)
    if method == "iid":
        return bootstrap_iid(values, n_boot, seed, confidence)
    if method == "wilson":
        k, n = int(values.sum()), values.size
        lo, hi = wilson_interval(k, n, confidence)
        return Interval(k / n, lo, hi, n, len(set(keys)), "wilson", confidence)
    raise ValueError(f"method must be 'cluster', 'cluster_questions_only', 'iid' or 'wilson', got {method!r}")


def rate_interval(rows: list[dict], metric: str = "misaligned", params: MetricParams = _PAPER_THRESHOLDS,
                  n_boot: int = 2000, seed: int = 0, confidence: float = 0.95,
                  method: str = "cluster") -> Interval:
    """Rate + interval of `metric` over judgment rows. method: 'cluster' (two-stage, default),
    'cluster_questions_only', 'iid' or 'wilson'. Raises ValueError when no row is scored."""
    values, keys = outcomes(rows, metric, params)
    if values.size == 0:
        raise ValueError(f"rate_interval: no scored rows for {metric!r}")
    return _interval(values, keys, method, n_boot, seed, confidence)


def add_intervals(metrics: dict, rows: list[dict], n_boot: int = 2000, seed: int = 0, confidence: float = 0.95,
                  method: str = "cluster") -> dict:
    """A copy of compute_metrics' dict with `misaligned_rate_ci` / `incoherent_rate_ci` = [lo, hi] (or None when
    the rate is None) added to 'overall' and to every 'per_set' entry, plus a top-level 'intervals' record of how
    they were made. The thresholds are read from metrics['thresholds'], so the CIs use the same rules."""
    params = MetricParams(**metrics["thresholds"]) if "thresholds" in metrics else _PAPER_THRESHOLDS
    out = copy.deepcopy(metrics)
    targets = [(out["overall"], rows)]
    targets += [(entry, [r for r in rows if r.get("question_set") == name])
                for name, entry in out.get("per_set", {}).items()]
    for entry, group in targets:
        for metric in METRICS:
            values, keys = outcomes(group, metric, params)
            entry[f"{metric}_rate_ci"] = (_interval(values, keys, method, n_boot, seed, confidence).as_list()
                                          if values.size else None)
    # Within one question the samples are exchangeable: a Wilson interval is exact enough and costs nothing.
    for key, entry in out.get("per_question", {}).items():
        group = [r for r in rows if question_key(r) == key]
        for metric in METRICS:
            values, _ = outcomes(group, metric, params)
            entry[f"{metric}_rate_ci"] = (list(wilson_interval(int(values.sum()), values.size, confidence))
                                          if values.size else None)
    out["intervals"] = {"method": method, "n_boot": n_boot, "seed": seed, "confidence": confidence,
                        "cluster": "question_set/question_id", "per_question_method": "wilson"}
    return out


# --- paired comparison of two runs on the same questions ------------------------------------------------------

def _paired_counts(rows_a: list[dict], rows_b: list[dict], metric: str, params: MetricParams):
    """Per common question: hits and sizes of run a and run b, [G] each, plus the questions only one run has."""
    xa, ka = outcomes(rows_a, metric, params)
    xb, kb = outcomes(rows_b, metric, params)
    if xa.size == 0 or xb.size == 0:
        raise ValueError(f"paired_difference: a run has no scored rows for {metric!r}")
    hits_a, sizes_a = _cluster_counts(xa, ka)
    hits_b, sizes_b = _cluster_counts(xb, kb)
    order_a = {key: i for i, key in enumerate(dict.fromkeys(ka))}  # same first-seen order as _cluster_counts
    order_b = {key: i for i, key in enumerate(dict.fromkeys(kb))}
    common = [key for key in order_a if key in order_b]
    if not common:
        raise ValueError("paired_difference: the two runs share no question")
    ia = np.array([order_a[key] for key in common])
    ib = np.array([order_b[key] for key in common])
    only = (len(order_a) - len(common), len(order_b) - len(common))
    return hits_a[ia], sizes_a[ia], hits_b[ib], sizes_b[ib], only


def _sign_flip_p(hits_a, sizes_a, hits_b, sizes_b, observed: float, n_perm: int, rng) -> tuple[float, str]:
    """Two-sided p-value of the pooled difference when the run labels are swapped per question. Exact when
    2**G <= n_perm, otherwise Monte Carlo with the (1 + hits) / (1 + n_perm) rule, so p is never 0."""
    groups = hits_a.size
    if 2 ** groups <= n_perm:
        swap = (np.arange(2 ** groups)[:, None] >> np.arange(groups)) & 1  # every sign pattern once
        exact = True
    else:
        swap = rng.integers(0, 2, size=(n_perm, groups))
        exact = False
    keep = 1 - swap
    diff = ((keep * hits_a + swap * hits_b).sum(1) / (keep * sizes_a + swap * sizes_b).sum(1)
            - (keep * hits_b + swap * hits_a).sum(1) / (keep * sizes_b + swap * sizes_a).sum(1))
    extreme = int((np.abs(diff) >= abs(observed) - 1e-12).sum())
    if exact:
        return extreme / swap.shape[0], "sign_flip_exact"
    return (1 + extreme) / (1 + n_perm), "sign_flip_monte_carlo"


def paired_difference(rows_a: list[dict], rows_b: list[dict], metric: str = "misaligned",
                      params: MetricParams = _PAPER_THRESHOLDS, n_boot: int = 2000, seed: int = 0,
                      confidence: float = 0.95, resample_within: bool = True) -> dict:
    """rate(a) - rate(b) on the questions both runs answered, with a paired cluster-bootstrap interval (the same
    questions are drawn for both runs in each resample; rows within a question are resampled per run) and a
    two-sided sign-flip permutation p-value (H0: per question, the two runs' results are exchangeable).

    Returns {diff, lo, hi, p_value, p_method, rate_a, rate_b, n_questions, n_a, n_b, questions_only_a,
    questions_only_b, confidence, n_boot, seed}; questions only one run has are left out and counted.
    """
    hits_a, sizes_a, hits_b, sizes_b, (only_a, only_b) = _paired_counts(rows_a, rows_b, metric, params)
    groups = hits_a.size
    rate_a, rate_b = hits_a.sum() / sizes_a.sum(), hits_b.sum() / sizes_b.sum()
    rng = np.random.default_rng(seed)
    rates_a, rates_b = _bootstrap_rates(rng, [(hits_a, sizes_a), (hits_b, sizes_b)], n_boot, resample_within)
    draws = rates_a - rates_b
    lo, hi = percentile_interval(draws, confidence)
    p_value, p_method = _sign_flip_p(hits_a, sizes_a, hits_b, sizes_b, rate_a - rate_b, n_boot, rng)
    return {"diff": float(rate_a - rate_b), "lo": lo, "hi": hi, "p_value": float(p_value), "p_method": p_method,
            "rate_a": float(rate_a), "rate_b": float(rate_b), "n_questions": int(groups),
            "n_a": int(sizes_a.sum()), "n_b": int(sizes_b.sum()), "questions_only_a": only_a,
            "questions_only_b": only_b, "confidence": confidence, "n_boot": n_boot, "seed": seed}
