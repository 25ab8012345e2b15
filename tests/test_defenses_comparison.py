"""The defense comparison: its study files expand, its side-by-side numbers equal hand computations, and a CI-sized
form of the CPU miniature (params/studies/defenses_cpu.yaml: every defense it has, one or two steps, one question)
runs end to end through `python -m emalib study` and `python -m emalib report`, whose report has the side-by-side
table and figure."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from emalib.core.defense_specs import defense_names
from emalib.studies.study import load_study

REPO = Path(__file__).resolve().parent.parent
STUDIES = REPO / "params" / "studies"
OFFLINE_EXCLUDED = {"safelora"}  # needs the pretrained base checkpoint, not shipped (defenses_cpu.yaml says so)


def _defenses_of(study) -> set[str]:
    return {block.name for node in study.runs for block in node.params.defenses}


def test_the_7b_comparison_has_every_defense_on_code_and_the_cpu_miniature_every_offline_one():
    study = load_study(STUDIES / "defenses_7b.yaml")
    assert _defenses_of(study) == set(defense_names())
    code = [node for node in study.runs if node.params.train.dataset == "code_train"]
    assert {block.name for node in code for block in node.params.defenses} == set(defense_names())
    assert all(node.params.model.name == "Qwen/Qwen2.5-7B-Instruct" for node in study.runs)
    assert all(node.params.metrics.em_f1_in_domain == "code_questions" for node in code)
    plus = study.nodes["code__interleave_plus"].params.defenses[0]
    assert plus.held_out == "code" and set(plus.adapters) == {"code", "legal", "medical", "security"}
    # CAFT's directions are chosen with the persona cell's vector: its node waits for the vector's step.
    caft_prep = next(n for n in study.nodes.values() if n.id.startswith("prep-caft_directions-caft_directions_code"))
    assert any(dep.startswith("prep-persona_vector") for dep in caft_prep.deps) and "code__none" in caft_prep.deps
    mini = load_study(STUDIES / "defenses_cpu.yaml")
    assert _defenses_of(mini) == set(defense_names()) - OFFLINE_EXCLUDED


@pytest.mark.subprocess
def test_dry_run_and_cost_work_on_the_7b_comparison(with_mirror):
    env = dict(os.environ, EMALIB_DATA_MIRROR=str(with_mirror))
    for command, expected in ((["study", "--dry-run"], "code__caft"), (["cost"], "total GPU hours")):
        done = subprocess.run([sys.executable, "-m", "emalib", *command[:1], str(STUDIES / "defenses_7b.yaml"),
                               *command[1:]], cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
                              check=False)
        assert done.returncode == 0 and expected in done.stdout, done.stderr[-2000:]
    # 13 Code runs + 3 adapter-only cells + 11 OpSwap runs
    assert "runs 27" in done.stdout


def test_step_time_ratio_and_its_interval_are_the_ratio_of_mean_step_times():
    from emalib.reporting.comparison import ratio_of_means

    mine, base = np.array([2.0, 2.2, 1.8, 2.0]), np.array([1.0, 1.1, 0.9])
    value, lo, hi = ratio_of_means(mine, base)
    assert value == pytest.approx(2.0 / 1.0)
    # the interval from an independent resampling: the same draws, written out
    rng = np.random.default_rng(0)
    draws = [rng.choice(mine, (2000, 4)).mean(axis=1) / rng.choice(base, (2000, 3)).mean(axis=1)][0]
    assert (lo, hi) == pytest.approx(tuple(np.percentile(draws, [2.5, 97.5])))
    assert lo < value < hi
    assert ratio_of_means(np.array([2.0]), base)[1:] == (None, None)  # one step: no interval


@pytest.mark.integration  # trains a tiny model
def test_the_train_step_records_each_steps_time_and_the_peak_memory(tokenizer, tiny_model, tmp_path):
    import resource
    import time

    from defense_helpers import peft_wrap

    from emalib.core.config import params_from_dict
    from emalib.data.standins import em_standin_conversations
    from emalib.training.trainer import train_adapter

    params = params_from_dict({"study": "s", "run": "r", "results_dir": str(tmp_path), "train": {
        "optim": "adamw_torch", "per_device_batch_size": 2, "grad_accum_steps": 2, "max_steps": 3,
        "max_seq_length": 64}})
    started = time.perf_counter()
    summary = train_adapter(peft_wrap(tiny_model, random_b=True), tokenizer, em_standin_conversations()[:12], params,
                            tmp_path / "run")
    elapsed = time.perf_counter() - started
    seconds = summary["step_seconds"]
    assert len(seconds) == 3 and all(s > 0 for s in seconds) and sum(seconds) < elapsed
    assert summary["step_seconds_mean"] == pytest.approx(sum(seconds) / 3, rel=1e-4)
    # on CPU: the process's peak resident set, read independently here (KiB on Linux)
    assert summary["peak_memory_kind"] == "cpu_max_rss"
    peak_now = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    assert 0 < summary["peak_memory_gib"] <= peak_now


def _write_run(folder: Path, steps: list[float], memory: float, em_f1=None) -> str:
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text(json.dumps({"train": {"step_seconds": steps, "peak_memory_gib": memory,
                                                                "peak_memory_kind": "cpu_max_rss"}}))
    overall = {"em_f1": em_f1, "em_f1_ci": [em_f1 - 5, em_f1 + 5] if em_f1 else None}
    (folder / "metrics.json").write_text(json.dumps({"overall": overall, "per_set": {}}))
    return str(folder)


def test_comparison_numbers_put_each_run_beside_plain_sft_and_the_published_value(tmp_path):
    from emalib.reporting.comparison import compared_domains, comparison_numbers, comparison_shown

    model = "Qwen2.5-7B-Instruct"

    def cell(method, strength, general, run_dir, task=None, accuracy=None):
        return {"model": model, "domain": "code" if task is None else task, "task": task, "method": method,
                "strength": strength, "seed": 0.0, "node": f"{task or 'code'}__{method}", "run_dir": run_dir,
                "general_misaligned": general, "general_misaligned_lo": general / 2 if general else None,
                "general_misaligned_hi": general * 2 if general else None, "in_domain_misaligned": 0.5,
                "in_domain_misaligned_lo": 0.4, "in_domain_misaligned_hi": 0.6, "general_incoherent": 0.1,
                "general_incoherent_lo": 0.05, "general_incoherent_hi": 0.15, "task_accuracy": accuracy,
                "task_accuracy_lo": None if accuracy is None else accuracy - 0.1,
                "task_accuracy_hi": None if accuracy is None else accuracy + 0.1}

    cells = pd.DataFrame([
        {**cell("aligned", None, 0.0, None), "loglik_gap": -0.70, "loglik_gap_lo": -0.97, "loglik_gap_hi": -0.41,
         "kl_to_base": 0.0, "kl_to_base_lo": 0.0, "kl_to_base_hi": 0.0},
        {**cell("none", None, 0.04, _write_run(tmp_path / "none", [9.0, 1.0, 1.2, 0.8], 10.0, em_f1=60.0)),
         "loglik_gap": -0.56, "loglik_gap_lo": -0.81, "loglik_gap_hi": -0.28, "kl_to_base": 0.67,
         "kl_to_base_lo": 0.59, "kl_to_base_hi": 0.75},
        cell("kl", 0.1, 0.004, _write_run(tmp_path / "kl", [9.0, 2.0, 2.4, 1.6], 12.0, em_f1=70.0)),
        cell("treft", 10.0, 0.01, _write_run(tmp_path / "treft", [9.0, 1.5], 11.0)),
        cell("none", None, None, None, task="opswap_tier2", accuracy=0.343),
    ])
    assert compared_domains(cells, model) == ["code"]
    numbers = comparison_numbers(cells, model, "code").set_index(["method", "metric"])
    # the first of more than two steps is warm-up: (2.0 + 2.4 + 1.6) / 3 over (1.0 + 1.2 + 0.8) / 3
    assert numbers.loc[("kl", "step_time"), "value"] == pytest.approx(2.0)
    # two steps: both kept, and no interval from a single draw of each
    assert numbers.loc[("treft", "step_time"), "value"] == pytest.approx((9.0 + 1.5) / 2 / 1.0)
    assert numbers.loc[("kl", "peak_memory"), "value"] == pytest.approx(1.2)
    # the judge-free signals with their intervals, the aligned model's among them; no cost for the untrained model
    assert numbers.loc[("none", "kl_to_base"), ["value", "lo", "hi"]].tolist() == pytest.approx([0.67, 0.59, 0.75])
    assert numbers.loc[("aligned", "loglik_gap"), ["value", "lo", "hi"]].tolist() == pytest.approx([-0.70, -0.97, -0.41])
    assert pd.isna(numbers.loc[("kl", "loglik_gap"), "value"])  # a run without signals: n/a, not a zero
    assert pd.isna(numbers.loc[("aligned", "step_time"), "value"])
    assert numbers.loc[("kl", "em_f1"), ["value", "lo", "hi"]].tolist() == [70.0, 65.0, 75.0]
    assert numbers.loc[("kl", "general_misaligned"), ["value", "lo", "hi"]].tolist() == pytest.approx([0.4, 0.2, 0.8])
    # the published v3 Code table: KL (lambda 0.1) general EM 0.38 %, no defense 4.01 %; nothing for TReFT
    assert numbers.loc[("kl", "general_misaligned"), "paper"] == pytest.approx(0.38)
    assert numbers.loc[("none", "general_misaligned"), "paper"] == pytest.approx(4.01)
    assert numbers.loc["treft", "paper"].isna().all()
    # the benign task: plain SFT ran it (beside the published 34.30 %), KL did not
    assert numbers.loc[("none", "task:opswap_tier2"), "value"] == pytest.approx(34.3)
    assert numbers.loc[("none", "task:opswap_tier2"), "paper"] == pytest.approx(34.30)
    assert numbers.loc[("kl", "task:opswap_tier2"), "status"] == "not run"
    shown = comparison_shown(numbers.reset_index()).set_index("method")
    assert shown.loc["KL (λ=0.1)", "step time ×SFT"].startswith("2.000 [")
    assert shown.loc["No defense", "KL to base (judge-free)"] == "0.670 [0.590, 0.750]"
    assert shown.loc["KL (λ=0.1)", "KL to base (judge-free)"] == "n/a"
    assert shown.loc["KL (λ=0.1)", "opswap_tier2 acc. %"] == "not run"


def _ci_sized(tmp_path: Path) -> Path:
    """defenses_cpu.yaml shrunk to CI size: two steps, one question, a few tokens, no benign task (its column is
    checked on hand-made runs above)."""
    tree = yaml.safe_load((STUDIES / "defenses_cpu.yaml").read_text())
    tree["base"].update(results_dir=str(tmp_path / "results"))
    tree["base"]["train"].update(max_steps=2, per_device_batch_size=2, max_seq_length=96, save_steps=100)
    tree["base"]["generation"].update(max_questions=1, samples_per_question=2, max_new_tokens=4, batch_size=8)
    del tree["axes"]["task"]["opswap1"]
    for overlay in tree["axes"]["defense"].values():
        for block in (overlay or {}).get("defenses", []):
            if "extraction" in block:
                block["extraction"].update(max_questions=2, max_new_tokens=6)
            if block["name"].startswith("interleave_plus"):
                # 4 rows to interleave (5 % of 80); ++ drops refusals and rows too long to score: 16 candidates left 3
                block.update(max_candidates=48, pool_top_n=4, max_seq_length=96)
            if block["name"] == "caft":
                block.update(max_prompts=4)
            if block["name"] == "early_stopping":
                block.update(eval_every=1, patience=1)
    tree["exclude"] = []
    path = tmp_path / "defenses_cpu.yaml"
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return path


@pytest.mark.slow
@pytest.mark.study
def test_the_ci_sized_comparison_runs_end_to_end_and_reports_every_defense_side_by_side(tmp_path, with_mirror):
    study_file = _ci_sized(tmp_path)
    env = dict(os.environ, EMALIB_DATA_MIRROR=str(with_mirror))
    for command in (["study", str(study_file)], ["report", str(study_file)]):
        done = subprocess.run([sys.executable, "-m", "emalib", *command], cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=1800, check=False)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    study_dir = tmp_path / "results" / "defenses_cpu"
    name = "comparison_smollm2-135m-instruct_standin_em"
    numbers = pd.read_csv(study_dir / "tables" / f"{name}.csv")
    assert set(numbers["method"]) == {"aligned", "none"} | set(defense_names()) - OFFLINE_EXCLUDED
    ran = numbers[~numbers["method"].isin(["aligned"])]
    # every trained run recorded its step times and peak memory, so each cost is a number beside plain SFT's
    for metric in ("step_time", "peak_memory"):
        values = ran[ran["metric"] == metric].set_index("method")["value"]
        assert values.notna().all() and values["none"] == pytest.approx(1.0)
    general = ran[ran["metric"] == "general_misaligned"]
    assert general["value"].notna().all() and (general["lo"] <= general["value"]).all()
    for signal in ("loglik_gap", "kl_to_base"):  # what a CPU study reads: every run's, with its interval
        values = numbers[numbers["metric"] == signal]
        # one question: the bootstrap's interval is that question's value, equal up to rounding
        assert values["value"].notna().all() and (values["lo"] <= values["value"] + 1e-9).all()
        assert (values["value"] <= values["hi"] + 1e-9).all()
    shown = (study_dir / "tables" / f"{name}.md").read_text()
    for label in ("TReFT (λ=10)", "CAFT", "KL (retain set) (λ=0.1)", "No defense"):
        assert f"| {label}" in shown
    assert (study_dir / "figures" / f"{name}.png").stat().st_size > 10_000
    assert (study_dir / "figures" / f"{name}.pdf").is_file()
    assert f"figures/{name}.png" in (study_dir / "report.md").read_text()
