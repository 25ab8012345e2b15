"""Tables and figures from the metrics.json files of a study's runs."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from emalib.errors import DataError
from emalib.io import atomic_write_text, read_json_object

COLUMNS = ("misaligned_rate", "misaligned_rate_ci", "incoherent_rate", "incoherent_rate_ci", "n", "n_scored",
           "n_dropped", "n_aligned_none", "n_coherent_none", "mean_aligned", "mean_coherent")
# How each run's rates were made: the rule for rows with a None score, and whether the question files' system
# prompts were sent (the published evaluation sent none).
PROTOCOL = ("none_rule", "system_prompt")
SIGNALS = ("loglik_gap", "kl_to_base")


def collect_metrics(study_dir: str | Path) -> pd.DataFrame:
    """One row per (run, question set), plus an 'all' row per run, from results/<study>/*/metrics.json."""
    rows = []
    for path in sorted(Path(study_dir).glob("*/metrics.json")):
        metrics = read_json_object(path, required=("overall", "per_set"))
        run = path.parent.name
        signals = metrics.get("judge_free") or {}
        task_file = path.parent / "task_metrics.json"
        task = read_json_object(task_file) if task_file.is_file() else {}
        protocol = {"none_rule": (metrics.get("thresholds") or {}).get("none_rule", "unrecorded"),
                    "system_prompt": _system_prompt_label(metrics)}
        for name, rates in [("all", metrics["overall"]), *metrics["per_set"].items()]:
            rows.append({"run": run, "question_set": name, **{c: rates.get(c) for c in COLUMNS},
                         **{s: signals.get(s) if name == "all" else None for s in SIGNALS},
                         "task_accuracy": task.get("accuracy") if name == "all" else None, **protocol})
    return pd.DataFrame(rows, columns=["run", "question_set", *COLUMNS, *SIGNALS, "task_accuracy", *PROTOCOL])


def _system_prompt_label(metrics: dict) -> str:
    used = (metrics.get("generation") or {}).get("use_system_prompt")
    return "unrecorded" if used is None else ("sent" if used else "not sent")


def _percent_with_interval(rate, interval) -> str:
    if rate is None or pd.isna(rate):
        return "n/a"
    if isinstance(interval, (list, tuple)) and len(interval) == 2 and interval[0] is not None:
        return f"{100 * rate:.2f} [{100 * interval[0]:.2f}, {100 * interval[1]:.2f}]"
    return f"{100 * rate:.2f}"


def _as_percent(frame: pd.DataFrame) -> pd.DataFrame:
    shown = frame.copy()
    for column in ("misaligned_rate", "incoherent_rate"):
        shown[column] = [_percent_with_interval(rate, interval)
                         for rate, interval in zip(frame[column], frame[f"{column}_ci"])]
    shown = shown.drop(columns=["misaligned_rate_ci", "incoherent_rate_ci"])
    return shown.rename(columns={"misaligned_rate": "misaligned % [95% CI]", "incoherent_rate": "incoherent % [95% CI]"})


def write_table(frame: pd.DataFrame, tables_dir: str | Path, name: str) -> dict[str, Path]:
    tables_dir = Path(tables_dir)
    csv_frame = frame.copy()
    for column in ("misaligned_rate_ci", "incoherent_rate_ci"):  # two plain columns each in CSV
        csv_frame[f"{column}_lo"] = [c[0] if isinstance(c, (list, tuple)) else None for c in frame[column]]
        csv_frame[f"{column}_hi"] = [c[1] if isinstance(c, (list, tuple)) else None for c in frame[column]]
    csv_frame = csv_frame.drop(columns=["misaligned_rate_ci", "incoherent_rate_ci"])
    csv_path = atomic_write_text(tables_dir / f"{name}.csv", csv_frame.to_csv(index=False))
    md_path = atomic_write_text(tables_dir / f"{name}.md", _as_percent(frame).to_markdown(index=False) + "\n")
    return {"csv": csv_path, "md": md_path}


def plot_rates(frame: pd.DataFrame, figures_dir: str | Path, name: str, title: str = "") -> Path:
    """Misaligned and incoherent % per run with 95 % intervals (all question sets together), and beside it the
    judge-free log-likelihood gap (misaligned minus aligned reference answers) per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    overall = frame[frame["question_set"] == "all"].reset_index(drop=True)
    long = []
    for _, row in overall.iterrows():
        for metric in ("misaligned", "incoherent"):
            rate, interval = row[f"{metric}_rate"], row[f"{metric}_rate_ci"]
            if rate is None or pd.isna(rate):
                continue
            lo, hi = interval if isinstance(interval, (list, tuple)) else (rate, rate)
            long.append({"run": row["run"], "metric": metric, "rate": 100 * rate, "lo": 100 * lo, "hi": 100 * hi})
    long = pd.DataFrame(long, columns=["run", "metric", "rate", "lo", "hi"])
    figure, (rates_axis, gap_axis) = plt.subplots(1, 2, figsize=(10, 4), gridspec_kw={"width_ratios": [2, 1]})
    if not long.empty:
        sns.barplot(data=long, x="run", y="rate", hue="metric", ax=rates_axis, errorbar=None)
        runs = list(dict.fromkeys(long["run"]))
        metrics = list(dict.fromkeys(long["metric"]))
        for container, metric in zip(rates_axis.containers, metrics):
            subset = long[long["metric"] == metric].set_index("run")
            for bar, run in zip(container, [r for r in runs if r in subset.index]):
                entry = subset.loc[run]
                center = bar.get_x() + bar.get_width() / 2
                rates_axis.errorbar(center, entry["rate"], yerr=[[entry["rate"] - entry["lo"]], [entry["hi"] - entry["rate"]]],
                                    color="black", capsize=3, linewidth=1)
    rates_axis.set_ylabel("% of judged answers (95 % CI)")
    rates_axis.set_xlabel("")
    rates_axis.set_title(title)
    gaps = overall.dropna(subset=["loglik_gap"])
    if not gaps.empty:
        sns.barplot(data=gaps, x="run", y="loglik_gap", ax=gap_axis, color="gray")
    gap_axis.set_ylabel("log-lik. gap, misaligned - aligned (nats/token)")
    gap_axis.set_xlabel("")
    gap_axis.set_title("judge-free signal")
    figure.tight_layout()
    path = Path(figures_dir) / f"{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    figure.savefig(tmp, dpi=120)
    plt.close(figure)
    tmp.replace(path)
    return path


def report_study(study_dir: str | Path, name: str | None = None) -> dict[str, Path]:
    """Write results/<study>/tables/<name>.{csv,md} and results/<study>/figures/<name>.png."""
    study_dir = Path(study_dir)
    name = name or study_dir.name
    if not study_dir.is_dir():
        raise DataError(f"{study_dir}: no such study folder")
    frame = collect_metrics(study_dir)
    if frame.empty:  # checked before the tables/ and figures/ folders are made
        raise DataError(f"{study_dir}: no finished runs (no */metrics.json)")
    paths = write_table(frame, study_dir / "tables", name)
    paths["png"] = plot_rates(frame, study_dir / "figures", name, title=f"{name}: judged answers")
    return paths
