"""Every defense a study ran on one EM domain, side by side (docs/methods.md#the-defense-comparison): general and
in-domain misalignment, EM-F1, general incoherence, the judge-free signals (log-likelihood gap, KL to the base),
benign-task accuracy, and the step time and peak memory of training relative to plain SFT, each with its 95 %
interval, and the published number beside it where one exists.

The rates and signals come from the report's cells; EM-F1 from each run's metrics.json; step time and memory from
the train step's record in each run's manifest.json (emalib/training/step_cost.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from emalib.core.io import read_json_object
from emalib.reporting import published
from emalib.reporting.frame import METHODS, NOT_RUN, method_label

# metric -> (column title, unit): the rates are percent; EM-F1 is a 0-100 score; the judge-free signals (what a
# CPU-scale study can read when its judge is a toy) are nats per token; costs are ratios to plain SFT.
METRICS = {"general_misaligned": ("general EM %", "%"), "in_domain_misaligned": ("in-domain EM %", "%"),
           "em_f1": ("EM-F1", "score"), "general_incoherent": ("general incoh. %", "%"),
           "loglik_gap": ("log-lik. gap (judge-free)", "nats"), "kl_to_base": ("KL to base (judge-free)", "nats"),
           "step_time": ("step time ×SFT", "ratio"), "peak_memory": ("peak memory ×SFT", "ratio")}
SIGNALS = ("loglik_gap", "kl_to_base")
N_BOOT = 2000


def compared_domains(cells: pd.DataFrame, model: str) -> list[str]:
    """The EM domains on which the study ran plain SFT and at least two defenses: where a comparison says something."""
    em = cells[(cells["model"] == model) & cells["task"].isna()]
    domains = []
    for domain, rows in em.groupby("domain"):
        defenses = set(rows["method"]) - {"aligned", "none"}
        if "none" in set(rows["method"]) and len(defenses) >= 2:
            domains.append(domain)
    return sorted(domains)


def _order(method: str) -> int:
    order = list(METHODS)
    return order.index(method) if method in order else len(order)


def _train_record(run_dir) -> dict:
    path = Path(str(run_dir)) / "manifest.json" if run_dir else None
    if path is None or not path.is_file():
        return {}
    return read_json_object(path).get("train") or {}


def _overall(run_dir) -> dict:
    path = Path(str(run_dir)) / "metrics.json" if run_dir else None
    if path is None or not path.is_file():
        return {}
    return read_json_object(path).get("overall") or {}


def _timed_steps(record: dict) -> np.ndarray:
    """Each step's seconds, without the first when there are more than two (it carries the warm-up: allocations,
    kernel selection), so a short run is not dominated by it."""
    seconds = np.asarray(record.get("step_seconds") or [], dtype=float)
    return seconds[1:] if seconds.size > 2 else seconds


def ratio_of_means(mine: np.ndarray, base: np.ndarray, seed: int = 0) -> tuple[float | None, float | None,
                                                                                float | None]:
    """mean(mine) / mean(base) with a 95 % percentile interval from resampling each run's steps with replacement
    (both runs' step-to-step noise; no interval from a single step of either)."""
    if mine.size == 0 or base.size == 0 or base.mean() <= 0:
        return None, None, None
    value = float(mine.mean() / base.mean())
    if mine.size < 2 or base.size < 2:
        return value, None, None
    rng = np.random.default_rng(seed)
    draws = (rng.choice(mine, (N_BOOT, mine.size)).mean(axis=1)
             / rng.choice(base, (N_BOOT, base.size)).mean(axis=1))
    lo, hi = np.percentile(draws, [2.5, 97.5])
    return value, float(lo), float(hi)


def _number(value) -> float | None:
    return None if value is None or pd.isna(value) else float(value)


def _percent(value) -> float | None:
    number = _number(value)
    return None if number is None else 100 * number


def comparison_numbers(cells: pd.DataFrame, model: str, domain: str) -> pd.DataFrame:
    """One row per (run, metric): value, lo, hi (percent for rates, 0-100 for EM-F1, ratios for costs), status, and
    the published value with its source where the paper gives one for this model, domain, method and strength."""
    em = cells[(cells["model"] == model) & (cells["domain"] == domain) & cells["task"].isna()]
    runs = em.assign(_order=em["method"].map(_order)).sort_values(["_order", "strength", "seed"], na_position="first")
    sft = runs[runs["method"] == "none"]
    sft_record = _train_record(sft.iloc[0]["run_dir"]) if not sft.empty else {}
    tasks = sorted(set(cells.loc[(cells["model"] == model) & cells["task"].notna(), "task"]))
    rows = []
    for _, run in runs.iterrows():
        key = {"model": model, "domain": domain, "method": run["method"], "strength": run["strength"],
               "seed": run["seed"], "node": run["node"], "label": method_label(run["method"], run["strength"])}
        overall = _overall(run["run_dir"])
        record = _train_record(run["run_dir"])
        values = {metric: (_percent(run[metric]), _percent(run[f"{metric}_lo"]), _percent(run[f"{metric}_hi"]))
                  for metric in ("general_misaligned", "in_domain_misaligned", "general_incoherent")}
        ci = overall.get("em_f1_ci") or (None, None)
        values["em_f1"] = (overall.get("em_f1"), ci[0], ci[1])
        for signal in SIGNALS:  # cells made before the signals had intervals lack the _lo/_hi columns
            values[signal] = tuple(_number(run.get(f"{signal}{end}")) for end in ("", "_lo", "_hi"))
        trained = run["method"] != "aligned"
        values["step_time"] = ratio_of_means(_timed_steps(record), _timed_steps(sft_record)) if trained \
            else (None, None, None)
        memory = record.get("peak_memory_gib"), sft_record.get("peak_memory_gib")
        same_kind = record.get("peak_memory_kind") == sft_record.get("peak_memory_kind")
        values["peak_memory"] = (memory[0] / memory[1] if trained and same_kind and memory[0] and memory[1]
                                 else None, None, None)  # one peak per run: no interval
        for task in tasks:
            found = cells[(cells["model"] == model) & (cells["task"] == task) & (cells["method"] == run["method"])
                          & _same_strength(cells["strength"], run["strength"])]
            if found.empty:
                values[f"task:{task}"] = None
                continue
            first = found.iloc[0]
            values[f"task:{task}"] = (_percent(first["task_accuracy"]), _percent(first["task_accuracy_lo"]),
                                      _percent(first["task_accuracy_hi"]))
        for metric, triple in values.items():
            paper = published.em_number(model, domain, run["method"], run["strength"], metric) \
                if metric in published.EM_METRICS else None
            if metric.startswith("task:"):
                paper = published.task_number(model, metric[5:], run["method"], run["strength"])
            value, lo, hi = triple if triple is not None else (None, None, None)
            rows.append({**key, "metric": metric, "value": value, "lo": lo, "hi": hi,
                         "status": "done" if triple is not None else NOT_RUN,
                         "paper": None if paper is None else paper["value"],
                         "paper_version": None if paper is None else paper["version"],
                         "paper_source": None if paper is None else paper["source"]})
    return pd.DataFrame(rows, columns=["model", "domain", "method", "strength", "seed", "node", "label", "metric",
                                       "value", "lo", "hi", "status", "paper", "paper_version", "paper_source"])


def _same_strength(strengths: pd.Series, strength) -> pd.Series:
    if strength is None or pd.isna(strength):
        return strengths.isna()
    return (strengths.astype(float) - float(strength)).abs() < 1e-12


def metric_title(metric: str) -> str:
    if metric.startswith("task:"):
        return f"{metric[5:]} acc. %"
    return METRICS[metric][0]


def _cell(row: pd.Series) -> str:
    if row["status"] == NOT_RUN:
        return NOT_RUN
    if row["value"] is None or pd.isna(row["value"]):
        return "n/a"
    digits = 3 if row["metric"] in ("step_time", "peak_memory", *SIGNALS) else 2
    text = f"{row['value']:.{digits}f}"
    if row["lo"] is not None and not pd.isna(row["lo"]):
        text += f" [{row['lo']:.{digits}f}, {row['hi']:.{digits}f}]"
    return text


def comparison_shown(numbers: pd.DataFrame) -> pd.DataFrame:
    """What a reader sees: one row per run, each metric with its interval and, where published, 'paper: x'."""
    shown = []
    for _, rows in numbers.groupby("node", sort=False):
        display = {"method": rows.iloc[0]["label"]}
        for _, row in rows.iterrows():
            title = metric_title(row["metric"])
            display[title] = _cell(row)
            if row["paper"] is not None and not pd.isna(row["paper"]):
                display[f"paper: {title}"] = f"{row['paper']:.2f}"
        shown.append(display)
    shown = pd.DataFrame(shown).fillna("")
    titles = [metric_title(metric) for metric in dict.fromkeys(numbers["metric"])]
    order = ["method"] + [c for t in titles for c in (t, f"paper: {t}") if c in shown.columns]  # paper beside ours
    return shown[order]
