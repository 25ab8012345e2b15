"""The results index of a study: one row per finished evaluation (a node and a question set, plus 'all'), with the
node's resolved params flattened, its rates and intervals, judge-free signals, task metrics, timings and judge
usage. Written as Parquet (results/<study>/index.parquet) with a CSV copy; the report reads this and nothing else.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from emalib.executors import read_status
from emalib.io import atomic_write_text, read_json_object
from emalib.study import Study

RATE_KEYS = ("misaligned_rate", "misaligned_rate_ci", "incoherent_rate", "incoherent_rate_ci", "n", "n_scored",
             "n_dropped", "mean_aligned", "mean_coherent")


def flatten_params(params) -> dict:
    """Dotted columns for every params key; defenses as `defense.<name>.<field>` plus `defenses` (names joined)."""
    tree = params.model_dump(mode="json")
    blocks = tree.pop("defenses")
    flat = pd.json_normalize(tree, sep=".").iloc[0].to_dict()
    flat = {f"params.{k}": (json.dumps(v) if isinstance(v, (list, dict)) else v) for k, v in flat.items()}
    flat["defenses"] = "+".join(block["name"] for block in blocks) or "none"
    for block in blocks:
        for key, value in pd.json_normalize(block, sep=".").iloc[0].to_dict().items():
            if key != "name":
                flat[f"defense.{block['name']}.{key}"] = json.dumps(value) if isinstance(value, (list, dict)) else value
    return flat


def node_rows(study: Study, node_id: str) -> list[dict]:
    node = study.nodes[node_id]
    if not (node.run_dir / "metrics.json").is_file():
        return []  # a preparatory node: nothing evaluated
    metrics = read_json_object(node.run_dir / "metrics.json", required=("overall",))
    manifest = _optional(node.run_dir / "manifest.json")
    task = _optional(node.run_dir / "task_metrics.json")
    common = {"study": study.name, "node": node_id, "kind": node.kind, **{f"axis.{k}": v for k, v in node.cell.items()},
              **flatten_params(node.params),
              "none_rule": (metrics.get("thresholds") or {}).get("none_rule"),
              "system_prompt_sent": (metrics.get("generation") or {}).get("use_system_prompt"),
              **{f"signal.{k}": v for k, v in (metrics.get("judge_free") or {}).items()},
              **{f"task.{k}": v for k, v in task.items() if not isinstance(v, (list, dict))},
              "task.accuracy_ci": json.dumps(task.get("accuracy_ci")) if task else None,
              **{f"time_s.{k}": v for k, v in (manifest.get("timings_s") or {}).items()},
              "judge.calls": (manifest.get("judge") or {}).get("calls_this_run"),
              "judge.usage": json.dumps((manifest.get("judge") or {}).get("usage_this_run"))}
    rows = []
    for question_set, rates in [("all", metrics["overall"]), *metrics.get("per_set", {}).items()]:
        row = dict(common, question_set=question_set)
        for key in RATE_KEYS:
            value = rates.get(key)
            if key.endswith("_ci"):
                row[f"{key}_lo"], row[f"{key}_hi"] = (value if isinstance(value, list) else (None, None))
            else:
                row[key] = value
        rows.append(row)
    return rows


def _optional(path: Path) -> dict:
    return read_json_object(path) if path.is_file() else {}


def build_index(study: Study) -> pd.DataFrame:
    """Rows of every node whose status is done."""
    rows = [row for node_id in study.nodes if read_status(study.study_dir, node_id)["state"] == "done"
            for row in node_rows(study, node_id)]
    return pd.DataFrame(rows)


def write_index(study: Study) -> dict[str, Path]:
    frame = build_index(study)
    parquet = study.study_dir / "index.parquet"
    tmp = parquet.with_name(".index.parquet.tmp")
    frame.to_parquet(tmp, index=False)
    tmp.replace(parquet)
    csv = atomic_write_text(study.study_dir / "index.csv", frame.to_csv(index=False))
    return {"parquet": parquet, "csv": csv}
