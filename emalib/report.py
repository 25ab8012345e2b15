"""Tables and figures from the metrics.json files of a study's runs."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from emalib.io import atomic_write_text

COLUMNS = ("misaligned_rate", "incoherent_rate", "n", "n_scored", "n_aligned_none", "n_coherent_none",
           "mean_aligned", "mean_coherent")


def collect_metrics(study_dir: str | Path) -> pd.DataFrame:
    """One row per (run, question set), plus an 'all' row per run, from results/<study>/*/metrics.json."""
    rows = []
    for path in sorted(Path(study_dir).glob("*/metrics.json")):
        metrics = json.loads(path.read_text())
        run = path.parent.name
        for name, rates in [("all", metrics["overall"]), *metrics["per_set"].items()]:
            rows.append({"run": run, "question_set": name, **{c: rates.get(c) for c in COLUMNS}})
    return pd.DataFrame(rows, columns=["run", "question_set", *COLUMNS])


def _as_percent(frame: pd.DataFrame) -> pd.DataFrame:
    shown = frame.copy()
    for column in ("misaligned_rate", "incoherent_rate"):
        shown[column] = shown[column].map(lambda v: "n/a" if v is None or pd.isna(v) else f"{100 * v:.2f}")
    return shown.rename(columns={"misaligned_rate": "misaligned %", "incoherent_rate": "incoherent %"})


def write_table(frame: pd.DataFrame, tables_dir: str | Path, name: str) -> dict[str, Path]:
    tables_dir = Path(tables_dir)
    csv_path = atomic_write_text(tables_dir / f"{name}.csv", frame.to_csv(index=False))
    md_path = atomic_write_text(tables_dir / f"{name}.md", _as_percent(frame).to_markdown(index=False) + "\n")
    return {"csv": csv_path, "md": md_path}


def plot_rates(frame: pd.DataFrame, figures_dir: str | Path, name: str, title: str = "") -> Path:
    """Bar chart of misaligned and incoherent % per run (all question sets together)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    overall = frame[frame["question_set"] == "all"]
    long = overall.melt(id_vars="run", value_vars=["misaligned_rate", "incoherent_rate"], var_name="metric",
                        value_name="rate").dropna(subset=["rate"])
    long["rate"] = 100 * long["rate"].astype(float)
    long["metric"] = long["metric"].map({"misaligned_rate": "misaligned", "incoherent_rate": "incoherent"})
    figure, axis = plt.subplots(figsize=(6, 4))
    sns.barplot(data=long, x="run", y="rate", hue="metric", ax=axis)
    axis.set_ylabel("% of judged answers")
    axis.set_xlabel("")
    axis.set_title(title)
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
    frame = collect_metrics(study_dir)
    if frame.empty:
        raise FileNotFoundError(f"{study_dir}: no */metrics.json to report")
    paths = write_table(frame, study_dir / "tables", name)
    paths["png"] = plot_rates(frame, study_dir / "figures", name, title=f"{name}: judged answers")
    return paths
