"""Score a finished run's saved answers with another judge, without generating anything.

The answers (answers.jsonl) and the question sets the run recorded (params.yaml) are judged by the judge the
given JudgeParams describe; the judgment cache is consulted first, so only missing (judge, mode, prompt)
triples cost calls. The new judge's rows and rates go to judges/<label>/judgments.jsonl and metrics.json, the
evaluation's own judgments stay where they are, and the agreement of the two judges is written to the run
folder (judge_agreement.json and a scatter figure; emalib.evaluation.agreement). No model is loaded unless the new judge
is a local one.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import TYPE_CHECKING

from emalib.core.config import JudgeParams, MetricParams
from emalib.core.errors import DataError
from emalib.core.io import atomic_write_json, atomic_write_jsonl, read_jsonl
from emalib.core.names import MAX_NAME_LENGTH
from emalib.core.write_targets import check_targets
from emalib.runs.rescore import judge_free_agreement, judged_dir, metrics_of, run_params, scoring_record
from emalib.runs.run_metrics import rate_columns, read_run_metrics

if TYPE_CHECKING:
    import pandas as pd

PRIMARY = "primary"  # the evaluation's own judge, in agreement names


def judge_label(params: JudgeParams) -> str:
    """A folder name for a judge: its model, plus the scoring mode when that is not the logprob default."""
    label = re.sub(r"[^A-Za-z0-9._-]+", "-", params.model).strip("-")
    if params.scoring == "sampled":
        label += f"-sampled{params.n_samples}"
    if len(label) > MAX_NAME_LENGTH:  # a long local model path: shortened, kept distinct by a hash
        label = f"{label[:MAX_NAME_LENGTH - 9]}-{hashlib.sha256(label.encode()).hexdigest()[:8]}"
    return label


def answer_rows(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "answers.jsonl"
    if not path.is_file():
        raise DataError(f"{path}: no saved answers to re-judge (evaluate the run first)")
    return read_jsonl(path)


def primary_judgments(run_dir: Path, n_answers: int) -> list[dict] | None:
    """The evaluation's own judgment rows (None when it has none), one per answer; a file cut short is a
    DataError naming it."""
    path = Path(run_dir) / "judgments.jsonl"
    if not path.is_file():
        return None
    rows = read_jsonl(path)
    if len(rows) != n_answers:
        raise DataError(f"{path}: {len(rows)} judgment rows for {n_answers} answers in answers.jsonl "
                        f"(cut short or changed); evaluate the run again")
    return rows


def rejudge(run_dir: str | Path, judge_params: JudgeParams, metric_params: MetricParams | None = None,
            seed: int = 0, local_model=None, local_tokenizer=None) -> dict:
    """Judge the run's saved answers with `judge_params`; returns {label, calls, usage, metrics, agreement}."""
    from emalib.evaluation.agreement import write_judge_agreement
    from emalib.evaluation.judge.run import build_judge, judge_answers, open_cache
    from emalib.runs.pipeline import load_all_questions

    run_dir = Path(run_dir)
    recorded = run_params(run_dir)
    metric_params = metric_params or recorded.metrics
    answers = answer_rows(run_dir)
    questions = load_all_questions(recorded)
    known = {(q.question_set, q.id) for q in questions}
    unknown = sorted({(a["question_set"], a["question_id"]) for a in answers} - known)
    if unknown:
        raise DataError(f"{run_dir / 'answers.jsonl'}: answers to questions the run's question sets lack: "
                        f"{', '.join('/'.join(k) for k in unknown[:3])}")
    primary = primary_judgments(run_dir, len(answers))  # before any call: a damaged file stops nothing half-way
    label = judge_label(judge_params)
    folder = judged_dir(run_dir, label)  # a label that is no folder name is refused before any call
    cache_target = [("judge.cache_path", judge_params.cache_path)] if judge_params.cache_path else []
    check_targets(cache_target, run_dir.parent.parent, str(run_dir / "params.yaml"))  # the run's results_dir
    judge = build_judge(judge_params, local_model, local_tokenizer)
    cache = open_cache(judge_params)
    try:
        rows = judge_answers(answers, questions, judge, cache)
    finally:
        cache.close()
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_jsonl(folder / "judgments.jsonl", rows)
    metrics = {**metrics_of(rows, metric_params, seed),
               "scoring": scoring_record(rows, judge_params.min_numeric_mass),
               "judge": {"label": label, "params": judge_params.model_dump(mode="json"), "calls": judge.calls,
                         "usage": judge.usage()}}
    agreement = judge_free_agreement(run_dir, rows, metric_params, seed)
    if agreement:  # how this judge agrees with the run's judge-free label
        metrics["judge_free"] = agreement
    atomic_write_json(folder / "metrics.json", metrics)
    agreement = None
    if primary is not None:
        agreement = write_judge_agreement(run_dir, primary, rows, f"{PRIMARY}__vs__{label}", metric_params, seed)
    return {"label": label, "calls": judge.calls, "usage": judge.usage(), "metrics": metrics,
            "agreement": agreement}


def judgments_of(run_dir: str | Path, judge: str | None = None) -> list[dict]:
    """The judgment rows of the evaluation's judge (judge=None) or of a re-judge label."""
    return read_jsonl(judged_dir(Path(run_dir), judge) / "judgments.jsonl")


def judges_of(run_dir: str | Path) -> list[str]:
    """Labels of the judges a run was re-judged with."""
    folder = Path(run_dir) / "judges"
    return sorted(p.name for p in folder.iterdir() if (p / "metrics.json").is_file()) if folder.is_dir() else []


def judge_rates_table(run_dir: str | Path) -> pd.DataFrame:
    """One row per (judge, question set incl. 'all') of a run: the evaluation's judge ('primary') and every
    re-judge label, with the index's rate columns (emalib.runs.run_metrics.RATE_KEYS, intervals split into _lo/_hi) plus
    judge_model, judge_mode and min_numeric_mass; for the report."""
    import pandas as pd

    rows = []
    for judge in [None, *judges_of(run_dir)]:
        metrics = read_run_metrics(judged_dir(Path(run_dir), judge))
        scoring = metrics.scoring
        for question_set, rates in metrics.scopes():
            rows.append({"judge": judge or PRIMARY, "judge_model": scoring.get("judge_model"),
                         "judge_mode": scoring.get("judge_mode"), "min_numeric_mass": scoring.get("min_numeric_mass"),
                         "question_set": question_set, **rate_columns(rates)})
    return pd.DataFrame(rows)
