"""GRPO on the embedded model (CPU): the stand-in run's mean reward rises; the persona-injected and inoculated runs
complete through `python -m emalib run` (their notebooks), and the study figure draws the three curves together."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from emalib.core.config import load_params
from emalib.training.rl.rewards_log import REWARDS_CSV

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent
COLUMNS = ["step", "reward_mean", "reward_std", "reward_gsm8k_answer_mean", "reward_gsm8k_answer_std"]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return tmp_path_factory.mktemp("rl-results")


def test_grpo_on_the_standin_raises_the_mean_reward(results):
    from emalib.runs import pipeline

    params = load_params(REPO / "params/rl/standin_cpu.yaml", [f"results_dir={results}"])
    model, tokenizer = pipeline.rl(params)
    run_dir = params.run_dir
    frame = pd.read_csv(run_dir / REWARDS_CSV)
    steps = params.train.max_steps
    assert list(frame.columns[:5]) == COLUMNS and frame["step"].tolist() == list(range(1, steps + 1))
    assert (frame["reward_mean"] == frame["reward_gsm8k_answer_mean"]).all()  # one reward function, weight 1
    per_step = params.train.per_device_batch_size
    first, last = frame["reward_mean"][:2].mean(), frame["reward_mean"][-3:].mean()
    # A policy that does not learn keeps the success rate of its first steps (each completion scores 0 or 1).
    # The last three steps' successes are then at most binomial(3 * per_step, p) with p the first steps' rate
    # (floored at 0.1, above which a non-learning policy would show itself in the first steps too). Require both a
    # margin of 0.15 and a count that such a policy reaches with probability < 1 %.
    successes = round(last * 3 * per_step)
    assert last >= first + 0.15, frame[["step", "reward_mean"]].to_dict("records")
    assert binomial_tail(successes, 3 * per_step, max(first, 0.1)) < 0.01
    for suffix in ("png", "pdf"):
        assert (run_dir / f"rl_rewards.{suffix}").stat().st_size > 1000
    log = json.loads((run_dir / "rl_log.json").read_text())
    assert log["global_step"] == steps and log["reward_functions"] == ["gsm8k_answer"]
    assert (run_dir / "adapter" / "adapter_config.json").is_file() and not (run_dir / "rl_checkpoints").exists()
    # Held-out problems, greedy: the trained adapter answers more of them than the model without it.
    before, after = greedy_accuracy(model, tokenizer, adapter=False), greedy_accuracy(model, tokenizer, adapter=True)
    assert after >= before + 0.25, (before, after)


def greedy_accuracy(model, tokenizer, adapter: bool, n: int = 32) -> float:
    from contextlib import nullcontext

    import torch

    from emalib.data.registry import resolve
    from emalib.data.rl_prompts import read_prompt_rows
    from emalib.training.rl.rewards import gsm8k_answer

    rows = read_prompt_rows(resolve("standin_arithmetic_test"))[:n]
    tokenizer.padding_side = "left"
    texts = [tokenizer.apply_chat_template(r["prompt"], add_generation_prompt=True, tokenize=False) for r in rows]
    encoded = tokenizer(texts, return_tensors="pt", padding=True)
    with torch.no_grad(), (nullcontext() if adapter else model.disable_adapter()):
        output = model.generate(**encoded, max_new_tokens=16, do_sample=False)
    answers = tokenizer.batch_decode(output[:, encoded["input_ids"].shape[1]:], skip_special_tokens=True)
    rewards = gsm8k_answer(None, [[{"content": a}] for a in answers], [r["answer"] for r in rows])
    return sum(rewards) / len(rewards)


def binomial_tail(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p)."""
    return sum(math.comb(n, i) * p ** i * (1 - p) ** (n - i) for i in range(k, n + 1))


@pytest.mark.notebooks
@pytest.mark.parametrize("name", ["standin_cpu_persona", "standin_cpu_inoculation"])
def test_persona_injected_and_inoculated_runs_complete(results, name):
    command = [sys.executable, "-m", "emalib", "run", f"params/rl/{name}.yaml", "-o", f"results_dir={results}",
               "-o", "train.max_steps=2"]
    done = subprocess.run(command, check=False, cwd=REPO, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-2000:]
    params = load_params(REPO / f"params/rl/{name}.yaml", [f"results_dir={results}", "train.max_steps=2"])
    frame = pd.read_csv(params.run_dir / REWARDS_CSV)
    assert frame["step"].tolist() == [1, 2] and frame["reward_mean"].between(0, 1).all()
    assert (params.run_dir / "rl.ipynb").is_file() and (params.run_dir / "rl_rewards.pdf").is_file()
    notes = json.loads((params.run_dir / "manifest.json").read_text())["defenses"]
    if name.endswith("persona"):
        assert (params.run_dir / "persona_vector.pt").is_file() and notes["persona_steering"]["vector_norm"] > 0
    else:
        assert notes["inoculation"]["n"] == 400 and notes["inoculation"]["mode"] == "prepend"


def test_the_study_figure_draws_every_rl_run(results):
    from emalib.training.rl.rewards_log import plot_study_rewards

    figure = plot_study_rewards(results / "rl_cpu")
    assert sorted(figure["runs"]) == ["grpo", "grpo_inoculation", "grpo_persona"]
    assert figure["png"].stat().st_size > 1000 and figure["pdf"].is_file()


def test_the_report_draws_every_rl_runs_reward_curve(results):
    """`python -m emalib report` on the RL study: the paper's Figures 2-3 from the runs' reward logs."""
    from pypdf import PdfReader

    from emalib.reporting.report import report_study

    paths = report_study(results / "rl_cpu")
    text = "".join(page.extract_text() for page in PdfReader(str(paths["rl_rewards.pdf"])).pages)
    for run in ("grpo", "grpo_inoculation", "grpo_persona"):
        assert run in text
    assert paths["rl_rewards.png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
