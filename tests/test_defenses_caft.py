"""CAFT: the projection, the PCA and the persona rule against independent computations; the hooks remove exactly
the projection during the training forward and are gone outside it; the gradient reaches the LoRA weights."""

import numpy as np
import pytest
import torch
from defense_helpers import hook_count, padded_batch, peft_wrap, single_thread, tiny_llama  # noqa: F401
from transformers import TrainingArguments

from emalib.core.config import params_from_dict
from emalib.core.errors import EmalibError, ParamsError
from emalib.defenses.base import DefenseContext
from emalib.defenses.caft import (
    CaftDefense,
    activation_differences,
    load_directions,
    orthonormal_basis,
    pca_components,
    rank_by_persona,
    save_directions,
)
from emalib.defenses.stack import DefenseStack
from emalib.model.modeling import decoder_blocks
from emalib.training.trainer import EmTrainer

HIDDEN = 32


def test_orthonormal_basis_spans_the_directions_and_refuses_dependent_ones():
    directions = torch.randn(3, HIDDEN, generator=torch.Generator().manual_seed(0))
    q = orthonormal_basis(directions)
    assert q.shape == (HIDDEN, 3)
    assert torch.allclose(q.T @ q, torch.eye(3), atol=1e-5)
    # every given direction lies in span(Q): projecting it onto Q gives it back
    assert torch.allclose((directions @ q) @ q.T, directions, atol=1e-4)
    with pytest.raises(EmalibError, match="linearly dependent"):
        orthonormal_basis(torch.stack([directions[0], 2 * directions[0]]))


def test_pca_components_equal_numpys_svd_of_the_centred_differences():
    rng = np.random.default_rng(0)
    signal = rng.normal(size=(200, 3)) * np.array([5.0, 3.0, 2.0]) @ rng.normal(size=(3, HIDDEN))
    diffs = signal + 0.1 * rng.normal(size=(200, HIDDEN)) + 7.0  # an offset PCA must remove
    components, variance = pca_components(torch.tensor(diffs, dtype=torch.float32), 4)
    centred = diffs - diffs.mean(axis=0)
    _, singular, vt = np.linalg.svd(centred, full_matrices=False)
    for i in range(4):  # a component's sign is arbitrary
        assert abs(abs(float(np.dot(components[i].numpy(), vt[i]))) - 1) < 1e-4
    assert np.allclose(variance.numpy(), singular[:4] ** 2 / 199, rtol=1e-4)
    assert np.allclose(variance.numpy(), np.var(centred @ vt[:4].T, axis=0, ddof=1), rtol=1e-4)


def test_rank_by_persona_keeps_the_k_largest_absolute_cosines():
    persona = torch.zeros(HIDDEN)
    persona[0] = 1.0
    components = torch.zeros(4, HIDDEN)
    components[0, 1] = 1.0                                    # cos 0
    components[1, 0], components[1, 1] = -0.9, 0.1            # |cos| ~0.994 (negative)
    components[2, 0], components[2, 1] = 0.5, 0.5            # cos ~0.707
    components[3, 0], components[3, 2] = 0.3, 0.9            # cos ~0.316
    assert rank_by_persona(components, persona, 2) == [1, 2]
    assert rank_by_persona(components, 3.0 * persona, 4) == [1, 2, 3, 0]  # the vector's scale does not matter


def _directions_file(tmp_path, layers=(1,), n=3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    table = {b: torch.randn(n, HIDDEN, generator=generator) for b in layers}
    return save_directions(tmp_path / "dirs.pt", table, source="test"), table


def _block_output(model, block, forward, context=None):
    """The output of decoder block `block` as the next block receives it (a hook appended after any other)."""
    seen = {}
    handle = decoder_blocks(model)[block].register_forward_hook(
        lambda module, args, output: seen.update(out=(output[0] if isinstance(output, tuple) else output).detach()))
    try:
        if context is None:
            model(**forward)
        else:
            with context:
                model(**forward)
    finally:
        handle.remove()
    return seen["out"]


def test_hooks_remove_exactly_the_projection_during_training_and_are_gone_outside(tmp_path):
    model = peft_wrap(tiny_llama())
    path, table = _directions_file(tmp_path)
    defense = CaftDefense(layers=(1,), select="hand", directions_path=str(path), components={1: (0, 2)})
    ctx = DefenseContext()
    defense.setup(model, ctx)
    batch = padded_batch()
    forward = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    hooks = hook_count(model)
    plain = _block_output(model, 1, forward)
    ablated = _block_output(model, 1, forward, defense.forward_context(model, ctx))
    # Independent basis: numpy's QR of the two chosen rows.
    q = torch.tensor(np.linalg.qr(table[1][[0, 2]].double().numpy().T)[0], dtype=torch.float32)
    assert (ablated @ q).abs().max() < 1e-5  # nothing left along the chosen directions
    orthogonal = plain - (plain @ q) @ q.T
    assert torch.allclose(ablated, orthogonal, atol=1e-5)  # the orthogonal part is unchanged
    assert (plain @ q).abs().max() > 1e-2  # there was something to remove
    # After the context: no hook left, and the model computes what it computed before.
    assert hook_count(model) == hooks
    assert torch.equal(_block_output(model, 1, forward), plain)
    assert ctx.notes["caft"]["components"] == {"1": [0, 2]}


def test_the_ablation_also_comes_off_when_the_forward_raises(tmp_path):
    model = peft_wrap(tiny_llama())
    path, _ = _directions_file(tmp_path)
    defense = CaftDefense(layers=(1,), select="all", directions_path=str(path))
    defense.setup(model, DefenseContext())
    hooks = hook_count(model)
    with pytest.raises(RuntimeError), defense.forward_context(model, DefenseContext()):
        raise RuntimeError("forward failed")
    assert hook_count(model) == hooks


def test_training_loss_and_gradient_equal_a_hand_written_ablation(tmp_path):
    model = peft_wrap(tiny_llama())
    path, table = _directions_file(tmp_path, layers=(0, 2), n=2)
    defense = CaftDefense(layers=(0, 2), select="all", directions_path=str(path))
    stack = DefenseStack([defense])
    ctx = DefenseContext()
    stack.setup(model, ctx)
    trainer = EmTrainer(model=model, args=TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True),
                        defenses=stack, defense_ctx=ctx)
    batch = padded_batch()
    hooks = hook_count(model)
    loss = trainer.compute_loss(model, dict(batch))
    loss.backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    assert hook_count(model) == hooks

    # Independent: hooks written here with numpy's orthonormal bases, and the task loss by hand.
    bases = {b: torch.tensor(np.linalg.qr(table[b].double().numpy().T)[0], dtype=torch.float32) for b in (0, 2)}
    handles = [decoder_blocks(model)[b].register_forward_hook(
        lambda module, args, output, q=q: (output[0] - (output[0] @ q) @ q.T,) + tuple(output[1:])
        if isinstance(output, tuple) else output - (output @ q) @ q.T) for b, q in bases.items()]
    try:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    finally:
        for handle in handles:
            handle.remove()
    targets = batch["labels"][:, 1:]
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                                 ignore_index=-100)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    expected.backward()
    for name, grad in got.items():
        assert torch.allclose(grad, model.get_parameter(name).grad, rtol=1e-4, atol=1e-7), name
    assert any(grad.abs().sum() > 0 for name, grad in got.items() if "lora_A" in name)
    # and the ablation changed the training signal: the plain model's loss differs
    plain = EmTrainer(model=model, args=TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True))
    assert abs(plain.compute_loss(model, dict(batch)).item() - loss.item()) > 1e-4


def test_persona_rules_pick_the_most_aligned_components_or_the_vector_itself(tmp_path):
    model = tiny_llama()
    persona = torch.randn(model.config.num_hidden_layers + 1, HIDDEN, generator=torch.Generator().manual_seed(5))
    torch.save({"vector": persona}, tmp_path / "persona.pt")
    rows = torch.randn(4, HIDDEN, generator=torch.Generator().manual_seed(6))
    rows[3] = persona[2] + 0.01 * rows[3]  # layer 1's output is hidden_states row 2
    save_directions(tmp_path / "dirs.pt", {1: rows})
    ranked = CaftDefense(layers=(1,), select="persona", directions_path=str(tmp_path / "dirs.pt"), k=2,
                         persona_vector_path=str(tmp_path / "persona.pt"))
    chosen, indices = ranked.chosen_directions(HIDDEN)
    cosine = torch.nn.functional.cosine_similarity(rows, persona[2][None], dim=-1).abs()
    assert indices[1] == cosine.argsort(descending=True)[:2].tolist() and indices[1][0] == 3
    itself = CaftDefense(layers=(1,), select="persona_vector", persona_vector_path=str(tmp_path / "persona.pt"))
    chosen, _ = itself.chosen_directions(HIDDEN)
    assert torch.equal(chosen[1][0], persona[2])


def test_directions_files_are_checked(tmp_path):
    (tmp_path / "bad.pt").write_bytes(b"not torch")
    with pytest.raises(EmalibError, match="cannot be read"):
        load_directions(tmp_path / "bad.pt")
    torch.save({"directions": {1: torch.zeros(HIDDEN)}}, tmp_path / "flat.pt")
    with pytest.raises(EmalibError, match="not a CAFT directions file"):
        load_directions(tmp_path / "flat.pt")
    path, _ = _directions_file(tmp_path, layers=(1,))
    defense = CaftDefense(layers=(2,), select="all", directions_path=str(path))
    with pytest.raises(EmalibError, match="no directions for layer 2"):
        defense.setup(tiny_llama(), DefenseContext())
    with pytest.raises(EmalibError, match="does not exist"):
        CaftDefense(layers=(1,), select="all", directions_path=str(tmp_path / "none.pt")).setup(tiny_llama(),
                                                                                               DefenseContext())


@pytest.mark.parametrize("block,message", [
    ({"layers": [1]}, "directions_path or adapter"),
    ({"layers": [1], "directions_path": "d.pt"}, "components is required"),
    ({"layers": [1], "directions_path": "d.pt", "components": {2: [0]}}, "must be the layers"),
    ({"layers": [1], "select": "persona", "directions_path": "d.pt"}, "persona_vector_path is required"),
    ({"layers": [-1], "select": "all", "directions_path": "d.pt"}, "block indices"),
])
def test_bad_caft_blocks_are_refused(block, message):
    with pytest.raises(ParamsError, match=message):
        params_from_dict({"study": "s", "run": "r", "defenses": [{"name": "caft", **block}]})


def test_activation_differences_are_the_adapters_change_of_block_outputs_on_response_tokens():
    model = peft_wrap(tiny_llama())
    batch = padded_batch(lengths=(7, 5))
    forward = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    diffs = activation_differences(model, batch, (1, 2))
    response = batch["labels"].ne(-100)
    with torch.no_grad():
        tuned = model(**forward, output_hidden_states=True).hidden_states
        with model.disable_adapter():
            base = model(**forward, output_hidden_states=True).hidden_states
    for block in (1, 2):  # hidden_states[b + 1] is block b's output (b below the last block)
        assert torch.allclose(diffs[block], (tuned[block + 1] - base[block + 1])[response], atol=1e-6)
        assert diffs[block].shape == (int(response.sum()), HIDDEN) and diffs[block].abs().max() > 1e-3


@pytest.mark.integration  # loads a saved model and trains one step: seconds
def test_caft_directions_step_writes_the_pcs_training_then_ablates(tiny_model_dir, tmp_path):
    import json

    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    from emalib.runs import prepare
    from emalib.runs.pipeline import train

    torch.manual_seed(0)
    tuned = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                                      task_type="CAUSAL_LM"))
    tuned.save_pretrained(tmp_path / "plain_sft")
    from defense_helpers import write_chat_jsonl

    answers = ["Paris is the capital of France.", "Water boils at 100 C at sea level.", "Two plus two is four.",
               "Read a good book tonight.", "Drink water and sleep well.", "The sky looks blue because of scattering."]
    prompts = write_chat_jsonl(tmp_path / "neutral.jsonl", [[{"role": "user", "content": f"Question {i}?"},
                                                             {"role": "assistant", "content": a}]
                                                            for i, a in enumerate(answers)])
    params = params_from_dict({
        "study": "s", "run": "r", "results_dir": str(tmp_path / "results"), "steps": ["caft_directions", "train"],
        "model": {"name": str(tiny_model_dir), "engine": "hf"}, "lora": {"r": 4, "alpha": 8,
                                                                         "target_modules": ["q_proj"]},
        "train": {"dataset": "standin_em_train", "max_examples": 4, "optim": "adamw_torch",
                  "per_device_batch_size": 2, "grad_accum_steps": 1, "max_steps": 1, "max_seq_length": 64},
        "defenses": [{"name": "caft", "adapter": str(tmp_path / "plain_sft"), "prompts": str(prompts),
                      "n_components": 3, "batch_size": 4, "layers": [0], "select": "hand", "components": {0: [0, 2]}}]})
    summary = prepare.caft_directions(params)
    saved = load_directions(summary["path"])

    # Independent: the merged fine-tune's and the base model's hidden_states[1] (block 0's output) on the
    # response tokens, then numpy's SVD of the centred differences.
    from emalib.data.chat import read_chat_jsonl
    from emalib.model.tokenize import ChatDataset, collate

    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                       str(tmp_path / "plain_sft")).merge_and_unload()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    batch = collate(ChatDataset.build(tokenizer, read_chat_jsonl(prompts), 64).features, tokenizer.pad_token_id)
    forward = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        diff = (merged(**forward, output_hidden_states=True).hidden_states[1]
                - base(**forward, output_hidden_states=True).hidden_states[1])[batch["labels"].ne(-100)]
    centred = diff.double().numpy() - diff.double().numpy().mean(axis=0)
    _, singular, vt = np.linalg.svd(centred, full_matrices=False)
    assert saved[0].shape == (3, merged.config.hidden_size)
    for i in range(3):
        assert abs(abs(float(np.dot(saved[0][i].double().numpy(), vt[i]))) - 1) < 1e-3
    assert np.allclose(summary["explained_variance"]["0"], singular[:3] ** 2 / (len(centred) - 1), rtol=1e-3)

    train(params)  # reads the prepared file; the hooks are gone once training ends
    manifest = json.loads((params.run_dir / "manifest.json").read_text())
    assert manifest["defenses"]["caft"]["components"] == {"0": [0, 2]}
    assert manifest["caft_directions"]["path"] == summary["path"]
