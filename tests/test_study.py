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
from analysis_checks import check_analysis
from slurm_fixture import slurm_cluster_fixture  # noqa: F401 (the slurm_cluster fixture)

from emalib.core.errors import ParamsError
from emalib.studies.study import load_study

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
                                                   "scores_path": str(tmp_path / "results" / "shared" / "s_${axis.domain}.jsonl")}]}}},
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
    from emalib.core.config import load_params
    from emalib.runs.results import base_run_name

    names = {base_run_name(load_params(REPO / "params" / "paper" / f"{d}.yaml"))
             for d in ("code", "legal", "medical", "security")}
    assert len(names) == 4


def test_a_base_folder_refuses_an_evaluation_with_another_config(tmp_path):
    from emalib.core.config import params_from_dict
    from emalib.runs.results import base_run_name, prepare_run_dir

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


PAPER_GRIDS = {  # study file -> runs: the paper's grid (axes multiplied out, minus exclusions)
    "paper_main_7b": 4 * 9, "paper_main_32b": 4 * 6, "paper_ratio_sweep_7b": 4 * (1 + 3 * 4),
    "paper_strength_sweep_7b": 4 * (1 + 3 + 3 + 4 + 4), "paper_benign_7b": 4 * 8, "paper_seeds_7b": 2 * 4 * 4}


@pytest.mark.parametrize("name", sorted(PAPER_GRIDS))
def test_paper_study_files_expand_and_validate_with_the_papers_run_count(name):
    study = load_study(REPO / "params" / "studies" / f"{name}.yaml")
    assert len(study.runs) == PAPER_GRIDS[name]
    assert all(node.params.generation.use_system_prompt is False for node in study.nodes.values())


def test_every_study_file_in_the_repository_is_listed_here():
    files = {p.stem for p in (REPO / "params" / "studies").glob("paper_*.yaml")} - {"paper_7b_base"}
    assert files == set(PAPER_GRIDS)


def test_the_ratio_sweep_sets_each_runs_ratio_and_shares_one_scoring_per_domain():
    study = load_study(REPO / "params" / "studies" / "paper_ratio_sweep_7b.yaml")
    ratios = {n.id: n.params.defenses[0].ratio for n in study.runs if n.params.defenses}
    assert ratios["code__interleave_plusplus__0.2"] == 0.2 and ratios["legal__interleave__0.01"] == 0.01
    scorings = [n for n in study.nodes.values() if n.kind == "prepare"]
    assert len(scorings) == 4  # one per domain, read by its + and ++ runs at every ratio


# --- execution: a small study on the embedded model, killed midway and restarted ----------------------------------

def small_study(tmp_path: Path, name: str = "mini") -> Path:
    """4 runs on the embedded model: no defense, KL, persona steering reading a shared vector, and Interleaving++
    scoring candidates with the no-defense run's adapter (a shared scores file), plus the base evaluation."""
    shared = tmp_path / "results" / name / "_shared"  # inside results_dir: the runs write there
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

    from emalib.runs.results import read_manifest

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
    check_report_of_a_real_study(study_file, study_dir)
    # explore and report under papermill and in a Jupyter kernel, every run's entry points, the index, status
    check_analysis(study_dir, tmp_path / "analysis", study_file)


def check_report_of_a_real_study(study_file: Path, study_dir: Path) -> None:
    """The report of the study's real results (index.parquet): every run in the main table, a gap for what the study
    did not plan, Table 1 and Figure 1 from the same numbers, PNG and PDF written."""
    import pandas as pd

    completed = subprocess.run([sys.executable, "-m", "emalib", "report", str(study_file)], cwd=REPO,
                               capture_output=True, text=True, timeout=600, check=False)
    assert completed.returncode == 0, completed.stderr[-3000:]
    index = pd.read_parquet(study_dir / "index.parquet")
    main = pd.read_csv(study_dir / "tables" / "main_smollm2-135m-instruct_standin_em.csv")
    general = main[main["metric"] == "general_misaligned"].set_index("method")
    assert list(general.index) == ["aligned", "none", "kl", "persona_steering", "interleave_plusplus"]
    assert set(general["status"]) == {"done"} and general["paper"].isna().all()  # no published number for SmolLM2
    overall = index[index["question_set"] == "all"].set_index("node")
    assert general.loc["kl", "value"] == pytest.approx(100 * overall.loc["kl", "misaligned_rate"])
    symbols = {"keep_default_na": False, "na_values": [""]}  # "n/a" is a verdict here, not a missing value
    table1 = pd.read_csv(study_dir / "tables" / "table1_smollm2-135m-instruct.csv", **symbols).set_index("method")
    assert table1.loc["safelora", "no_em"] == "not run" and table1.loc["kl", "learns_well"] == "not run"
    free = pd.read_csv(study_dir / "tables" / "table1_judge_free_smollm2-135m-instruct.csv", **symbols) \
        .set_index("method")
    gap = overall["signal.loglik_gap"]
    base = next(n for n in overall.index if n.startswith("base-"))
    if gap["none"] > gap[base]:
        expected = 1 - (gap["kl"] - gap[base]) / (gap["none"] - gap[base])
        assert float(free.loc["kl", "no_em_value"]) == pytest.approx(expected)
    else:  # fine-tuning did not move toward the misaligned answers: nothing to reduce
        assert free.loc["kl", "no_em"] == "n/a"
    for name in ("mini", "figure1_smollm2-135m-instruct"):
        assert (study_dir / "figures" / f"{name}.png").is_file() and (study_dir / "figures" / f"{name}.pdf").is_file()
    assert (study_dir / "report.md").read_text().count("\n## ") >= 5


@pytest.mark.slow
@pytest.mark.study
def test_small_study_on_a_local_ray_instance_resumes_after_a_kill(tmp_path, with_mirror):
    pytest.importorskip("ray", reason="ray is not installed (pip install .[cluster])")

    def stop_ray():  # the killed driver's local Ray instance may outlive it
        subprocess.run([str(Path(sys.executable).parent / "ray"), "stop", "--force"], capture_output=True,
                       timeout=120, check=False)

    study_file = small_study(tmp_path, "mini_ray")
    try:
        study_dir, done_before = run_killed_then_restarted(study_file, "ray", cleanup=stop_ray)
    finally:
        stop_ray()
    check_resumed_study(study_file, study_dir, done_before)


@pytest.mark.slow
@pytest.mark.study
@pytest.mark.slurm
def test_small_study_on_a_local_slurm_cluster_resumes_after_a_kill(tmp_path, with_mirror, slurm_cluster):
    def cancel_jobs():  # killing the submitting process leaves its Slurm jobs running: cancel them as a crash would
        subprocess.run(["scancel", "--name", "emalib-mini_slurm"], capture_output=True, timeout=60, check=False)
        deadline = time.time() + 120
        while time.time() < deadline:
            queue = subprocess.run(["squeue", "-h", "--name", "emalib-mini_slurm"], capture_output=True, text=True,
                                   timeout=60, check=False)
            if not queue.stdout.strip():
                break
            time.sleep(1)

    study_file = small_study(tmp_path, "mini_slurm")
    study_dir, done_before = run_killed_then_restarted(
        study_file, "slurm", ["--slurm-partition", slurm_cluster["partition"], "--cpus-per-run", "1",
                              "--mem-gb", "4"], cleanup=cancel_jobs)
    check_resumed_study(study_file, study_dir, done_before)


def test_a_results_dir_override_moves_every_derived_path_with_it(tmp_path):
    study = load_study(REPO / "params" / "studies" / "paper_main_7b.yaml", [f"results_dir={tmp_path}"])
    block = study.nodes["code__interleave_plusplus"].params.defenses[0]
    assert block.adapters["legal"] == str(tmp_path / "paper_main_7b" / "legal__none" / "adapter")
    assert block.scores_path == str(tmp_path / "paper_main_7b" / "_shared" / "interleave_scores_code.jsonl")
    assert {"legal__none", "code__none"} <= set(study.nodes["code__interleave_plusplus"].deps)


@pytest.mark.integration  # trains or loads a model: seconds, not milliseconds
def test_the_cost_estimate_counts_every_judged_answer(with_mirror):
    from emalib.studies.study_cost import estimate

    cost = estimate(load_study(REPO / "params" / "studies" / "paper_main_7b.yaml"))
    # 36 runs + 4 aligned-model evaluations, each (24 general + 30 in-domain) x 100 samples x 2 judge prompts.
    assert (cost["runs"], cost["evaluations"], cost["judge_calls"]) == (36, 40, 40 * 54 * 100 * 2)
    assert cost["dollars_batch"] == pytest.approx(cost["dollars_online"] / 2, abs=0.01) and cost["dollars_online"] > 0


@pytest.mark.parametrize("text", [
    "${axis.domain}", "${seed}", "x_${seed}_${axis.domain}.jsonl", "${study_dir:}/_shared/v_${axis.domain}.pt",
    "${run_dir:domain.code,defense.none}/adapter", "${run_dir: domain.${axis.domain} , defense.none}/adapter",
    "${train.lr}", "${lst[1]}", "${flag}-${none}", "${spaced}/y",  # a value with a space: left to OmegaConf
    "${oc.select:train.lr,0}", "\\${axis.domain}", "${run_dir:'domain.code'}", "plain", "${axis.domain}${axis.domain}",
])
def test_interpolations_resolve_as_omegaconf_resolves_them(text):
    """The study expansion resolves plain forms itself (emalib.core.interpolation, for speed) and the rest with
    OmegaConf: both must give what OmegaConf alone gives."""
    from omegaconf import OmegaConf

    from emalib.core.interpolation import resolve_interpolations

    resolvers = {"run_dir": lambda *s: "results/st/" + "__".join(x.split(".")[1] for x in s),
                 "study_dir": lambda: "results/st"}
    tree = {"seed": 3, "axis": {"domain": "code"}, "train": {"lr": 1e-05}, "lst": ["a", 2.5], "flag": True,
            "none": None, "spaced": "a b", "value": text}
    for name, function in resolvers.items():
        OmegaConf.register_resolver(name, function, replace=True)
    expected = OmegaConf.to_container(OmegaConf.create(tree), resolve=True)["value"]
    resolve_interpolations(tree, resolvers, "here")
    assert tree["value"] == expected and type(tree["value"]) is type(expected)
