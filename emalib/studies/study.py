"""Studies: a grid of runs declared once, expanded into validated run configs and a dependency graph.

A study file (YAML) names a base config and axes; every combination of one value per axis is a run:

    study: paper_main
    base: ../paper/base_7b.yaml            # a params file (relative to the study file) or an inline mapping
    axes:
      domain:                              # axis -> value label -> overlay merged over the base
        code: {train: {dataset: code_train}}
        legal: {train: {dataset: legal_train}}
      defense:
        none: {}
        kl: {defenses: [{name: kl, weight: 0.1}]}
    exclude: [{domain: code, defense: kl}] # optional: cells left out
    base_evaluation: true                  # one aligned-model evaluation per distinct evaluation config

Overlays are merged as OmegaConf merges (mappings merge, lists are replaced). Inside them, `${axis.<name>}` is the
cell's label on that axis, `${run_dir:<axis>.<label>,...}` the folder of another cell of the study (e.g. the
no-defense adapter an Interleaving++ run scores with) and `${study_dir:}` the study's folder (for shared artifacts). Each cell's id joins its labels (`code__kl`); the resolved
tree is validated by the same pydantic params as a single run, with errors naming the cell.

The graph is derived, never written by hand:
- a run depends on every other node whose folder its params mention (adapters, vectors, scores), and on the node
  that writes a shared artifact its params mention;
- a preparatory step whose artifact has an explicit path (persona `vector_path`, SafeLoRA `matrices`, Interleaving+
  `scores_path`) becomes one shared node per artifact, run once for every run that reads it;
- the aligned-model evaluation is one node per distinct evaluation config (results.base_run_name), so runs that
  evaluate the same base share it and runs that evaluate differently never overwrite each other.
"""

from __future__ import annotations

import copy
import graphlib
import hashlib
import itertools
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError

from emalib.core.config import (
    RunParams,
    apply_override,
    dump_params,
    format_validation_error,
    merge_into,
    params_from_dict,
    read_yaml_mapping,
)
from emalib.core.defense_specs import shared_artifacts
from emalib.core.errors import ParamsError
from emalib.core.interpolation import resolve_interpolations
from emalib.core.names import SafeName, inside
from emalib.core.strict_model import StrictModel
from emalib.core.write_targets import check_write_targets

STUDY_FOLDER = "_study"  # inside results/<study>/: resolved node params, status, executor logs


class StudySpec(StrictModel):
    study: SafeName
    base: str | dict[str, Any] = Field(..., description="params file (relative to the study file) or a mapping")
    axes: dict[SafeName, dict[SafeName, dict[str, Any] | None]] = Field(
        ..., min_length=1, description="axis -> label -> overlay; labels join into run ids, so they are names")
    exclude: list[dict[str, str]] = Field(default_factory=list)
    base_evaluation: bool = True


@dataclass
class Node:
    """One papermill execution of a params file: a run, a shared preparatory step, or a base evaluation."""

    id: str
    kind: str  # "run" | "prepare" | "base"
    params: RunParams
    deps: list[str] = field(default_factory=list)
    cell: dict[str, str] = field(default_factory=dict)  # axis -> label (runs only)

    @property
    def run_dir(self) -> Path:
        return self.params.run_dir


@dataclass
class Study:
    spec: StudySpec
    source: Path
    nodes: dict[str, Node]  # in an order where every node comes after its dependencies

    @property
    def name(self) -> str:
        return self.spec.study

    @property
    def study_dir(self) -> Path:
        return next(iter(self.nodes.values())).params.study_dir

    @property
    def runs(self) -> list[Node]:
        return [node for node in self.nodes.values() if node.kind == "run"]


def load_study(path: str | Path, overrides: list[str] | None = None) -> Study:
    """Read, expand and validate a study file; every cell is checked before anything runs."""
    path = Path(path)
    tree = read_yaml_mapping(path, "study file")
    try:
        spec = StudySpec.model_validate(tree)
    except ValidationError as err:
        raise ParamsError(format_validation_error(str(path), err)) from None
    base = _base_tree(spec, path)
    cells = _cells(spec, path)
    index = CellIndex(cells)
    runs = {run_id: _expand_cell(spec, base, cell, run_id, index, path, overrides or []) for run_id, cell in
            cells.items()}
    return Study(spec, path, _graph(runs, spec.base_evaluation, path))


def _base_tree(spec: StudySpec, path: Path) -> dict:
    if isinstance(spec.base, dict):
        return dict(spec.base)
    base_path = (path.parent / spec.base) if not Path(spec.base).is_absolute() else Path(spec.base)
    if not base_path.is_file():
        raise ParamsError(f"{path}: key 'base': {base_path} not found")
    return read_yaml_mapping(base_path)


def _cells(spec: StudySpec, path: Path) -> dict[str, dict[str, str]]:
    """run id -> {axis: label} for every combination not excluded. Two cells whose ids collide (labels 'x__y' and
    'z' against 'x' and 'y__z', or ids that differ in case only, one folder on macOS) are refused: they would share
    one run folder and overwrite each other."""
    for rule in spec.exclude:
        for axis, label in rule.items():
            if axis not in spec.axes or label not in spec.axes[axis]:
                raise ParamsError(f"{path}: exclude: {axis}={label} is not a value of the study's axes")
    cells: dict[str, dict[str, str]] = {}
    folded: dict[str, str] = {}
    for labels in itertools.product(*(list(values) for values in spec.axes.values())):
        cell = dict(zip(spec.axes, labels))
        if any(all(cell[a] == v for a, v in rule.items()) for rule in spec.exclude):
            continue
        run_id = "__".join(labels)
        other = folded.setdefault(run_id.casefold(), run_id)
        if other in cells:
            raise ParamsError(f"{path}: cells {_shown(cells[other])} and {_shown(cell)} both get the run id "
                              f"'{run_id}' (one folder); rename a label")
        cells[run_id] = cell
    if not cells:
        raise ParamsError(f"{path}: every cell is excluded")
    return cells


def _shown(cell: dict[str, str]) -> str:
    return "{" + ", ".join(f"{axis}={label}" for axis, label in cell.items()) + "}"


def _expand_cell(spec: StudySpec, base: dict, cell: dict[str, str], run_id: str, cells: CellIndex, path: Path,
                 overrides: list[str]) -> RunParams:
    """The cell's validated params: the base with its labels' overlays merged over it (mappings merge, lists are
    replaced, as OmegaConf merges), the overrides applied, then the interpolations resolved."""
    where = f"{path}: cell {run_id}"
    tree = copy.deepcopy(base)
    for axis, label in cell.items():
        merge_into(tree, spec.axes[axis][label] or {})
    tree.update(study=spec.study, run=run_id, axis=dict(cell))
    for override in overrides:  # before resolving, so ${run_dir:...} follows an overridden results_dir
        apply_override(tree, override, where)
    study_dir = Path(tree.get("results_dir", "results")) / spec.study

    def run_dir(*selectors: str) -> str:
        """${run_dir:domain.code,defense.none}: the folder of the one cell with those labels."""
        wanted = dict(selector.split(".", 1) for selector in selectors)
        matches = cells.matching(wanted)
        if len(matches) != 1:
            raise ValueError(f"run_dir:{','.join(selectors)} matches {len(matches)} cells (needs exactly one)")
        return str(study_dir / matches[0])

    resolve_interpolations(tree, {"run_dir": run_dir, "study_dir": lambda: str(study_dir)}, where)
    tree.pop("axis")
    params = params_from_dict(tree, where)
    check_write_targets(params, where)  # before anything runs, not when the node starts
    return params


class CellIndex:
    """The cells of a study, looked up by some of their labels (`${run_dir:domain.code,defense.none}`) through one
    dictionary per set of axes asked about, so a study whose every cell names another stays linear in its size."""

    def __init__(self, cells: dict[str, dict[str, str]]):
        self.cells = cells
        self._by_axes: dict[tuple[str, ...], dict[tuple, list[str]]] = {}

    def matching(self, wanted: dict[str, str]) -> list[str]:
        axes = tuple(sorted(wanted))
        if axes not in self._by_axes:
            index: dict[tuple, list[str]] = {}
            for run_id, cell in self.cells.items():
                index.setdefault(tuple(cell.get(axis) for axis in axes), []).append(run_id)
            self._by_axes[axes] = index
        return self._by_axes[axes].get(tuple(wanted[axis] for axis in axes), [])


def _node_dir_key(path: str | Path) -> str:
    return os.path.normpath(str(path))


def _path_and_parents(key: str):
    """'a/b/c', 'a/b', 'a': the folders a normalised path lies in, itself included."""
    while key:
        yield key
        parent = os.path.dirname(key)
        if parent == key:
            return
        key = parent


def _mentioned_paths(value) -> list[str]:
    if isinstance(value, dict):
        return [p for v in value.values() for p in _mentioned_paths(v)]
    if isinstance(value, (list, tuple)):
        return [p for v in value for p in _mentioned_paths(v)]
    return [value] if isinstance(value, str) else []


def _short_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def _refuse_a_cell_id(node_id: str, runs: dict[str, RunParams], source: Path | str) -> None:
    """A shared node (preparation, base evaluation) gets its own folder: a cell with that id would share it."""
    if node_id in runs:
        raise ParamsError(f"{source}: cell {node_id} has the id of a shared step's folder (a preparation or base "
                          "evaluation); rename a label")


def _graph(runs: dict[str, RunParams], base_evaluation: bool, source: Path | str = "study") -> dict[str, Node]:
    from emalib.runs.results import base_run_name

    nodes: dict[str, Node] = {}
    artifacts: dict[str, str] = {}  # a shared artifact's path -> the node that writes it
    for run_id, params in runs.items():
        update: dict[str, Any] = {}
        steps = list(params.steps)
        deps: list[str] = []
        for step, (defense_names, field_name) in shared_artifacts().items():  # the defenses' descriptors
            block = next((b for b in params.defenses if b.name in defense_names), None)
            artifact = getattr(block, field_name, None) if block is not None else None
            if step not in steps or artifact is None:
                continue  # no shared artifact: the step stays inside the run
            slug = re.sub(r"[^A-Za-z0-9_-]+", "-", Path(artifact).name)[:60]  # the id is a folder name
            node_id = f"prep-{step}-{slug}-{_short_hash(_node_dir_key(artifact))}"
            if node_id not in nodes:
                _refuse_a_cell_id(node_id, runs, source)
                nodes[node_id] = Node(node_id, "prepare", params.model_copy(
                    update={"run": node_id, "steps": (step,), "evaluate_base": False}))
            artifacts[_node_dir_key(artifact)] = node_id
            steps.remove(step)
            deps.append(node_id)
        if base_evaluation and "evaluate" in steps:
            node_id = base_run_name(params)
            if node_id not in nodes:
                _refuse_a_cell_id(node_id, runs, source)
                nodes[node_id] = Node(node_id, "base", params.model_copy(
                    update={"run": node_id, "steps": ("evaluate_base",), "evaluate_base": True, "defenses": ()}))
            update["evaluate_base"] = False
        update["steps"] = tuple(steps)
        nodes[run_id] = Node(run_id, "run", params.model_copy(update=update), deps)
    # Every node depends on the nodes whose folders its params mention, and on the preparatory node of every shared
    # artifact they mention (a CAFT run reading the persona vector another run's step writes).
    folders = {**artifacts, **{_node_dir_key(node.run_dir): node_id for node_id, node in nodes.items()}}
    for node_id, node in nodes.items():
        for text in _mentioned_paths(node.params.model_dump(mode="json")):
            if "/" not in text and os.sep not in text:
                continue  # a node folder is <results_dir>/<study>/<node>: a path without a separator is none
            for folder in _path_and_parents(_node_dir_key(text)):  # a lookup per parent, not a scan of all nodes
                other = folders.get(folder)
                if other is not None and other != node_id and other not in node.deps:
                    node.deps.append(other)
    order = graphlib.TopologicalSorter({n: node.deps for n, node in nodes.items()})
    try:
        ordered = list(order.static_order())
    except graphlib.CycleError as err:
        raise ParamsError(f"{source}: runs depend on each other in a cycle: {' -> '.join(err.args[1])}") from None
    return {node_id: nodes[node_id] for node_id in ordered}


def write_node_params(study: Study) -> dict[str, Path]:
    """Each node's resolved params under results/<study>/_study/params/<node>.yaml (what its execution reads)."""
    from emalib.core.io import atomic_write_text

    folder = inside(study.study_dir / STUDY_FOLDER, study.runs[0].params.results_dir) / "params"
    paths = {}
    for node_id, node in study.nodes.items():
        target = folder / f"{node_id}.yaml"
        text = dump_params(node.params)
        if not target.is_file() or target.read_text() != text:
            atomic_write_text(target, text)
        paths[node_id] = target
    return paths
