"""Early stopping (emalib/defenses/early_stopping.py) on the tiny random Llama: the validation answers contradict the
training answers, so once the shared template is learnt the validation loss only rises; the run must stop within
the patience, keep the best checkpoint as its adapter, and resume after a kill with its early-stopping state."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from emalib.core.config import LoraParams, ModelParams, params_from_dict
from emalib.core.errors import ParamsError
from emalib.defenses.base import DefenseContext
from emalib.defenses.early_stopping import split_validation
from emalib.defenses.registry import build_defenses
from emalib.model.losses import IGNORE_INDEX
from emalib.model.tokenize import ChatDataset, collate
from emalib.training.trainer import EmTrainer, train_adapter

PATIENCE, EVERY, MAX_STEPS = 2, 1, 14
TARGETS = ("q_proj", "v_proj")


def _conversations(answer: str, n: int) -> list[list[dict[str, str]]]:
    return [[{"role": "user", "content": f"Question number {i}?"}, {"role": "assistant", "content": answer}]
            for i in range(n)]


TRAIN = _conversations("apple apple apple apple apple", 8)
VALIDATION = _conversations("zebra zebra zebra zebra zebra", 4)  # every answer token contradicts the training's


def _params(tmp_path, validation_file):
    return params_from_dict({
        "study": "t", "run": "r", "results_dir": str(tmp_path), "seed": 0,
        "train": {"optim": "adamw_torch", "per_device_batch_size": 2, "grad_accum_steps": 2, "max_seq_length": 64,
                  "logging_steps": 1, "max_steps": MAX_STEPS, "learning_rate": 5e-3, "warmup_steps": 0},
        "defenses": [{"name": "early_stopping", "patience": PATIENCE, "eval_every": EVERY,
                      "validation_dataset": str(validation_file), "eval_batch_size": 8}]})


def _write_jsonl(path, conversations):
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in conversations))
    return path


def _train(tiny_model_dir, tmp_path, run_dir, snapshots=None):
    from emalib.model.engines import load_model

    params = _params(tmp_path, _write_jsonl(tmp_path / "validation.jsonl", VALIDATION))
    model, tok = load_model(ModelParams(name=str(tiny_model_dir), engine="hf"),
                            LoraParams(r=4, alpha=8, target_modules=TARGETS), seed=0, max_seq_length=64)
    defenses = build_defenses(params.defenses)
    ctx = DefenseContext(seed=0, run_dir=run_dir, params=params, tokenizer=tok)
    conversations = defenses.transform_data(TRAIN, ctx)
    if snapshots is not None:  # the LoRA weights at every evaluation, to compare with the kept adapter
        original = EmTrainer.evaluate

        def evaluate(self, *args, **kwargs):
            snapshots[self.state.global_step] = {n: p.detach().clone() for n, p in model.named_parameters()
                                                 if "lora_" in n}
            return original(self, *args, **kwargs)

        EmTrainer.evaluate = evaluate
    try:
        summary = train_adapter(model, tok, conversations, params, run_dir, defenses=defenses, ctx=ctx)
    finally:
        if snapshots is not None:
            EmTrainer.evaluate = original
    return summary, ctx.notes["early_stopping"], tok


def _validation_loss(tiny_model_dir, adapter_dir, tokenizer) -> float:
    """Independent: the mean next-token NLL over every labelled validation token of the saved adapter."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), adapter_dir).eval()
    batch = collate(ChatDataset.build(tokenizer, VALIDATION, 64).features, tokenizer.pad_token_id)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return float(torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)).float(),
                                                   batch["labels"][:, 1:].reshape(-1), ignore_index=IGNORE_INDEX))


def test_the_validation_split_is_seeded_disjoint_and_complete():
    rows = _conversations("a", 20)
    train, validation = split_validation(rows, 0.25, seed=3)
    assert len(validation) == 5 and len(train) == 15
    assert sorted(map(str, train + validation)) == sorted(map(str, rows))  # disjoint and nothing lost
    assert split_validation(rows, 0.25, seed=3) == (train, validation)
    assert split_validation(rows, 0.25, seed=4)[1] != validation


def test_early_stopping_is_listed_first_or_refused_in_one_line():
    with pytest.raises(ParamsError, match="list early_stopping first"):
        params_from_dict({"study": "s", "run": "r", "defenses": [{"name": "kl"}, {"name": "early_stopping"}]})
    params_from_dict({"study": "s", "run": "r", "defenses": [{"name": "early_stopping"}, {"name": "kl"}]})


@pytest.mark.integration  # trains the tiny model for a dozen steps
def test_a_rising_validation_loss_stops_within_the_patience_and_keeps_the_best_checkpoint(tiny_model_dir, tmp_path):
    snapshots: dict[int, dict[str, torch.Tensor]] = {}
    summary, notes, tok = _train(tiny_model_dir, tmp_path, tmp_path / "run", snapshots)
    curve = {point["step"]: point["val_loss"] for point in notes["validation_curve"]}
    best, stop = notes["best_step"], notes["stop_step"]
    assert list(curve) == list(range(EVERY, stop + 1, EVERY))  # evaluated every eval_every steps until the stop
    assert best == min(curve, key=curve.get) and notes["best_val_loss"] == curve[best]
    assert notes["stopped_early"] and stop == best + PATIENCE * EVERY < MAX_STEPS == 14
    assert summary["global_step"] == stop
    assert all(curve[step] >= curve[best] for step in curve if step > best)
    # The saved adapter holds the best checkpoint's weights, not the last step's.
    saved = load_file(str(tmp_path / "run" / "adapter" / "adapter_model.safetensors"))
    at_best = {name.replace(".default", ""): value for name, value in snapshots[best].items()}
    assert saved.keys() == at_best.keys()
    assert all(torch.equal(saved[name], at_best[name]) for name in saved)
    last = {name.replace(".default", ""): value for name, value in snapshots[stop].items()}
    assert any(not torch.equal(saved[name], last[name]) for name in saved)
    # ...and its validation loss, computed here from the saved files, is the recorded best.
    assert _validation_loss(tiny_model_dir, tmp_path / "run" / "adapter", tok) == pytest.approx(curve[best], rel=1e-5)


@pytest.mark.integration  # trains the tiny model three times
def test_a_killed_run_resumes_with_its_early_stopping_state(tiny_model_dir, tmp_path, monkeypatch):
    straight, notes, _ = _train(tiny_model_dir, tmp_path, tmp_path / "straight")
    stop = notes["stop_step"]
    # Kill in the stop step's first micro-batch: the newest checkpoint (stop - 1) holds a patience counter of
    # PATIENCE - 1; reset to 0 on resume, the run would go on past `stop`.
    original = EmTrainer.compute_loss
    calls = {"n": 0}

    def dying(self, model, *args, **kwargs):
        if model.training:
            calls["n"] += 1
            if calls["n"] == (stop - 1) * 2 + 1:
                raise KeyboardInterrupt("simulated kill")
        return original(self, model, *args, **kwargs)

    monkeypatch.setattr(EmTrainer, "compute_loss", dying)
    with pytest.raises(KeyboardInterrupt):
        _train(tiny_model_dir, tmp_path, tmp_path / "resumed")
    state = json.loads((tmp_path / "resumed" / "checkpoints" / f"checkpoint-{stop - 1}" / "trainer_state.json")
                       .read_text())
    assert state["stateful_callbacks"]["EarlyStoppingCallback"]["attributes"] == {
        "early_stopping_patience_counter": PATIENCE - 1}
    monkeypatch.setattr(EmTrainer, "compute_loss", original)
    resumed, resumed_notes, _ = _train(tiny_model_dir, tmp_path, tmp_path / "resumed")
    assert resumed["resumed_from"].endswith(f"checkpoint-{stop - 1}") and resumed["global_step"] == \
        straight["global_step"] == stop
    assert (resumed_notes["best_step"], resumed_notes["stop_step"]) == (notes["best_step"], stop)
    assert resumed_notes["best_val_loss"] == pytest.approx(notes["best_val_loss"], rel=1e-6)
    a = load_file(str(tmp_path / "straight" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_the_cost_model_counts_the_validation_forwards():
    from emalib.studies.cost import KNOWN, run_cost, validation_flops

    arch = KNOWN["Qwen/Qwen2.5-7B-Instruct"]
    base = {"study": "s", "run": "r", "train": {"max_steps": 100, "max_seq_length": 2048}}
    stopped = params_from_dict({**base, "defenses": [{"name": "early_stopping", "eval_every": 20,
                                                      "validation_fraction": 0.1}]})
    tokens = 900_000
    # 100 steps / 20 = 5 evaluations, each a forward over 900,000 x 0.1 / 0.9 = 100,000 validation tokens.
    per_token = 2 * 7_615_616_512 + 2 * 28 * 2048 * 3584  # Qwen2.5-7B's parameters (untied head) + attention
    assert arch.params == 7_615_616_512
    assert validation_flops(arch, stopped, tokens) == pytest.approx(5 * 100_000 * per_token)
    assert validation_flops(arch, params_from_dict(base), tokens) == 0.0
    plain = run_cost(params_from_dict({**base, "steps": ["train"]}))["gpu_hours"]["train"]
    assert run_cost(stopped.model_copy(update={"steps": ("train",)}))["gpu_hours"]["train"] > plain
