"""The one reader of an evaluation's results: <folder>/metrics.json (written by the evaluate step, and by rejudge
under judges/<label>/) with the task_metrics.json beside it. The index, the report, explore and rejudge read runs
through `read_run_metrics`; a damaged or incomplete file is one DataError line naming it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from emalib.core.errors import DataError
from emalib.core.io import read_json_object

METRICS_FILE = "metrics.json"
TASK_METRICS_FILE = "task_metrics.json"
# The rate columns of the results index (and the re-judge table); an interval `<key>_ci` becomes `_lo`/`_hi`.
RATE_KEYS = ("misaligned_rate", "misaligned_rate_ci", "incoherent_rate", "incoherent_rate_ci", "n", "n_scored",
             "n_dropped", "mean_aligned", "mean_aligned_ci", "mean_coherent", "misalign_at_k", "misalign_at_k_ci",
             "misalign_k", "em_f1", "em_f1_ci", "judge_free_misaligned_rate", "judge_free_misaligned_rate_ci")


class RunMetrics(BaseModel):
    """metrics.json: rates overall, per question set and per question, how they were made, the judge-free
    signals and the judge-free rate per scope; `task` is task_metrics.json (empty when the run evaluated no benign
    task)."""

    model_config = ConfigDict(extra="allow")

    overall: dict[str, Any]
    per_set: dict[str, dict[str, Any]]
    per_question: dict[str, dict[str, Any]] = {}
    thresholds: dict[str, Any] = {}
    generation: dict[str, Any] = {}
    scoring: dict[str, Any] = {}
    judge_free: dict[str, Any] = {}
    judge_free_rates: dict[str, dict[str, Any]] = {}
    task: dict[str, Any] = {}

    def scopes(self) -> list[tuple[str, dict[str, Any]]]:
        """('all', overall rates) then (question set, its rates) for each set; each with its judge-free rate, which
        is kept apart in metrics.json because it does not come from the judge (a re-score leaves it as it is)."""
        return [(name, {**rates, **self.judge_free_rates.get(name, {})})
                for name, rates in [("all", self.overall), *self.per_set.items()]]


def has_metrics(folder: str | Path) -> bool:
    return (Path(folder) / METRICS_FILE).is_file()


def read_run_metrics(folder: str | Path) -> RunMetrics:
    folder = Path(folder)
    path = folder / METRICS_FILE
    data = read_json_object(path, required=("overall", "per_set"))
    task_path = folder / TASK_METRICS_FILE
    if task_path.is_file():
        data["task"] = read_json_object(task_path)
    try:
        return RunMetrics.model_validate({key: value for key, value in data.items() if value is not None})
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise DataError(f"{path}: {where}: {first['msg']}") from None


def rate_columns(rates: dict[str, Any], keys: tuple[str, ...] = RATE_KEYS) -> dict[str, Any]:
    """The rates as flat columns, each interval `<key>_ci` split into `<key>_ci_lo` / `<key>_ci_hi`."""
    row = {}
    for key in keys:
        value = rates.get(key)
        if key.endswith("_ci"):
            row[f"{key}_lo"], row[f"{key}_hi"] = value if isinstance(value, (list, tuple)) else (None, None)
        else:
            row[key] = value
    return row
