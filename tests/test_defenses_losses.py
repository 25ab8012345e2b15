"""KL and LDIFS: the pure maths against hand computations, and the defenses on tiny PEFT models."""

import copy
import math

import pytest
import torch
from defense_helpers import hook_count, padded_batch, peft_wrap, single_thread, tiny_llama  # noqa: F401 (autouse fixture)

from emalib.defenses.base import DefenseContext, StepOutputs
from emalib.defenses.kl import KLDefense, kl_mask
from emalib.defenses.ldifs import LdifsDefense, select_layers
from emalib.model.losses import ldifs_features, token_kl
from emalib.training.reference import reference_forward


def _kl(p, q):
    return sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q))


def test_token_kl_matches_a_hand_computed_distribution():
    policy = torch.tensor([[[math.log(0.7), math.log(0.2), math.log(0.1)],
                            [math.log(0.5), math.log(0.25), math.log(0.25)],
                            [0.0, 0.0, 0.0]]])
    reference = torch.tensor([[[math.log(0.4), math.log(0.4), math.log(0.2)],
                               [math.log(0.1), math.log(0.8), math.log(0.1)],
                               [5.0, -5.0, 0.0]]])
    mask = torch.tensor([[1, 1, 0]])  # the third position is padding and must not count
    p1, q1 = [0.7, 0.2, 0.1], [0.4, 0.4, 0.2]
    p2, q2 = [0.5, 0.25, 0.25], [0.1, 0.8, 0.1]
    forward = (_kl(p1, q1) + _kl(p2, q2)) / 2
    reverse = (_kl(q1, p1) + _kl(q2, p2)) / 2
    assert token_kl(policy, reference, mask).item() == pytest.approx(forward, rel=1e-5)
    assert token_kl(policy, reference, mask, "reverse").item() == pytest.approx(reverse, rel=1e-5)
    assert forward != pytest.approx(reverse, rel=1e-3)  # the direction matters on this example
    assert token_kl(policy, policy, mask).item() == pytest.approx(0.0, abs=1e-7)


def test_kl_mask_all_is_the_attention_mask_and_assistant_the_shifted_labels():
    batch = padded_batch(lengths=(6, 4))
    assert torch.equal(kl_mask(batch, "all"), batch["attention_mask"])
    # Row 0 labels positions 3..5, so positions 2..4 predict them; row 1 labels 2..3 -> positions 1..2.
    assert kl_mask(batch, "assistant").tolist() == [[0, 0, 1, 1, 1, 0], [0, 1, 1, 0, 0, 0]]


def test_kl_is_zero_at_initialisation_and_equals_the_base_model_kl_after_a_change():
    base = tiny_llama()
    frozen = copy.deepcopy(base)
    model = peft_wrap(base, random_b=False)  # B = 0: the adapter changes nothing yet
    batch = padded_batch()
    defense = KLDefense()
    forward = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    at_init = defense.extra_loss(model, batch, StepOutputs(model(**forward), reference_forward(model, **forward)),
                                 DefenseContext())["kl"]
    assert at_init.item() == pytest.approx(0.0, abs=1e-7)

    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    outputs = StepOutputs(model(**forward), reference_forward(model, **forward))
    value = defense.extra_loss(model, batch, outputs, DefenseContext())["kl"]
    # Independent: the reference is the untouched base model; KL(p_theta || p_base) over non-padding tokens.
    p = torch.softmax(model(**forward).logits.double(), -1)
    q = torch.softmax(frozen(**forward).logits.double(), -1)
    per_token = (p * (p.log() - q.log())).sum(-1)
    expected = (per_token * batch["attention_mask"]).sum() / batch["attention_mask"].sum()
    assert value.item() == pytest.approx(expected.item(), rel=1e-4) and value.item() > 1e-4
    value.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)


def test_select_layers_follows_the_released_code_and_the_every_k_option():
    assert select_layers(28) == [0, 6, 13, 20, 27]
    assert select_layers(28, "every_k", every_k=5) == [4, 9, 14, 19, 24]
    assert select_layers(4, (1, 3)) == [1, 3]
    with pytest.raises(Exception, match="exceed"):
        select_layers(4, (4,))


def test_ldifs_features_ignore_padding_and_match_a_per_example_computation():
    torch.manual_seed(0)
    hidden = [torch.randn(2, 5, 3) for _ in range(2)]
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    features = ldifs_features(hidden, mask)
    for row, n in enumerate((5, 2)):
        parts = []
        for h in hidden:
            flat = h[row, :n].flatten()
            parts.append(flat / flat.norm())
        expected = torch.cat(parts)
        got = features[row][features[row] != 0] if n < 5 else features[row]
        assert torch.allclose(got, expected, atol=1e-6)
    changed = [h.clone() for h in hidden]
    changed[0][1, 3:] = 100.0  # padding positions
    assert torch.equal(ldifs_features(changed, mask), features)


def _ldifs_step(model, batch, defense):
    """The trainer's forwards of one micro-batch for a stack holding only `defense`."""
    from emalib.defenses.stack import DefenseStack
    from emalib.training.trainer import step_forwards

    forward = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    return step_forwards(model, forward, DefenseStack([defense]), DefenseContext())


def _ldifs_setup(released: bool, padding: str = "exclude", layers=(0, 2, 3)):
    model = peft_wrap(tiny_llama(), random_b=True)
    batch = padded_batch()
    defense = LdifsDefense(layers=layers, released_no_grad_bug=released, padding=padding)
    defense.setup(model, DefenseContext())
    return model, batch, defense, _ldifs_step(model, batch, defense)


def _hooked_block_outputs(model, input_ids, attention_mask):
    """Independent features: forward hooks on the decoder blocks themselves (no hidden_states), graph kept."""
    blocks = model.get_base_model().model.layers
    seen = {}
    handles = [block.register_forward_hook(lambda m, a, out, i=i: seen.__setitem__(i, out[0] if isinstance(out, tuple)
                                                                                   else out))
               for i, block in enumerate(blocks)]
    try:
        model(input_ids=input_ids, attention_mask=attention_mask)
    finally:
        for handle in handles:
            handle.remove()
    return [seen[i] for i in range(len(blocks))]


def _hand_ldifs(model, batch, layers, padding: str) -> torch.Tensor:
    """The released extractor's computation, example by example: hooked block outputs of the trained model and of
    the adapter-disabled model, each layer's [T, D] flattened and l2-normalised, concatenated, squared distance,
    batch mean. padding 'keep' feeds each padded row as it is (released); 'exclude' feeds the row cut to its real
    tokens, which is what a batch without padding would give."""
    total = 0
    for row, n in enumerate(batch["attention_mask"].sum(1).tolist()):
        width = n if padding == "exclude" else batch["input_ids"].size(1)
        ids, mask = batch["input_ids"][row: row + 1, :width], batch["attention_mask"][row: row + 1, :width]
        policy = _hooked_block_outputs(model, ids, mask)
        with torch.no_grad(), model.disable_adapter():
            reference = _hooked_block_outputs(model, ids, mask)
        phi = [torch.cat([torch.nn.functional.normalize(h[i].flatten(), dim=0) for i in layers]) for h in (policy, reference)]
        total = total + (phi[0] - phi[1]).pow(2).sum()
    return total / batch["input_ids"].size(0)


def _lora_grads(model, value):
    """d value / d LoRA weights through .backward() (reentrant checkpointing does not support autograd.grad)."""
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    for p in lora:
        p.grad = None
    value.backward()
    return [p.grad.clone() for p in lora]


@pytest.mark.parametrize("padding", ["exclude", "keep"])
@pytest.mark.parametrize("lengths", [(7, 4), (6, 6)], ids=["padded", "unpadded"])
def test_ldifs_value_and_gradient_equal_a_hand_computation_from_hooked_block_outputs(padding, lengths):
    """The features are the blocks' own outputs, the last one before the final norm (layer 3 of 4 is selected)."""
    model = peft_wrap(tiny_llama(), random_b=True)
    batch = padded_batch(lengths=lengths)
    defense = LdifsDefense(layers=(0, 2, 3), padding=padding)
    defense.setup(model, DefenseContext())
    value = defense.extra_loss(model, batch, _ldifs_step(model, batch, defense), DefenseContext())["ldifs"]
    expected = _hand_ldifs(model, batch, (0, 2, 3), padding)
    assert value.item() > 1e-6
    assert value.item() == pytest.approx(expected.item(), rel=1e-5)
    for got, want in zip(_lora_grads(model, value), _lora_grads(model, expected)):
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-7)


def test_ldifs_excluded_padding_makes_the_value_independent_of_the_batch_padding():
    model = peft_wrap(tiny_llama(), random_b=True)
    defense = LdifsDefense(layers=(1, 3))
    defense.setup(model, DefenseContext())
    short = padded_batch(lengths=(5,), seed=3)
    padded = {k: torch.nn.functional.pad(v, (0, 4), value=-100 if k == "labels" else 0) for k, v in short.items()}
    values = [defense.extra_loss(model, b, _ldifs_step(model, b, defense), DefenseContext())["ldifs"].item()
              for b in (short, padded)]
    assert values[0] == pytest.approx(values[1], rel=1e-5)
    keep = LdifsDefense(layers=(1, 3), padding="keep")
    kept = keep.extra_loss(model, padded, _ldifs_step(model, padded, keep), DefenseContext())["ldifs"].item()
    assert kept != pytest.approx(values[0], rel=1e-3)  # the released behaviour does depend on it


@pytest.mark.parametrize("reentrant", [True, False])
def test_ldifs_under_gradient_checkpointing_equals_the_plain_forward(reentrant):
    """The last block's output is caught on its way into the final norm, which runs outside the checkpointed
    blocks, so value and gradient are unchanged by checkpointing (Unsloth's CUDA path checkpoints too)."""
    model, batch, defense, _ = _ldifs_setup(released=False)
    model.train()
    plain = defense.extra_loss(model, batch, _ldifs_step(model, batch, defense), DefenseContext())["ldifs"]
    plain_grads = _lora_grads(model, plain)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    model.enable_input_require_grads()
    checkpointed = defense.extra_loss(model, batch, _ldifs_step(model, batch, defense), DefenseContext())["ldifs"]
    assert checkpointed.item() == pytest.approx(plain.item(), rel=1e-6)
    for got, want in zip(_lora_grads(model, checkpointed), plain_grads):
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-7)


def test_block_outputs_take_the_last_block_before_the_final_norm_and_leave_no_hook():
    from emalib.model.modeling import block_outputs, last_block_output

    model = peft_wrap(tiny_llama(), random_b=True)
    batch = padded_batch()
    with torch.no_grad():
        model(input_ids=batch["input_ids"][:, :2], output_hidden_states=True)  # transformers' recorders: installed once
    hooks = hook_count(model)
    with torch.no_grad(), last_block_output(model) as last:
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
    assert hook_count(model) == hooks
    blocks = block_outputs(out.hidden_states, last["output"])
    with torch.no_grad():
        hooked = _hooked_block_outputs(model, batch["input_ids"], batch["attention_mask"])
    assert len(blocks) == 4 and all(torch.equal(a, b) for a, b in zip(blocks, hooked))
    assert not torch.allclose(out.hidden_states[-1], hooked[-1])  # transformers' last entry is after the norm


def test_ldifs_released_flag_sends_exactly_no_gradient():
    model, batch, defense, outputs = _ldifs_setup(released=True)
    value = defense.extra_loss(model, batch, outputs, DefenseContext())["ldifs"]
    assert value.item() > 1e-6 and not value.requires_grad  # same value, but a constant
    # Mixed with a task loss that does train, the LDIFS part adds exactly nothing to the gradient.
    task = outputs.policy.logits.float().pow(2).mean()
    grads_task = torch.autograd.grad(task, [p for n, p in model.named_parameters() if "lora_" in n], retain_graph=True)
    grads_both = torch.autograd.grad(task + 1.0 * value, [p for n, p in model.named_parameters() if "lora_" in n])
    assert all(torch.equal(a, b) for a, b in zip(grads_task, grads_both))


@pytest.mark.parametrize("chunk_rows", [1000, 2, 3])
@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_token_kl_gradient_matches_the_written_out_formula(direction, chunk_rows, monkeypatch):
    """token_kl computes its gradient itself, chunk by chunk; value and gradient must equal
    sum_v p (log p - log q) written out and differentiated by autograd, whatever the chunking, with padding and
    with counted positions in several separate runs."""
    import torch.nn.functional as F

    import emalib.model.losses

    monkeypatch.setattr(emalib.model.losses, "chunk_rows", lambda vocab, device: chunk_rows)
    torch.manual_seed(0)
    policy = torch.randn(2, 5, 11, requires_grad=True)
    reference = torch.randn(2, 5, 11)
    mask = torch.ones(2, 5)
    mask[0, 1] = 0  # a hole: the counted positions form two runs in the first sequence
    mask[1, 3:] = 0
    value = token_kl(policy, reference, mask, direction)
    (fused,) = torch.autograd.grad(2.5 * value, policy)
    logp, logq = F.log_softmax(policy, -1), F.log_softmax(reference, -1)
    if direction == "reverse":
        logp, logq = logq, logp
    expected = ((logp.exp() * (logp - logq)).sum(-1) * mask).sum() / mask.sum()
    (written,) = torch.autograd.grad(2.5 * expected, policy)
    assert torch.allclose(value, expected, atol=1e-6) and torch.allclose(fused, written, atol=1e-6)
    assert fused[0, 1].abs().sum() == 0 and fused[1, 3:].abs().sum() == 0  # uncounted positions: no gradient
    # A reference that itself requires grad takes the autograd path, and gets its own gradient.
    reference_leaf = reference.clone().requires_grad_(True)
    both = token_kl(policy, reference_leaf, mask, direction)
    grads = torch.autograd.grad(2.5 * both, [policy, reference_leaf])
    assert torch.allclose(both, expected, atol=1e-6) and torch.allclose(grads[0], written, atol=1e-6)
    assert grads[1].abs().sum() > 0


def test_token_kl_adds_into_the_task_gradient_and_refuses_a_second_backward():
    """Used as in training (task loss + weighted KL on the same logits): the summed gradient is right, and a
    second backward through the same graph fails loudly instead of reusing a gradient already scaled in place."""
    import torch.nn.functional as F

    torch.manual_seed(1)
    logits = torch.randn(2, 4, 7, requires_grad=True)
    reference = torch.randn(2, 4, 7)
    mask = torch.ones(2, 4)
    task = logits.pow(2).mean()
    (combined,) = torch.autograd.grad(task + 0.1 * token_kl(logits, reference, mask), logits)
    logp, logq = F.log_softmax(logits, -1), F.log_softmax(reference, -1)
    written = logits.pow(2).mean() + 0.1 * (logp.exp() * (logp - logq)).sum(-1).mean()
    (expected,) = torch.autograd.grad(written, logits)
    assert torch.allclose(combined, expected, atol=1e-6)
    loss = token_kl(logits, reference, mask)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()


