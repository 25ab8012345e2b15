"""The results index of a study: one row per finished evaluation (a node and a question set, plus 'all'), with the
node's resolved params flattened, its rates and intervals, judge-free signals, task metrics, timings and judge
usage. Written as Parquet (results/<study>/index.parquet) with a CSV copy; the report reads this and nothing else.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from emalib.core.errors import DataError
from emalib.core.io import atomic_write_text, read_json_object
from emalib.runs.run_metrics import has_metrics, rate_columns, read_run_metrics
from emalib.studies.executors import read_status
from emalib.studies.study import STUDY_FOLDER, Study


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
    return run_rows(node.run_dir, node.params, study.name, node_id, node.kind, node.cell)


def run_rows(run_dir: Path, params, study_name: str, node_id: str, kind: str, cell: dict | None = None) -> list[dict]:
    """The index rows of one evaluated folder; none for a folder without metrics.json (a preparatory node)."""
    if not has_metrics(run_dir):
        return []
    metrics = read_run_metrics(run_dir)
    manifest = _optional(run_dir / "manifest.json")
    task = metrics.task
    common = {"study": study_name, "node": node_id, "kind": kind, **{f"axis.{k}": v for k, v in (cell or {}).items()},
              **flatten_params(params),
              "none_rule": metrics.thresholds.get("none_rule"),
              "system_prompt_sent": metrics.generation.get("use_system_prompt"),
              **{f"signal.{k}": json.dumps(v) if isinstance(v, list) else v for k, v in metrics.judge_free.items()},
              **{f"task.{k}": v for k, v in task.items() if not isinstance(v, (list, dict))},
              "task.accuracy_ci": json.dumps(task.get("accuracy_ci")) if task else None,
              **{f"time_s.{k}": v for k, v in (manifest.get("timings_s") or {}).items()},
              "judge.calls": (manifest.get("judge") or {}).get("calls_this_run"),
              "judge.usage": json.dumps((manifest.get("judge") or {}).get("usage_this_run"))}
    return [dict(common, question_set=question_set, **rate_columns(rates)) for question_set, rates in metrics.scopes()]


def kind_of_folder(name: str) -> str:
    """A study's folder names say what they hold: base-<model>-<hash> (the model without adapter), prep-... (a shared
    preparatory artifact), anything else a run."""
    return "base" if name.startswith("base-") else "prepare" if name.startswith("prep-") else "run"


def index_from_folders(study_dir: Path) -> pd.DataFrame:
    """The index built from the run folders: every <run>/metrics.json with the run's params, taken from the study's
    resolved node params (_study/params/<run>.yaml) when a study made the folder, else from <run>/params.yaml. A base
    evaluation's own params.yaml holds only what the evaluation depends on; the runs it was made for give it the
    data set they were fine-tuned on (they name it by results.base_run_name)."""
    from emalib.core.config import load_params, params_from_dict, read_yaml_mapping
    from emalib.runs.results import base_run_name

    study_dir = Path(study_dir)
    resolved = study_dir / STUDY_FOLDER / "params"
    found, bases = {}, []
    for metrics in sorted(study_dir.glob("*/metrics.json")):
        run_dir = metrics.parent
        if (resolved / f"{run_dir.name}.yaml").is_file():
            found[run_dir] = load_params(resolved / f"{run_dir.name}.yaml")
        elif kind_of_folder(run_dir.name) == "base":
            bases.append(run_dir)
        else:
            found[run_dir] = load_params(run_dir / "params.yaml")
    trained_on = {base_run_name(p): p.train.dataset for d, p in found.items() if kind_of_folder(d.name) == "run"}
    for run_dir in bases:
        tree = {**read_yaml_mapping(run_dir / "params.yaml"), "study": study_dir.name, "run": run_dir.name}
        if run_dir.name in trained_on:
            tree["train"] = {"dataset": trained_on[run_dir.name]}
        found[run_dir] = params_from_dict(tree, str(run_dir / "params.yaml"))
    rows = []
    for run_dir, params in sorted(found.items()):
        rows += run_rows(run_dir, params, study_dir.name, run_dir.name, kind_of_folder(run_dir.name))
    return pd.DataFrame(rows)


def planned_frame(study_dir: Path) -> pd.DataFrame:
    """Every node a study planned (results/<study>/_study/params/<node>.yaml), with its flattened params: what the
    report compares the index with, so a run that has not finished shows as missing instead of vanishing."""
    from emalib.core.config import load_params

    folder = Path(study_dir) / STUDY_FOLDER / "params"
    rows = [{"node": path.stem, "kind": kind_of_folder(path.stem), **flatten_params(load_params(path))}
            for path in sorted(folder.glob("*.yaml"))] if folder.is_dir() else []
    return pd.DataFrame(rows)


def read_index(study_dir: str | Path) -> pd.DataFrame:
    """results/<study>/index.parquet when a study wrote one after its last evaluation finished, else the index built
    from the run folders (an evaluation that finished since, e.g. one run re-done by hand, is not left out)."""
    study_dir = Path(study_dir)
    parquet = study_dir / "index.parquet"
    newest = max((p.stat().st_mtime for p in study_dir.glob("*/metrics.json")), default=0.0)
    if parquet.is_file() and parquet.stat().st_mtime >= newest:
        try:
            return pd.read_parquet(parquet)
        except (OSError, ValueError) as err:  # pyarrow: ArrowInvalid (a ValueError) or an OSError
            raise DataError(f"{parquet}: not a readable Parquet file ({type(err).__name__}); "
                            f"rebuild it with python -m emalib study <file>") from None
    return index_from_folders(study_dir)


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
