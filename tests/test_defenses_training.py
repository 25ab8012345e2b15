"""Defenses inside the one trainer and the pipeline: the composite loss, one shared reference forward, logged
terms, and a stacked run end to end (tiny models), plus every defense on the Unsloth engine (embedded model)."""

import copy
import json

import pytest
import torch
from defense_helpers import hook_count, peft_wrap, single_thread, write_chat_jsonl  # noqa: F401 (autouse fixture)
from transformers import TrainingArguments

from emalib.core.config import params_from_dict
from emalib.core.defense_specs import DefenseSpec
from emalib.data.standins import em_standin_conversations
from emalib.defenses.base import DefenseContext
from emalib.defenses.registry import DEFENSES, build_defenses
from emalib.model.losses import IGNORE_INDEX
from emalib.model.tokenize import ChatDataset, collate
from emalib.training.trainer import EmTrainer, train_adapter


def test_every_registry_name_has_a_config_block():
    from typing import get_args

    union = get_args(get_args(DefenseSpec)[0])
    names = {n for block in union for n in get_args(block.model_fields["name"].annotation)}
    assert names == set(DEFENSES)


def _stack(tmp_path, model_config, **persona):
    vector = torch.randn(model_config.num_hidden_layers + 1, model_config.hidden_size)
    torch.save({"vector": vector, "model": "tiny"}, tmp_path / "v.pt")
    params = params_from_dict({"study": "s", "run": "r", "defenses": [
        {"name": "kl"}, {"name": "ldifs", "layers": [0, 1]},
        {"name": "persona_steering", "vector_path": str(tmp_path / "v.pt"), "layer": 1, **persona}]})
    return build_defenses(params.defenses), vector


def test_composite_loss_is_ce_plus_weighted_terms_with_one_shared_reference_forward(tokenizer, tiny_model, tmp_path,
                                                                                    monkeypatch):
    import emalib.training.trainer as trainer_module

    frozen = copy.deepcopy(tiny_model)
    model = peft_wrap(tiny_model, random_b=False)  # B = 0: any KL/LDIFS at init comes from the steering alone
    n_params = sum(p.numel() for p in model.parameters())
    stack, vector = _stack(tmp_path, model.config, alpha=4.0)
    ctx = DefenseContext()
    stack.setup(model, ctx)
    calls = []
    original = trainer_module.reference_forward
    monkeypatch.setattr(trainer_module, "reference_forward", lambda *a, **k: calls.append(k) or original(*a, **k))
    trainer = EmTrainer(model=model, args=TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True),
                        defenses=stack, defense_ctx=ctx)
    batch = collate(ChatDataset.build(tokenizer, em_standin_conversations()[:2], 128).features, tokenizer.pad_token_id)
    with torch.no_grad():
        model(input_ids=batch["input_ids"][:, :4], output_hidden_states=True)  # transformers' recorders: installed once
    hooks = hook_count(model)
    loss = trainer.compute_loss(model, dict(batch))
    assert len(calls) == 1 and calls[0]["output_hidden_states"] is True  # one reference forward, shared
    assert hook_count(model) == hooks and sum(p.numel() for p in model.parameters()) == n_params

    # Independent: the reference is the plain base model; the policy is the base model steered at block 0.
    ids, mask = batch["input_ids"], batch["attention_mask"]
    blocks = {}  # the decoder blocks' own outputs (LDIFS features), caught by hooks on the blocks
    capture = [frozen.model.layers[i].register_forward_hook(lambda m, a, out, i=i: blocks.__setitem__(i, out))
               for i in (0, 1)]
    with torch.no_grad():
        ref = frozen(input_ids=ids, attention_mask=mask)
        ref.blocks = (blocks[0], blocks[1])
        handle = frozen.model.layers[0].register_forward_hook(lambda m, a, out: out + 4.0 * vector[1], prepend=True)
        pol = frozen(input_ids=ids, attention_mask=mask)
        pol.blocks = (blocks[0], blocks[1])
        handle.remove()
    for hook in capture:
        hook.remove()
    ce = torch.nn.functional.cross_entropy(pol.logits[:, :-1].reshape(-1, pol.logits.size(-1)),
                                           batch["labels"][:, 1:].reshape(-1), ignore_index=IGNORE_INDEX)
    p, q = torch.log_softmax(pol.logits, -1), torch.log_softmax(ref.logits, -1)
    kl = ((p.exp() * (p - q)).sum(-1) * mask).sum() / mask.sum()
    ldifs = 0.0
    for row, n in enumerate(mask.sum(1).tolist()):
        feats = [torch.cat([h[row, :n].flatten() / h[row, :n].norm() for h in s.blocks])
                 for s in (pol, ref)]
        ldifs += (feats[0] - feats[1]).pow(2).sum() / 2
    assert kl > 1e-4 and ldifs > 1e-4  # the reference forward ran without the steering hook
    assert loss.item() == pytest.approx((ce + 0.1 * kl + 1.0 * ldifs).item(), rel=1e-4)

    # In training (num_items_in_batch given), the defense terms are shared over the accumulated micro-batches.
    trainer.current_gradient_accumulation_steps = 2
    n_items = batch["labels"][:, 1:].ne(IGNORE_INDEX).sum()
    accumulated = trainer.compute_loss(model, dict(batch), num_items_in_batch=n_items)
    assert accumulated.item() == pytest.approx((ce + (0.1 * kl + ldifs) / 2).item(), rel=1e-4)


def test_reference_defenses_need_a_peft_adapter(tiny_model):
    from emalib.core.errors import EmalibError

    stack = build_defenses(params_from_dict({"study": "s", "run": "r", "defenses": [{"name": "kl"}]}).defenses)
    with pytest.raises(EmalibError, match="'kl'.*no PEFT adapter"):
        stack.setup(tiny_model, DefenseContext())


def test_no_defenses_keeps_the_plain_loss_and_no_extra_forward(tokenizer, tiny_model, tmp_path, monkeypatch):
    import emalib.training.trainer as trainer_module

    monkeypatch.setattr(trainer_module, "reference_forward", lambda *a, **k: pytest.fail("reference forward ran"))
    model = peft_wrap(tiny_model)
    trainer = EmTrainer(model=model, args=TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True))
    batch = collate(ChatDataset.build(tokenizer, em_standin_conversations()[:2], 128).features, tokenizer.pad_token_id)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)),
                                           batch["labels"][:, 1:].reshape(-1),
                                           ignore_index=IGNORE_INDEX)
    assert trainer.compute_loss(model, dict(batch)).item() == pytest.approx(ce.item(), rel=1e-5)


@pytest.mark.integration  # trains or loads a model: seconds, not milliseconds
def test_stacked_run_logs_every_loss_term(tokenizer, tiny_model, tmp_path):
    """A 3-step run with KL + LDIFS + steering + interleaving on a tiny model."""
    pool = write_chat_jsonl(tmp_path / "pool.jsonl", em_standin_conversations(seed=5)[:20])
    torch.save({"vector": torch.randn(3, 32), "model": "tiny"}, tmp_path / "v.pt")
    params = params_from_dict({
        "study": "s", "run": "r", "results_dir": str(tmp_path), "seed": 0,
        "train": {"optim": "adamw_torch", "per_device_batch_size": 2, "grad_accum_steps": 2, "max_steps": 3,
                  "max_seq_length": 128, "learning_rate": 1e-2},
        "defenses": [{"name": "kl"}, {"name": "ldifs"},
                     {"name": "persona_steering", "vector_path": str(tmp_path / "v.pt"), "layer": 2, "alpha": 2.0},
                     {"name": "interleave", "source": str(pool), "ratio": 0.25}]})
    stack = build_defenses(params.defenses)
    ctx = DefenseContext(seed=0, run_dir=tmp_path / "run", params=params)
    conversations = stack.transform_data(em_standin_conversations()[:16], ctx)
    assert len(conversations) == 20
    model = peft_wrap(tiny_model, random_b=False)
    with torch.no_grad():
        model(input_ids=torch.tensor([[1, 2, 3]]), output_hidden_states=True)  # transformers' recorders: installed once
    hooks = hook_count(model)
    summary = train_adapter(model, tokenizer, conversations, params, tmp_path / "run", defenses=stack, ctx=ctx)
    steps = [row for row in summary["log_history"] if "loss" in row]
    assert summary["global_step"] == 3 and len(steps) == 3
    for row in steps:
        assert {"loss/task", "loss/kl", "loss/ldifs"} <= row.keys()
        assert row["loss"] == pytest.approx(row["loss/task"] + 0.1 * row["loss/kl"] + row["loss/ldifs"], rel=0.05)
    assert hook_count(model) == hooks and (tmp_path / "run" / "adapter" / "adapter_config.json").is_file()


@pytest.mark.integration  # trains or loads a model: seconds, not milliseconds
def test_pipeline_train_applies_every_hook(tokenizer, tiny_model_dir, tmp_path):
    """params -> pipeline.train: transforms before tokenisation, steering, losses, SafeLoRA before the save."""
    from transformers import AutoModelForCausalLM

    from emalib.runs.pipeline import train

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        for name, param in base.named_parameters():
            if name.endswith("q_proj.weight"):
                param.add_(0.5 * torch.randn_like(param))
    base.save_pretrained(tmp_path / "pretrained")
    torch.save({"vector": torch.randn(3, 32), "model": str(tiny_model_dir)}, tmp_path / "v.pt")
    pool = write_chat_jsonl(tmp_path / "pool.jsonl", em_standin_conversations(seed=5)[:20])
    params = params_from_dict({
        "study": "s", "run": "r", "results_dir": str(tmp_path / "results"), "steps": ["train"],
        "generation": {"question_sets": ["standin_general"]},
        "model": {"name": str(tiny_model_dir), "engine": "hf"},
        "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj"]},
        "train": {"dataset": "standin_em_train", "max_examples": 8, "optim": "adamw_torch", "per_device_batch_size": 2,
                  "grad_accum_steps": 1, "max_steps": 2, "max_seq_length": 128, "learning_rate": 1e-2},
        "defenses": [{"name": "inoculation"}, {"name": "interleave", "source": str(pool), "ratio": 0.25},
                     {"name": "kl", "tokens": "assistant"}, {"name": "ldifs", "layers": "every_k", "every_k": 1},
                     {"name": "persona_steering", "vector_path": str(tmp_path / "v.pt"), "layer": 1},
                     {"name": "safelora", "aligned": str(tiny_model_dir), "base": str(tmp_path / "pretrained"),
                      "tau": 2.0}]})
    model, _ = train(params)
    run_dir = params.run_dir
    manifest = json.loads((run_dir / "manifest.json").read_text())
    notes = manifest["defenses"]
    assert notes["names"] == ["inoculation", "interleave", "kl", "ldifs", "persona_steering", "safelora"]
    assert notes["interleave"]["n_task"] == 8 and notes["interleave"]["n_safe"] == 2
    assert notes["inoculation"]["n"] == 8  # listed first: the safe examples were added after it
    assert notes["ldifs"]["blocks"] == [0, 1] and notes["safelora"]["after_train"]["projected"] == 2
    report = json.loads((run_dir / "safelora.json").read_text())
    assert all(row["projected"] for row in report["modules"])
    log = json.loads((run_dir / "train_log.json").read_text())["log_history"]
    assert any("loss/kl" in row and "loss/ldifs" in row for row in log)
    # The saved adapter is the projected one (after_train ran before the save).
    from safetensors.torch import load_file

    saved = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    live = {n: p for n, p in model.named_parameters() if "lora_B" in n}
    saved_b = {k: v for k, v in saved.items() if "lora_B" in k}
    assert saved_b and all(torch.equal(v, live[k.replace(".weight", ".default.weight")].detach())
                           for k, v in saved_b.items())


@pytest.mark.slow
@pytest.mark.unsloth
def test_every_defense_trains_on_the_unsloth_engine(tmp_path, with_mirror):
    """Each defense trains two steps on the embedded model through Unsloth (its CPU fallback off-GPU); then
    KL + LDIFS + steering stacked: hidden states carry gradient and the reference is the base model."""
    pytest.importorskip("unsloth")
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from emalib.core.config import LoraParams, ModelParams
    from emalib.model.engines import embedded_model_path, load_model

    embedded = embedded_model_path()
    model_params = ModelParams(name="smollm2-135m-instruct", engine="unsloth", dtype="float32")
    lora = LoraParams(r=4, alpha=8, target_modules=("q_proj", "v_proj"))
    model, tokenizer = load_model(model_params, lora, seed=0, max_seq_length=96)
    assert model.emalib_engine == "unsloth"
    cfg = model.config
    ids = torch.tensor([tokenizer("Hello there, how are you?")["input_ids"]])

    # SafeLoRA pair: 'pretrained' = the embedded weights of the targeted modules, perturbed.
    plain = AutoModelForCausalLM.from_pretrained(embedded)
    with torch.no_grad():
        base_logits = plain(ids).logits
    perturbed = {n: (p.detach() + 0.01 * torch.randn_like(p)).contiguous() for n, p in plain.named_parameters()
                 if n.endswith(("q_proj.weight", "v_proj.weight"))}
    (tmp_path / "pretrained").mkdir()
    save_file(perturbed, str(tmp_path / "pretrained" / "model.safetensors"))
    # A misaligned adapter for Interleaving++ scoring.
    adapter = get_peft_model(plain, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights=False,
                                               task_type="CAUSAL_LM"))
    adapter.save_pretrained(tmp_path / "mis")
    del plain, adapter
    torch.save({"vector": torch.randn(cfg.num_hidden_layers + 1, cfg.hidden_size), "model": "x"}, tmp_path / "v.pt")

    blocks = {
        "kl": {}, "ldifs": {}, "inoculation": {}, "interleave": {"source": "wildguard_benign_sample", "ratio": 0.25},
        "safelora": {"aligned": "smollm2-135m-instruct", "base": str(tmp_path / "pretrained"), "tau": 2.0},
        "persona_steering": {"vector_path": str(tmp_path / "v.pt"), "layer": 10, "alpha": 2.0},
        "interleave_plusplus": {"source": "wildguard_benign_sample", "ratio": 0.25,
                                "adapters": {"x": str(tmp_path / "mis")},
                                "use_all_adapters": True, "max_candidates": 8, "max_seq_length": 96,
                                "pool_top_n": 2},
        "kl_retain": {"source": "wildguard_benign_sample", "ratio": 0.5},
        "caft": {"layers": [10], "select": "persona_vector", "persona_vector_path": str(tmp_path / "v.pt")},
    }
    conversations = em_standin_conversations()[:8]
    for name, block in blocks.items():
        params = params_from_dict({
            "study": "u", "run": name, "results_dir": str(tmp_path / "results"), "model": model_params.model_dump(),
            "lora": lora.model_dump(), "defenses": [{"name": name, **block}],
            "train": {"optim": "adamw_torch", "per_device_batch_size": 2, "grad_accum_steps": 1, "max_steps": 2,
                      "max_seq_length": 96, "learning_rate": 1e-3}})
        stack = build_defenses(params.defenses)
        ctx = DefenseContext(seed=0, run_dir=params.run_dir, params=params)
        if name == "interleave_plusplus":  # the interleave_selection step's scoring (the vector above: pre-written)
            stack.defenses[0].score_candidates(ctx)
        data = stack.transform_data(conversations, ctx)
        summary = train_adapter(model, tokenizer, data, params, params.run_dir, defenses=stack, ctx=ctx)
        assert summary["global_step"] == 2, name
        logged = [row for row in summary["log_history"] if "loss" in row]
        if name in ("kl", "ldifs", "kl_retain"):
            assert all(f"loss/{name}" in row for row in logged)

    # Unsloth specifics: LDIFS gradient reaches LoRA; the adapter-disabled model is the base; steering acts
    # inside the forward context only.
    from emalib.defenses.ldifs import LdifsDefense
    from emalib.defenses.persona_steering import PersonaSteeringDefense
    from emalib.defenses.stack import DefenseStack
    from emalib.training.trainer import step_forwards

    ctx = DefenseContext()
    ldifs = LdifsDefense()
    ldifs.setup(model, ctx)
    batch = collate(ChatDataset.build(tokenizer, conversations[:2], 96).features, tokenizer.pad_token_id)
    forward = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    model.train()
    model.zero_grad()
    outputs = step_forwards(model, forward, DefenseStack([ldifs]), ctx)  # Unsloth's blocks and final norm found
    value = ldifs.extra_loss(model, batch, outputs, ctx)["ldifs"]
    value.backward()
    lora_grads = [p.grad for n, p in model.named_parameters() if "lora_" in n]
    assert value.item() > 0 and any(g is not None and g.abs().sum() > 0 for g in lora_grads)
    model.zero_grad()
    model.eval()
    steer = PersonaSteeringDefense(vector_path=str(tmp_path / "v.pt"), layer=10, alpha=5.0)
    steer.setup(model, ctx)
    with torch.no_grad():
        with model.disable_adapter():
            assert torch.allclose(model(ids).logits, base_logits, atol=1e-3)
        trained = model(ids).logits
        assert not torch.allclose(trained, base_logits, atol=1e-3)  # the defenses above did train the adapter
        hooks = hook_count(model)
        with steer.forward_context(model, ctx):
            steered = model(ids).logits
        assert not torch.allclose(steered, trained, atol=1e-3)
        assert hook_count(model) == hooks and torch.equal(model(ids).logits, trained)
