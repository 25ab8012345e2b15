"""The results index in the paper's terms: which model, EM domain or benign task, method and strength each row is,
and which questions (general, in-domain) it rates. Everything the report draws starts from this frame."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import pandas as pd

from emalib.core.defense_specs import Method, defense_methods


class _Methods(Mapping):
    """The paper's methods in its table order: "aligned" is the model before fine-tuning (a study's base
    evaluation), "none" plain fine-tuning, then every defense as its descriptor names it (emalib/core/
    defense_specs.py), read when asked, so a defense registered later is listed too."""

    def _methods(self) -> dict[str, Method]:
        return {"aligned": Method("Aligned (no fine-tuning)"), "none": Method("No defense"), **defense_methods()}

    def __getitem__(self, method: str) -> Method:
        return self._methods()[method]

    def __iter__(self):
        return iter(self._methods())

    def __len__(self) -> int:
        return len(self._methods())


METHODS = _Methods()


def defense_method_names() -> list[str]:
    return [method for method in METHODS if method not in ("aligned", "none")]


PAPER_DOMAINS = ("code", "legal", "medical", "security")
PAPER_MODELS = ("Qwen2.5-7B-Instruct", "Qwen2.5-32B-Instruct")
INTERLEAVING = ("interleave", "interleave_plus", "interleave_plusplus")
GENERAL_SETS = ("general", "standin_general", "preregistered")
NOT_RUN = "not run"


def method_label(method: str, strength: float | None = None) -> str:
    spec = METHODS.get(method)
    if spec is None:
        return method
    if strength is None or pd.isna(strength) or spec.strength_field is None:
        return spec.label
    if spec.strength_field == "ratio":
        return f"{spec.label} ({100 * strength:g} %)"
    return f"{spec.label} ({spec.symbol}={strength:g})"


def model_short(name) -> str:
    """'Qwen/Qwen2.5-7B-Instruct', 'unsloth/Qwen2.5-7B-Instruct-bnb-4bit' -> 'Qwen2.5-7B-Instruct'."""
    short = str(name).rstrip("/").rsplit("/", 1)[-1]
    for suffix in ("-bnb-4bit", "-unsloth-bnb-4bit"):
        short = short.removesuffix(suffix)
    return short


def _stem(dataset) -> str | None:
    if dataset is None or (isinstance(dataset, float) and pd.isna(dataset)):
        return None
    name = Path(str(dataset)).name.removesuffix(".jsonl")
    for suffix in ("_train_100", "_train", "_test", "_eval"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def question_scope(question_set: str) -> str:
    if question_set == "all":
        return "all"
    if question_set in GENERAL_SETS:
        return "general"
    if question_set.endswith("_questions"):
        return "in_domain"
    return question_set  # another set (a trigger variant, say): kept under its own name


def _question_sets(value) -> list[str]:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return [value]
    return list(value) if value is not None else []


def domain_of(row: pd.Series) -> str:
    """The EM domain or benign task a row belongs to: a base evaluation by its in-domain question set (or benign
    task), a run by what it was fine-tuned on."""
    if row.get("kind") == "base":
        for name in _question_sets(row.get("params.generation.question_sets")):
            if name.endswith("_questions"):
                return name.removesuffix("_questions")
        task = _stem(row.get("params.task_eval.dataset"))
        if task:
            return task
    return _stem(row.get("params.train.dataset")) or "unknown"


def method_of(row: pd.Series) -> tuple[str, float | None]:
    if row.get("kind") == "base":
        return "aligned", None
    method = row.get("defenses") or "none"
    spec = METHODS.get(method)
    if spec is None or spec.strength_field is None:
        return method, None
    value = row.get(f"defense.{method}.{spec.strength_field}")
    return method, (None if value is None or pd.isna(value) else float(value))


def _number(row: pd.Series, key: str):
    value = row.get(key)
    return None if value is None or (isinstance(value, float) and pd.isna(value)) else value


def results_frame(index: pd.DataFrame, study_dir: str | Path | None = None) -> pd.DataFrame:
    """One row per index row (a node and a question set), named in the paper's terms."""
    rows = []
    for _, row in index.iterrows():
        if row.get("kind") == "prepare":
            continue
        method, strength = method_of(row)
        task_ci, gap_ci, kl_ci = (_interval(row.get(f"{name}_ci"))
                                  for name in ("task.accuracy", "signal.loglik_gap", "signal.kl_to_base"))
        question_set = row.get("question_set")
        rows.append({
            "node": row["node"], "kind": row.get("kind"), "status": "done",
            "model": model_short(row.get("params.model.name")), "domain": domain_of(row),
            "task": _stem(row.get("params.task_eval.dataset")), "method": method, "strength": strength,
            "seed": _number(row, "params.seed"), "question_set": question_set, "scope": None if question_set is None else question_scope(question_set),
            **{key: _number(row, key) for key in (
                "misaligned_rate", "misaligned_rate_ci_lo", "misaligned_rate_ci_hi", "incoherent_rate",
                "incoherent_rate_ci_lo", "incoherent_rate_ci_hi", "n", "n_scored")},
            "loglik_gap": _number(row, "signal.loglik_gap"), "kl_to_base": _number(row, "signal.kl_to_base"),
            "loglik_gap_lo": gap_ci[0] if gap_ci else None, "loglik_gap_hi": gap_ci[1] if gap_ci else None,
            "kl_to_base_lo": kl_ci[0] if kl_ci else None, "kl_to_base_hi": kl_ci[1] if kl_ci else None,
            "task_accuracy": _number(row, "task.accuracy"),
            "task_accuracy_lo": task_ci[0] if task_ci else None, "task_accuracy_hi": task_ci[1] if task_ci else None,
            "judge": f"{row.get('params.judge.backend')}:{row.get('params.judge.model')}",
            "run_dir": str(Path(study_dir) / row["node"]) if study_dir is not None else None,
        })
    return pd.DataFrame(rows, columns=FRAME_COLUMNS)


FRAME_COLUMNS = ["node", "kind", "status", "model", "domain", "task", "method", "strength", "seed", "question_set", "scope",
                 "misaligned_rate", "misaligned_rate_ci_lo", "misaligned_rate_ci_hi", "incoherent_rate",
                 "incoherent_rate_ci_lo", "incoherent_rate_ci_hi", "n", "n_scored", "loglik_gap", "loglik_gap_lo",
                 "loglik_gap_hi", "kl_to_base", "kl_to_base_lo", "kl_to_base_hi", "task_accuracy", "task_accuracy_lo",
                 "task_accuracy_hi", "judge", "run_dir"]


def _interval(value) -> list | None:
    """An interval column of the index ('[lo, hi]' as JSON text) as [lo, hi], or None."""
    return json.loads(value) if isinstance(value, str) and value not in ("null", "") else None


def planned_cells(planned: pd.DataFrame) -> pd.DataFrame:
    """(model, domain, task, method, strength) of every node a study planned, done or not."""
    cells = []
    for _, row in planned.iterrows():
        if row.get("kind") == "prepare":
            continue
        method, strength = method_of(row)
        cells.append({"node": row["node"], "model": model_short(row.get("params.model.name")),
                      "domain": domain_of(row), "task": _stem(row.get("params.task_eval.dataset")),
                      "method": method, "strength": strength})
    return pd.DataFrame(cells, columns=["node", "model", "domain", "task", "method", "strength"])


def has_judged_rates(frame: pd.DataFrame) -> bool:
    return bool(frame["misaligned_rate"].notna().any())
