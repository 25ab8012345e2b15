"""Studies: expansion into validated runs, the derived dependency graph, and execution with resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from emalib.errors import ParamsError
from emalib.study import load_study

REPO = Path(__file__).resolve().parent.parent


def _write(path: Path, tree: dict) -> Path:
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return path


def test_axes_expand_into_validated_runs_with_stable_ids_and_derived_dependencies(tmp_path):
    study_file = _write(tmp_path / "s.yaml", {
        "study": "grid", "base": {"results_dir": str(tmp_path / "results"), "study": "x", "run": "x"},
        "axes": {"domain": {"code": {"train": {"dataset": "code_train"}}, "legal": {"train": {"dataset": "legal_train"}}},
                 "defense": {"none": {}, "kl": {"defenses": [{"name": "kl", "weight": 0.5}]},
                             "ipp": {"steps": ["interleave_selection", "train", "evaluate"],
                                     "defenses": [{"name": "interleave_plusplus", "held_out": "${axis.domain}",
                                                   "adapters": {"code": "${run_dir:domain.code,defense.none}/adapter",
                                                                "legal": "${run_dir:domain.legal,defense.none}/adapter"},
                                                   "scores_path": str(tmp_path / "shared" / "s_${axis.domain}.jsonl")}]}}},
        "exclude": [{"domain": "legal", "defense": "kl"}]})
    study = load_study(study_file)
    assert {n.id for n in study.runs} == {"code__none", "code__kl", "code__ipp", "legal__none", "legal__ipp"}
    code_ipp = study.nodes["code__ipp"]
    block = code_ipp.params.defenses[0]
    assert block.held_out == "code" and block.adapters["legal"] == str(tmp_path / "results" / "grid" / "legal__none"
                                                                        / "adapter")
    assert code_ipp.params.steps == ("train", "evaluate")  # the scoring moved to its shared node
    prep = [d for d in code_ipp.deps if d.startswith("prep-interleave_selection")]
    assert len(prep) == 1 and set(code_ipp.deps) == {prep[0], "code__none", "legal__none"}
    assert study.nodes[prep[0]].params.steps == ("interleave_selection",)
    assert set(study.nodes[prep[0]].deps) == {"code__none", "legal__none"}  # it scores with those adapters
    order = list(study.nodes)
    assert all(order.index(d) < order.index(n) for n, node in study.nodes.items() for d in node.deps)
    assert study.nodes["code__kl"].params.defenses[0].weight == 0.5
    # One aligned-model evaluation per distinct evaluation config; runs no longer evaluate the base themselves.
    bases = [n for n in study.nodes.values() if n.kind == "base"]
    assert len(bases) == 1 and bases[0].params.steps == ("evaluate_base",)
    assert not any(n.params.evaluate_base for n in study.runs)


def test_overrides_apply_to_every_run_including_list_entries(tmp_path):
    study_file = _write(tmp_path / "s.yaml", {
        "study": "o", "base": {"study": "x", "run": "x", "defenses": [{"name": "kl"}]},
        "axes": {"lr": {"low": {"train": {"learning_rate": 1e-5}}, "high": {"train": {"learning_rate": 1e-4}}}}})
    study = load_study(study_file, ["train.max_steps=3", "defenses.kl.weight=0.25"])
    assert all(n.params.train.max_steps == 3 and n.params.defenses[0].weight == 0.25 for n in study.runs)


@pytest.mark.parametrize("axes, message", [
    ({"d": {"a": {"train": {"learning_rat": 1}}}}, "cell a: unknown key 'train.learning_rat'"),
    ({"d": {"a": {"defenses": [{"name": "kl", "weight": -1}]}}}, "cell a: key 'defenses.0.kl.weight'"),
    ({"d": {"a": {"train": {"dataset": "${run_dir:d.zzz}"}}}}, "cell a: .*matches 0 cells"),
])
def test_an_invalid_cell_fails_before_anything_runs_naming_the_cell_and_key(tmp_path, axes, message):
    study_file = _write(tmp_path / "s.yaml", {"study": "bad", "base": {"study": "x", "run": "x"}, "axes": axes})
    with pytest.raises(ParamsError, match=message) as caught:
        load_study(study_file)
    assert str(study_file) in str(caught.value)
    assert not (tmp_path / "results").exists()


def test_paper_base_evaluations_no_longer_overwrite_each_other():
    """The four no-defense paper params each evaluate the aligned model on their own question sets: four folders."""
    from emalib.config import load_params
    from emalib.results import base_run_name

    names = {base_run_name(load_params(REPO / "params" / "paper" / f"{d}.yaml"))
             for d in ("code", "legal", "medical", "security")}
    assert len(names) == 4


def test_a_base_folder_refuses_an_evaluation_with_another_config(tmp_path):
    from emalib.config import params_from_dict
    from emalib.results import base_run_name, prepare_run_dir

    one = params_from_dict({"study": "s", "run": "a", "results_dir": str(tmp_path)})
    same = params_from_dict({"study": "s", "run": "b", "results_dir": str(tmp_path), "train": {"max_steps": 3}})
    other = params_from_dict({"study": "s", "run": "c", "results_dir": str(tmp_path),
                              "generation": {"question_sets": ["general", "code_questions"]}})
    assert base_run_name(one) == base_run_name(same) != base_run_name(other)
    folder = tmp_path / "s" / base_run_name(one)
    prepare_run_dir(one, folder)
    prepare_run_dir(same, folder)  # training settings do not change the base evaluation: shared
    with pytest.raises(ParamsError, match="different params"):
        prepare_run_dir(other, folder)


@pytest.mark.parametrize("name", ["paper_main_7b"])
def test_paper_study_files_expand_and_validate_with_the_papers_run_count(name):
    study = load_study(REPO / "params" / "studies" / f"{name}.yaml")
    assert len(study.runs) == {"paper_main_7b": 36}[name]


# --- execution: a small study on the embedded model, killed midway and restarted ----------------------------------

def small_study(tmp_path: Path, name: str = "mini") -> Path:
    """4 runs on the embedded model: no defense, KL, persona steering reading a shared vector, and Interleaving++
    scoring candidates with the no-defense run's adapter (a shared scores file), plus the base evaluation."""
    shared = tmp_path / "shared"
    return _write(tmp_path / f"{name}.yaml", {
        "study": name,
        "base": {"study": "x", "run": "x", "seed": 0, "results_dir": str(tmp_path / "results"),
                 "model": {"name": "smollm2-135m-instruct"},
                 "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
                 "train": {"dataset": "standin_em_train", "max_examples": 8, "optim": "adamw_torch",
                           "per_device_batch_size": 2, "grad_accum_steps": 1, "max_steps": 1, "max_seq_length": 64},
                 "generation": {"question_sets": ["standin_general"], "max_questions": 1, "samples_per_question": 1,
                                "max_new_tokens": 6, "batch_size": 4},
                 "judge": {"backend": "local", "model": "smollm2-135m-instruct", "min_numeric_mass": 0.0}},
        "axes": {"defense": {
            "none": {},
            "kl": {"defenses": [{"name": "kl"}]},
            "persona": {"steps": ["persona_vector", "train", "evaluate"],
                        "defenses": [{"name": "persona_steering", "layer": 10, "alpha": 2.0,
                                      "vector_path": str(shared / "evil.pt"),
                                      "extraction": {"filter_pairs": False, "max_questions": 1,
                                                     "samples_per_question": 1, "max_new_tokens": 6}}]},
            "ipp": {"steps": ["interleave_selection", "train", "evaluate"],
                    "defenses": [{"name": "interleave_plusplus", "source": "wildguard_benign_sample", "ratio": 0.25,
                                  "adapters": {"standin": "${run_dir:defense.none}/adapter"},
                                  "use_all_adapters": True, "max_candidates": 16, "pool_top_n": 2,
                                  "max_seq_length": 64, "scores_path": str(shared / "scores.jsonl")}]}}}})


def _states(study_dir: Path) -> dict[str, str]:
    folder = study_dir / "_study" / "status"
    states = {}
    for path in folder.glob("*.json") if folder.is_dir() else []:
        try:
            states[path.stem] = json.loads(path.read_text())["state"]
        except (json.JSONDecodeError, KeyError):
            continue
    return states


def run_killed_then_restarted(study_file: Path, executor: str, extra: list[str] = (), cleanup=None) -> Path:
    """Start the study, kill it once two nodes are done, restart it to the end; returns the study folder."""
    study = load_study(study_file)
    command = [sys.executable, "-m", "emalib", "study", str(study_file), "--executor", executor, *extra]
    env = dict(os.environ, EMALIB_DATA_MIRROR=os.environ.get("EMALIB_DATA_MIRROR", str(REPO.parent / "shared/data")))
    first = subprocess.Popen(command, cwd=REPO, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 900
    while sum(s == "done" for s in _states(study.study_dir).values()) < 2:
        assert first.poll() is None, first.stderr.read()[-3000:]
        assert time.time() < deadline, "the study made no progress"
        time.sleep(1)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    if cleanup:
        cleanup()
    done_before = {n for n, s in _states(study.study_dir).items() if s == "done"}
    assert 2 <= len(done_before) < len(study.nodes)
    second = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=1800, check=False)
    assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-3000:]
    return study.study_dir, done_before


def check_resumed_study(study_file: Path, study_dir: Path, done_before: set[str]) -> None:
    import pandas as pd

    from emalib.results import read_manifest

    study = load_study(study_file)
    assert set(_states(study_dir).values()) == {"done"} and len(_states(study_dir)) == len(study.nodes)
    for node_id, node in study.nodes.items():
        executions = read_manifest(node.run_dir).get("step_executions", {})
        # Every step ran to its end exactly once: nothing finished before the kill was redone.
        assert executions == {step: 1 for step in node.params.steps}, (node_id, executions)
    index = pd.read_parquet(study_dir / "index.parquet")
    overall = index[index["question_set"] == "all"]
    assert sorted(overall["node"]) == sorted(n for n, node in study.nodes.items() if node.kind in ("run", "base"))
    row = overall.set_index("node").loc["kl"]
    assert row["defenses"] == "kl" and row["params.train.dataset"] == "standin_em_train"
    assert 0 <= row["misaligned_rate"] <= 1 and row["misaligned_rate_ci_lo"] <= row["misaligned_rate"]


@pytest.mark.slow
@pytest.mark.study
def test_small_study_on_the_local_executor_resumes_after_a_kill(tmp_path, with_mirror):
    study_file = small_study(tmp_path)
    study = load_study(study_file)
    assert len(study.runs) == 4 and {n.kind for n in study.nodes.values()} == {"run", "prepare", "base"}
    assert "none" in study.nodes["ipp"].deps
    study_dir, done_before = run_killed_then_restarted(study_file, "local")
    check_resumed_study(study_file, study_dir, done_before)
