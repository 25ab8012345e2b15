"""The package's architecture (docs/architecture.md): one-way layers checked by import-linter's contracts
(pyproject.toml), and no import cycle, imports inside functions included."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from import_graph import cycles, import_graph

ROOT = Path(__file__).resolve().parent.parent


def _lint_imports(project: Path) -> subprocess.CompletedProcess:
    """`lint-imports` on a project folder (its pyproject.toml's contracts), importing emalib from that folder."""
    script = Path(sys.executable).with_name("lint-imports")
    command = [str(script)] if script.is_file() else [sys.executable, "-m", "importlinter.cli"]
    env = {**os.environ, "PYTHONPATH": str(project)}
    return subprocess.run([*command, "--no-cache", "--no-logo"], cwd=project, env=env, capture_output=True,
                          text=True, timeout=300, check=False)


def test_the_import_contracts_hold():
    result = _lint_imports(ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "3 kept, 0 broken" in result.stdout


def _copy_of_the_package(tmp_path: Path) -> Path:
    shutil.copytree(ROOT / "emalib", tmp_path / "emalib", ignore=shutil.ignore_patterns("__pycache__", "*.yaml"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def test_an_upward_import_inside_a_function_breaks_the_layers_contract(tmp_path):
    project = _copy_of_the_package(tmp_path)
    io_module = project / "emalib" / "core" / "io.py"
    io_module.write_text(io_module.read_text() + (
        "\n\ndef _upward():\n"
        "    from emalib.runs import pipeline  # deliberately upward: the core must not know the runs\n\n"
        "    return pipeline\n"))
    result = _lint_imports(project)
    assert result.returncode != 0
    assert "BROKEN" in result.stdout
    assert "emalib.core.io -> emalib.runs.pipeline" in result.stdout


def test_a_direct_torch_import_in_reporting_breaks_its_contract(tmp_path):
    project = _copy_of_the_package(tmp_path)
    writers = project / "emalib" / "reporting" / "writers.py"
    writers.write_text(writers.read_text() + "\n\ndef _heavy():\n    import torch\n\n    return torch\n")
    result = _lint_imports(project)
    assert result.returncode != 0
    assert "Reporting imports no deep-learning framework itself BROKEN" in " ".join(result.stdout.split())


def test_the_import_graph_has_no_cycle():
    graph = import_graph(ROOT / "emalib")
    assert len(graph) > 50  # the whole package was read
    assert "emalib.runs.pipeline" in graph["emalib.runs.prepare"]  # an import inside a function is counted
    assert cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle_closed_inside_a_function(tmp_path):
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("")
    (package / "a.py").write_text("from pkg.sub import b\n")
    (package / "sub" / "b.py").write_text("from pkg import c\n")
    (package / "c.py").write_text("def f():\n    from pkg import a\n    return a\n")
    (package / "d.py").write_text("from pkg import a\n")
    graph = import_graph(package)
    assert "pkg.a" in graph["pkg.c"]
    assert cycles(graph) == [["pkg.a", "pkg.c", "pkg.sub.b"]]


def _calls_of(name: str) -> set[str]:
    """The package's modules (paths from the package root) that call `name`(...) or `<x>.name(...)`."""
    import ast

    found = set()
    for path in (ROOT / "emalib").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call):
                called = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", None)
                if called == name:
                    found.add(str(path.relative_to(ROOT)))
    return found


def test_one_async_chat_client_for_the_judge_the_grader_and_persona_extraction():
    assert _calls_of("AsyncOpenAI") == {"emalib/evaluation/judge/chat_client.py"}
    assert {"emalib/evaluation/judge/openai_judge.py", "emalib/training/rl/grader.py"} <= _calls_of("chat_client")


def test_one_merge_rule_for_notebook_parameters_and_study_overlays():
    from emalib.core.config import merge_into

    overlay = {"train": {"lr": 2, "extra": {"a": [1]}}, "steps": ["evaluate"]}
    tree = {"train": {"lr": 1, "epochs": 3}, "steps": ["train", "evaluate"], "seed": 0}
    assert merge_into(tree, overlay) == {"train": {"lr": 2, "epochs": 3, "extra": {"a": [1]}}, "steps": ["evaluate"],
                                         "seed": 0}  # mappings merge, lists are replaced
    overlay["train"]["extra"]["a"].append(2)
    assert tree["train"]["extra"]["a"] == [1]  # the overlay's values are copied, not shared between cells
    assert _calls_of("merge_into") == {"emalib/core/config.py", "emalib/runs/notebook_params.py",
                                       "emalib/studies/study.py"}
