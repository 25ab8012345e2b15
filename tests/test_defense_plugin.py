"""A new defense as a test fixture (tests/fixture_defense.py: one module, its config block and descriptor, registered
at import, no emalib module edited) is validated, trains, and shows in the study graph, the cost model and the
report's method list."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import yaml
from defense_helpers import peft_wrap, single_thread  # noqa: F401 (autouse fixture)

from emalib.core import defense_specs
from emalib.core.config import params_from_dict, rebuild_params_schema
from emalib.core.errors import ParamsError
from emalib.data.standins import em_standin_conversations
from emalib.defenses.base import DefenseContext
from emalib.defenses.registry import DEFENSES, build_defenses

FIXTURE = Path(__file__).resolve().parent / "fixture_defense.py"


@pytest.fixture
def lora_l2():
    """Import the fixture module (which registers the defense); unregister it afterwards."""
    spec = importlib.util.spec_from_file_location("fixture_defense", FIXTURE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # as an import would: pydantic resolves the block's annotations there
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]
    defense_specs.DEFENSE_BLOCKS.remove(module.LoraL2Config)
    DEFENSES.pop("lora_l2")
    rebuild_params_schema()


def _params(tmp_path, **extra):
    return params_from_dict({"study": "s", "run": "r", "results_dir": str(tmp_path), "defenses": [
        {"name": "lora_l2", "weight": 0.5}], **extra})


def test_before_registration_the_name_is_unknown(tmp_path):
    with pytest.raises(ParamsError, match="lora_l2"):
        _params(tmp_path)


def test_the_registered_defense_is_validated(lora_l2, tmp_path):
    params = _params(tmp_path)
    assert isinstance(params.defenses[0], lora_l2.LoraL2Config) and params.defenses[0].weight == 0.5
    with pytest.raises(ParamsError, match=r"defenses\.0\.lora_l2\.wieght"):
        params_from_dict({"study": "s", "run": "r", "defenses": [{"name": "lora_l2", "wieght": 1}]})
    with pytest.raises(ParamsError, match="not available in RL"):  # its descriptor says it has no RL form
        _params(tmp_path, steps=["rl"], rl={})


@pytest.mark.integration  # trains or loads a model: seconds, not milliseconds
def test_the_registered_defense_trains(lora_l2, tokenizer, tiny_model, tmp_path):
    from emalib.training.trainer import train_adapter

    params = _params(tmp_path, seed=0, train={"optim": "adamw_torch", "per_device_batch_size": 2,
                                              "grad_accum_steps": 1, "max_steps": 2, "max_seq_length": 128,
                                              "learning_rate": 1e-2})
    stack = build_defenses(params.defenses)
    model = peft_wrap(tiny_model, random_b=True)
    l2_before = sum(float((p.detach() ** 2).sum()) for n, p in model.named_parameters() if "lora_" in n and p.requires_grad)
    ctx = DefenseContext(seed=0, run_dir=tmp_path / "run", params=params)
    summary = train_adapter(model, tokenizer, em_standin_conversations()[:8], params, tmp_path / "run",
                            defenses=stack, ctx=ctx)
    steps = [row for row in summary["log_history"] if "loss" in row]
    assert len(steps) == 2
    # The first step's logged L2 is the adapter's own before any update: the term is the defense's.
    assert steps[0]["loss/lora_l2"] == pytest.approx(l2_before, rel=1e-3)
    for row in steps:
        assert row["loss"] == pytest.approx(row["loss/task"] + 0.5 * row["loss/lora_l2"], rel=0.05)
    assert (tmp_path / "run" / "adapter" / "adapter_config.json").is_file()


def test_the_registered_defense_shows_in_the_study_graph_cost_model_and_report(lora_l2, tmp_path):
    from emalib.reporting.frame import METHODS, defense_method_names, method_label
    from emalib.studies.cost import architecture, run_cost, training_flops
    from emalib.studies.study import load_study

    study_file = tmp_path / "plugin.yaml"
    study_file.write_text(yaml.safe_dump({
        "study": "plugin", "base_evaluation": False,
        "base": {"study": "plugin", "run": "cell", "results_dir": str(tmp_path / "results"),
                 "model": {"name": "Qwen/Qwen2.5-7B-Instruct"}, "train": {"dataset": "standin_em_train"}},
        "axes": {"defense": {"none": {}, "l2": {"defenses": [{"name": "lora_l2", "weight": 0.02}]}}}}))
    study = load_study(study_file)
    runs = {node.params.defenses[0].name if node.params.defenses else "none": node for node in study.nodes.values()}
    assert set(runs) == {"none", "lora_l2"}
    assert runs["lora_l2"].params.defenses == (lora_l2.LoraL2Config(weight=0.02),)
    plain, with_l2 = run_cost(runs["none"].params), run_cost(runs["lora_l2"].params)
    # No frozen-reference forward in its descriptor: the same GPU hours as plain fine-tuning.
    assert with_l2["train_tokens"] == plain["train_tokens"] > 0
    assert with_l2["gpu_hours"] == plain["gpu_hours"] and with_l2["memory_gib"] == plain["memory_gib"]
    arch = architecture("Qwen/Qwen2.5-7B-Instruct")
    assert training_flops(arch, 1000, 512, {"lora_l2"}, False) == training_flops(arch, 1000, 512, set(), False)
    assert "lora_l2" in METHODS and defense_method_names()[-1] == "lora_l2"
    assert method_label("lora_l2", 0.02) == "LoRA L2 (μ=0.02)"


def test_a_second_block_for_a_registered_name_is_refused(lora_l2):
    with pytest.raises(ValueError, match="kl already has a config block"):
        defense_specs.add_defense_block(defense_specs.KLConfig)
