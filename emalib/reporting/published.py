"""The paper's published numbers (package data: emalib/data/builtin/published.yaml), looked up by the report's cells.
A published number matches a cell only for the same model, domain or task, method and, where the paper gives one,
strength: a KL run at lambda = 1.0 is never set beside the paper's lambda = 0.1 row."""

from __future__ import annotations

import functools
import importlib.resources
import math

from emalib.core.safe_yaml import parse_yaml

EM_METRICS = ("general_misaligned", "general_incoherent", "in_domain_misaligned", "in_domain_incoherent")


@functools.lru_cache(maxsize=1)
def published() -> dict:
    text = importlib.resources.files("emalib").joinpath("data/builtin/published.yaml").read_text(encoding="utf-8")
    return parse_yaml(text)


def _same_strength(row: dict, strength) -> bool:
    wanted = row.get("strength")
    if wanted is None:
        return True  # the paper gives no strength: any run of the method is its counterpart
    return strength is not None and not (isinstance(strength, float) and math.isnan(strength)) \
        and math.isclose(float(strength), float(wanted), rel_tol=1e-9)


def _lookup(tables: list[dict], key: str, name: str, model: str, method: str, strength, metric: str):
    for table in tables:
        if table[key] != name or table["model"] != model:
            continue
        for row in table["rows"]:
            if row["method"] == method and _same_strength(row, strength) and row.get(metric) is not None:
                return {"value": float(row[metric]), "version": table["version"], "source": table["source"]}
    return None


def em_number(model: str, domain: str, method: str, strength, metric: str) -> dict | None:
    """{'value' (percent), 'version', 'source'} or None when the paper gives no such number."""
    return _lookup(published()["em_tables"], "domain", domain, model, method, strength, metric)


def task_number(model: str, task: str, method: str, strength) -> dict | None:
    return _lookup(published()["task_tables"], "task", task, model, method, strength, "accuracy")


def headline(model: str, method: str) -> float | None:
    entry = published()["headline"]
    return entry["mean_em_reduction"].get(method) if entry["model"] == model else None


def table1_symbol(method: str, criterion: str) -> str | None:
    return (published()["table1"]["rows"].get(method) or {}).get(criterion)
