"""Re-score a finished run's judgments from the evidence they keep, with no call to any judge.

Every judgment row holds, per metric, the judge's raw output (`<metric>_evidence`: top logprobs, number
probabilities or sampled replies) beside the score. A changed rule (`judge.min_numeric_mass`, the metrics'
thresholds or `none_rule`) is applied by recomputing the scores from that evidence and the rates from the
scores (docs/methods.md#judge-evidence). Nothing here builds a judge, so nothing here can make a call.
"""

from __future__ import annotations

from pathlib import Path

from emalib.core.config import MetricParams, RunParams, apply_override, params_from_dict, read_yaml_mapping
from emalib.core.errors import DataError, ParamsError
from emalib.core.io import atomic_write_json, atomic_write_jsonl, read_json_object, read_jsonl
from emalib.core.names import NAME_RULE, inside, is_safe_name
from emalib.evaluation.judge.scoring import rescore

EVIDENCE_SUFFIX = "_evidence"


def judged_dir(run_dir: Path, judge: str | None = None) -> Path:
    """Where a judge's judgments.jsonl and metrics.json live: the run folder for the evaluation's own judge,
    judges/<label>/ for a judge added later by re-judging (emalib.runs.rejudge)."""
    if judge is None:
        return Path(run_dir)
    if not is_safe_name(judge):
        raise ParamsError(f"judge label {judge!r}: {NAME_RULE}")
    return inside(Path(run_dir) / "judges" / judge, run_dir, "the run folder")


def judgments_path(run_dir: Path, judge: str | None = None) -> Path:
    """The judgments.jsonl of the evaluation's judge or of re-judge label `judge`; DataError naming the run and
    the labels it has when there is none."""
    if judge is not None:
        labels = sorted(p.name for p in (run_dir / "judges").iterdir() if p.is_dir()) \
            if (run_dir / "judges").is_dir() else []
        if judge not in labels:
            raise DataError(f"{run_dir}: no judge label '{judge}' (--judge; labels: {', '.join(labels) or 'none'})")
    path = judged_dir(run_dir, judge) / "judgments.jsonl"
    if not path.is_file():
        raise DataError(f"{path}: no judgments to re-score (evaluate or re-judge the run first)")
    return path


def run_params(run_dir: Path, overrides: list[str] | None = None) -> RunParams:
    """The params a run folder recorded (params.yaml), with dotted overrides. A base evaluation's folder records
    only what the evaluation depends on; its study and run names are filled in from the folder."""
    run_dir = Path(run_dir)
    tree = read_yaml_mapping(run_dir / "params.yaml")
    tree.setdefault("study", run_dir.parent.name or "study")
    tree.setdefault("run", run_dir.name)
    for override in overrides or []:
        apply_override(tree, override, str(run_dir / "params.yaml"))
    return params_from_dict(tree, str(run_dir / "params.yaml"))


def rescore_rows(rows: list[dict], min_numeric_mass: float, source: str = "judgment") -> list[dict]:
    """Copies of judgment rows with every metric's score and mass recomputed from its saved evidence; source
    (the file) prefixes the one-line error about a row."""
    out = []
    for index, row in enumerate(rows):
        row = dict(row)
        for key in [k for k in row if k.endswith(EVIDENCE_SUFFIX)]:
            metric = key.removesuffix(EVIDENCE_SUFFIX)
            evidence = row[key]
            if not isinstance(evidence, dict) or "mode" not in evidence or "raw" not in evidence:
                raise DataError(f"{source} row {index + 1}: '{key}' is not {{mode, raw}} evidence")
            try:
                score, mass = rescore(evidence["raw"], evidence["mode"], min_numeric_mass)
            except (ValueError, KeyError, TypeError) as err:  # e.g. a NaN logprob an older version saved
                raise DataError(f"{source} row {index + 1}: '{key}' gives no score: {err}") from None
            row[metric], row[f"{metric}_mass"] = score, round(mass, 6)
        if not any(k.endswith(EVIDENCE_SUFFIX) for k in row):
            raise DataError(f"{source} row {index + 1}: no saved evidence (judged before evidence was kept); "
                            f"re-judge the run instead")
        out.append(row)
    return out


def metrics_of(rows: list[dict], metric_params: MetricParams, seed: int) -> dict:
    """Rates, mean alignment, Misalign@k and EM-F1 with their intervals (what metrics.json holds besides the
    judge-free signals). The held-out in-domain rows (emalib.data.heldout) get their own per_set and per-question
    entries but stay out of 'overall', which keeps meaning the evaluation question sets; EM-F1 reads them when
    `metrics.em_f1_in_domain` names the held-out set."""
    from emalib.data.heldout import HELDOUT_SET
    from emalib.evaluation.em_metrics import add_em_metrics, em_f1_with_interval
    from emalib.evaluation.metrics import compute_metrics
    from emalib.evaluation.stats import add_intervals

    def judged(group: list[dict]) -> dict:
        return add_em_metrics(add_intervals(compute_metrics(group, metric_params), group, seed=seed), group,
                              metric_params, seed=seed)

    asked = [row for row in rows if row["question_set"] != HELDOUT_SET]
    held = [row for row in rows if row["question_set"] == HELDOUT_SET]
    metrics = judged(asked)
    if held:
        extra = judged(held)
        metrics["per_set"].update(extra["per_set"])
        metrics["per_question"].update(extra["per_question"])
        if metric_params.em_f1_in_domain == HELDOUT_SET:
            general = [row for row in asked if row["question_set"] == metric_params.em_f1_general]
            metrics["overall"].update(em_f1_with_interval(general, held, seed=seed) or {"em_f1": None,
                                                                                        "em_f1_ci": None})
    return metrics


def judge_free_agreement(run_dir: Path, rows: list[dict], metric_params: MetricParams, seed: int) -> dict:
    """The judge-free label's agreement with these judgment rows as judge_free entries (persona_judge_<key>),
    from the run's persona_projections.jsonl; {} when the run has no judge-free label."""
    from emalib.evaluation.judge_free_rate import agreement_with_judge

    path = Path(run_dir) / "persona_projections.jsonl"
    projections = read_jsonl(path) if path.is_file() else []
    if not projections or "persona_flagged" not in projections[0]:
        return {}
    agreement = agreement_with_judge(projections, rows, metric_params, seed)
    return {f"persona_judge_{key}": value for key, value in agreement.items()}


def scoring_record(rows: list[dict], min_numeric_mass: float) -> dict:
    """Which judge and rule produced the scores, for metrics.json's 'scoring' entry."""
    return {"judge_model": rows[0].get("judge_model") if rows else None,
            "judge_mode": rows[0].get("judge_mode") if rows else None, "min_numeric_mass": min_numeric_mass}


def recompute_metrics(run_dir: str | Path, overrides: list[str] | None = None, judge: str | None = None) -> dict:
    """Re-score judgments.jsonl (of the evaluation's judge, or of re-judge label `judge`) under the run's params
    with overrides (e.g. ['judge.min_numeric_mass=0.5']) and rewrite it and metrics.json; returns the metrics.
    Entries of metrics.json that do not come from the judge (judge-free signals, generation) are kept."""
    params = run_params(Path(run_dir), overrides)
    folder = judged_dir(Path(run_dir), judge)
    path = judgments_path(Path(run_dir), judge)
    rows = rescore_rows(read_jsonl(path), params.judge.min_numeric_mass, f"{path}: judgment")
    old = read_json_object(folder / "metrics.json") if (folder / "metrics.json").is_file() else {}
    metrics = {**old, **metrics_of(rows, params.metrics, params.seed),
               "scoring": dict(scoring_record(rows, params.judge.min_numeric_mass), rescored_from_evidence=True)}
    agreement = judge_free_agreement(Path(run_dir), rows, params.metrics, params.seed)
    if agreement:  # the judge-free label's agreement follows the new scores
        metrics["judge_free"] = {**metrics.get("judge_free", {}), **agreement}
    atomic_write_jsonl(folder / "judgments.jsonl", rows)
    atomic_write_json(folder / "metrics.json", metrics)
    return metrics
