"""A study's report: the overview of every run (from each run's metrics.json) and the paper's tables and figures (from
the study's results index, emalib.reporting), beside the published numbers.

    python -m emalib report results/<study>            (or the study file: params/studies/<study>.yaml)

writes results/<study>/tables/*.{csv,md,tex}, results/<study>/figures/*.{png,pdf} and results/<study>/report.md,
which lists them. docs/methods.md#the-report says what each table and figure shows and how Table 1 is derived.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from pydantic import BaseModel, ConfigDict, Field

from emalib.core.errors import DataError
from emalib.reporting.labels import judge_caveat, judge_note
from emalib.reporting.table1 import Table1Rules
from emalib.reporting.writers import percent_with_interval, save_figure, write_table
from emalib.runs.run_metrics import METRICS_FILE, RunMetrics, read_run_metrics

COLUMNS = ("misaligned_rate", "misaligned_rate_ci", "judge_free_misaligned_rate", "judge_free_misaligned_rate_ci",
           "misalign_at_k", "misalign_at_k_ci", "misalign_k", "incoherent_rate", "incoherent_rate_ci", "n", "n_scored",
           "n_dropped", "n_aligned_none", "n_coherent_none", "mean_aligned", "mean_aligned_ci", "em_f1", "em_f1_ci",
           "mean_coherent")
# How each run's rates were made: the rule for rows with a None score, and whether the question files' system
# prompts were sent (the published evaluation sent none).
PROTOCOL = ("none_rule", "system_prompt")
SIGNALS = ("loglik_gap", "kl_to_base", "loglik_gap_ci", "kl_to_base_ci")  # judge-free, 95 % intervals over questions
TASK_COLUMNS = ("task_accuracy", "task_accuracy_ci")  # benign-task accuracy and its 95 % interval (task_metrics.json)
# The overview's columns with an interval beside them, and the heading each shows under as % [95 % CI].
WITH_INTERVALS = {"misaligned_rate": "misaligned % [95% CI]",
                  "judge_free_misaligned_rate": "judge-free misaligned % [95% CI]",
                  "misalign_at_k": "Misalign@k % [95% CI]", "incoherent_rate": "incoherent % [95% CI]",
                  "task_accuracy": "task accuracy % [95% CI]"}
# Columns on the judge's 0-100 scale (docs/methods.md#em-f1-misalign-at-k-and-mean-alignment), shown with intervals.
SCORES_WITH_INTERVALS = {"mean_aligned": "mean aligned [95% CI]", "em_f1": "EM-F1 [95% CI]"}


def collect_metrics(study_dir: str | Path) -> pd.DataFrame:
    """One row per (run, question set), plus an 'all' row per run, from results/<study>/*/metrics.json."""
    rows = []
    for path in sorted(Path(study_dir).glob(f"*/{METRICS_FILE}")):
        metrics = read_run_metrics(path.parent)
        check_judged_files(path.parent)
        protocol = {"none_rule": metrics.thresholds.get("none_rule", "unrecorded"),
                    "system_prompt": _system_prompt_label(metrics)}
        for name, rates in metrics.scopes():
            rows.append({"run": path.parent.name, "question_set": name, **{c: rates.get(c) for c in COLUMNS},
                         **{s: metrics.judge_free.get(s) if name == "all" else None for s in SIGNALS},
                         "task_accuracy": metrics.task.get("accuracy") if name == "all" else None,
                         "task_accuracy_ci": metrics.task.get("accuracy_ci") if name == "all" else None, **protocol})
    return pd.DataFrame(rows, columns=["run", "question_set", *COLUMNS, *SIGNALS, *TASK_COLUMNS, *PROTOCOL])


def check_judged_files(run_dir: Path) -> None:
    """Every judgments.jsonl of a run (its judge's and each re-judge's) is whole: it ends with a complete line
    and holds one row per answer in answers.jsonl. A file cut short (a full disk, an interrupted copy) would
    leave rates nobody can re-score or re-judge; the report names it instead of showing them. Counting lines is
    enough, and cheap for studies of many runs."""
    folders = [run_dir]
    for folder in sorted(p for p in (run_dir / "judges").glob("*") if p.is_dir()):
        if (folder / "judgments.jsonl").is_file() and not (folder / "metrics.json").is_file():
            raise DataError(f"{folder}: judgments.jsonl without metrics.json (a re-judge that stopped half-way: "
                            f"run rejudge again)")
        folders.append(folder)
    answers = run_dir / "answers.jsonl"
    n_answers = _complete_lines(answers) if answers.is_file() else None
    for folder in folders:
        path = folder / "judgments.jsonl"
        if not path.is_file():
            continue
        rows = _complete_lines(path)
        if n_answers is not None and rows != n_answers:
            raise DataError(f"{path}: {rows} rows for {n_answers} answers in {answers} (cut short or changed)")


def _complete_lines(path: Path) -> int:
    """The number of non-empty lines of a JSONL file emalib wrote; DataError when its last line is cut off."""
    data = path.read_bytes()
    lines = data.split(b"\n")
    if lines[-1]:  # a file emalib wrote ends with a newline, so the last piece is empty unless cut off
        raise DataError(f"{path}: line {len(lines)}: cut short (no end of line)")
    return sum(1 for line in lines if line.strip())


def _system_prompt_label(metrics: RunMetrics) -> str:
    used = metrics.generation.get("use_system_prompt")
    return "unrecorded" if used is None else ("sent" if used else "not sent")


def _as_percent(frame: pd.DataFrame) -> pd.DataFrame:
    shown = frame.copy()
    for column in WITH_INTERVALS:
        shown[column] = [percent_with_interval(rate, *(ci if isinstance(ci, (list, tuple)) else (None, None)))
                         for rate, ci in zip(frame[column], frame[f"{column}_ci"])]
    for column in ("loglik_gap", "kl_to_base"):
        shown[column] = [_with_interval(value, ci) for value, ci in zip(frame[column], frame[f"{column}_ci"])]
    for column in SCORES_WITH_INTERVALS:
        shown[column] = [_with_interval(value, ci, digits=1) or "n/a"
                         for value, ci in zip(frame[column], frame[f"{column}_ci"])]
    shown = shown.drop(columns=[f"{column}_ci" for column in (*WITH_INTERVALS, *SCORES_WITH_INTERVALS,
                                                              "loglik_gap", "kl_to_base")])
    return shown.rename(columns={**WITH_INTERVALS, **SCORES_WITH_INTERVALS, "loglik_gap": "loglik_gap [95% CI]",
                                 "kl_to_base": "kl_to_base [95% CI]"})


def _with_interval(value, ci, digits: int = 4) -> str | None:
    """A value (a judge-free signal in nats/token, or a 0-100 score) with its interval, when the run recorded one
    (runs before it did: none)."""
    if value is None or pd.isna(value):
        return None
    return f"{value:.{digits}f}" + (f" [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]" if isinstance(ci, (list, tuple))
                                    else "")


def overview_numbers(frame: pd.DataFrame) -> pd.DataFrame:
    """The overview with each interval as two plain columns (for CSV)."""
    numbers = frame.copy()
    intervals = [f"{name}_ci" for name in (*WITH_INTERVALS, *SCORES_WITH_INTERVALS, "loglik_gap", "kl_to_base")]
    for column in intervals:
        numbers[f"{column}_lo"] = [c[0] if isinstance(c, (list, tuple)) else None for c in frame[column]]
        numbers[f"{column}_hi"] = [c[1] if isinstance(c, (list, tuple)) else None for c in frame[column]]
    return numbers.drop(columns=intervals)




class ReportParams(BaseModel):
    """What `python -m emalib report` and notebooks/report.ipynb take; `-o key=value` sets any of it."""
    model_config = ConfigDict(extra="forbid")
    name: str | None = Field(None, description="the overview's file name; None: the study's name")
    table1: Table1Rules = Table1Rules()


def load_report_params(overrides: list[str] | None = None, source: str = "report params") -> ReportParams:
    """ReportParams from dotted 'key=value' overrides; a typo or a bad value is one line naming the key."""
    from pydantic import ValidationError

    from emalib.core.config import apply_override, format_validation_error
    from emalib.core.errors import ParamsError

    tree = ReportParams().model_dump()  # an override changes one threshold and keeps the others
    for override in overrides or []:
        apply_override(tree, override, source, schema=ReportParams)
    try:
        return ReportParams.model_validate(tree)
    except ValidationError as err:
        raise ParamsError(format_validation_error(source, err)) from None


def study_folder(study: str | Path, overrides: list[str] | None = None) -> tuple[Path, pd.DataFrame]:
    """A results folder or a study file -> (results/<study>, its index). A study file's index is rebuilt first."""
    from emalib.studies.index import read_index, write_index

    path = Path(study)
    if path.is_file() and path.suffix in (".yaml", ".yml"):
        from emalib.studies.study import load_study

        loaded = load_study(path, overrides)
        if not loaded.study_dir.is_dir():
            raise DataError(f"{loaded.study_dir}: no such study folder (run python -m emalib study {path} first)")
        write_index(loaded)
        return loaded.study_dir, read_index(loaded.study_dir)
    if not path.is_dir():
        raise DataError(f"{path}: no such study folder")
    return path, None


def report_study(study: str | Path, params: ReportParams | None = None,
                 study_overrides: list[str] | None = None, paper: bool = True) -> dict[str, Path]:
    """Write every table and figure the study's results allow (see the module docstring); returns name -> path.
    paper=False writes the overview only (what a run's evaluate step shows; the paper's tables are the study's)."""
    from emalib.reporting import build
    from emalib.reporting.overview import overview_figure
    from emalib.studies.index import planned_frame, read_index

    params = params or ReportParams()
    study_dir, index = study_folder(study, study_overrides)
    name = params.name or study_dir.name
    overview = collect_metrics(study_dir)  # first: a damaged metrics.json fails before anything is written
    curves_exist = any(study_dir.glob("*/rl_rewards.csv"))
    if overview.empty and not curves_exist:
        raise DataError(f"{study_dir}: no finished runs (no */metrics.json)")
    index = read_index(study_dir) if index is None else index
    planned = planned_frame(study_dir)
    paths: dict[str, Path] = {}
    if not overview.empty:
        for kind, path in write_table(overview_numbers(overview), _as_percent(overview), study_dir / "tables",
                                      name).items():
            paths[kind] = path
        figure = overview_figure(overview_numbers(overview), f"{name}: every run", judge_note(index), index=index,
                                 judge_caveat=judge_caveat(index))
        paths.update({kind: path for kind, path in save_figure(figure, study_dir / "figures", name).items()})
    if paper:
        paths.update(build.paper_outputs(study_dir, index, planned, params.table1))
    paths["report"] = build.write_report_md(study_dir, name, paths)
    return paths
