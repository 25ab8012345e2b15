"""Looking at a study's answers (notebooks/explore.ipynb): its runs, per-question rates side by side, the answers
with their judge scores, the paired comparison of two runs, the judge-free signals. Everything reads the run folders
under results/<study>; nothing here calls a model or a judge."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from emalib.core.config import MetricParams
from emalib.core.errors import DataError
from emalib.core.io import read_jsonl
from emalib.evaluation.metrics import is_incoherent, is_misaligned
from emalib.reporting.frame import method_label, results_frame
from emalib.runs.rescore import run_params
from emalib.runs.run_metrics import has_metrics, read_run_metrics
from emalib.studies.index import read_index


def runs(study_dir: str | Path) -> pd.DataFrame:
    """One row per evaluated run: its name, what it is in the paper's terms, overall rates and signals."""
    study_dir = _folder(study_dir)
    frame = results_frame(read_index(study_dir), study_dir)
    overall = frame[frame["scope"] == "all"].copy()
    overall["label"] = [method_label(m, s) for m, s in zip(overall["method"], overall["strength"])]
    return overall[["node", "kind", "model", "domain", "task", "label", "misaligned_rate", "misaligned_rate_ci_lo",
                    "misaligned_rate_ci_hi", "incoherent_rate", "loglik_gap", "kl_to_base", "task_accuracy",
                    "task_accuracy_lo", "task_accuracy_hi"]] \
        .rename(columns={"node": "run"}).reset_index(drop=True)


def _folder(study_dir: str | Path) -> Path:
    study_dir = Path(study_dir)
    if not study_dir.is_dir():
        raise DataError(f"{study_dir}: no such study folder")
    return study_dir


def _run_dir(study_dir: str | Path, run: str) -> Path:
    run_dir = _folder(study_dir) / run
    if not has_metrics(run_dir):
        raise DataError(f"{run_dir}: no evaluated run of that name (no metrics.json)")
    return run_dir


def per_question(study_dir: str | Path, run_names: list[str], metric: str = "misaligned") -> pd.DataFrame:
    """Per question (question set / id), each run's rate with its Wilson 95 % interval, side by side (%)."""
    columns = {}
    for run in run_names:
        for question, rates in read_run_metrics(_run_dir(study_dir, run)).per_question.items():
            lo, hi = rates.get(f"{metric}_rate_ci") or (None, None)
            columns.setdefault(question, {}).update({
                (run, "%"): _percent(rates.get(f"{metric}_rate")), (run, "lo"): _percent(lo),
                (run, "hi"): _percent(hi), (run, "n"): rates.get("n_scored")})
    table = pd.DataFrame.from_dict(columns, orient="index")
    if not table.empty:
        table.columns = pd.MultiIndex.from_tuples(table.columns, names=["run", ""])
    return table.sort_index()


def _thresholds(run_dir: Path) -> MetricParams:
    """The run's own thresholds. Read through rescore.run_params, which also reads a base evaluation's folder (its
    params.yaml records only what the evaluation depends on, without study or run names)."""
    return run_params(run_dir).metrics if (run_dir / "params.yaml").is_file() else MetricParams()


def _percent(value):
    return None if value is None else 100 * value


def answers(study_dir: str | Path, run: str, misaligned_only: bool = False, incoherent_only: bool = False,
            question: str | None = None, contains: str | None = None) -> pd.DataFrame:
    """The run's judged answers with their scores and labels (under the run's own thresholds), filtered: only
    misaligned or incoherent ones, one question (its id, or 'set/id'), or answers containing a text."""
    run_dir = _run_dir(study_dir, run)
    thresholds = _thresholds(run_dir)
    rows = read_jsonl(run_dir / "judgments.jsonl")
    table = pd.DataFrame([{
        "question_set": r.get("question_set"), "question_id": r.get("question_id"),
        "sample": r.get("sample_index"), "question": r.get("question"), "answer": r.get("answer"),
        "aligned": r.get("aligned"), "coherent": r.get("coherent"),
        "misaligned": is_misaligned(r, thresholds), "incoherent": is_incoherent(r, thresholds)} for r in rows])
    if table.empty:
        return table
    if misaligned_only:
        table = table[table["misaligned"]]
    if incoherent_only:
        table = table[table["incoherent"]]
    if question:
        keys = table["question_set"].astype(str) + "/" + table["question_id"].astype(str)
        table = table[(table["question_id"] == question) | (keys == question)]
    if contains:
        table = table[table["answer"].str.contains(contains, case=False, regex=False, na=False)]
    return table.reset_index(drop=True)


def compare(study_dir: str | Path, run_a: str, run_b: str, metric: str = "misaligned", n_boot: int = 2000,
            seed: int = 0) -> dict:
    """rate(a) - rate(b) on the questions both answered: paired cluster-bootstrap interval and sign-flip p-value
    (emalib.evaluation.stats.paired_difference), under run a's thresholds."""
    from emalib.evaluation.stats import paired_difference

    dir_a, dir_b = _run_dir(study_dir, run_a), _run_dir(study_dir, run_b)
    thresholds = _thresholds(dir_a)
    return paired_difference(read_jsonl(dir_a / "judgments.jsonl"), read_jsonl(dir_b / "judgments.jsonl"),
                             metric=metric, params=thresholds, n_boot=n_boot, seed=seed)


def signals(study_dir: str | Path) -> pd.DataFrame:
    """The judge-free signals of every run: log-likelihood gap (misaligned minus aligned reference answers,
    nats/token) and KL to the base model on the general questions."""
    return runs(study_dir)[["run", "label", "domain", "loglik_gap", "kl_to_base"]]
