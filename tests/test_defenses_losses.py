"""KL and LDIFS: the pure maths against hand computations, and the defenses on tiny PEFT models."""

import copy
import math

import pytest
import torch
from defense_helpers import padded_batch, peft_wrap, single_thread, tiny_llama  # noqa: F401 (autouse fixture)

from emalib.defenses.base import DefenseContext, StepOutputs
from emalib.defenses.kl import KLDefense, kl_mask
from emalib.defenses.ldifs import LdifsDefense, select_layers
from emalib.losses import ldifs_features, token_kl
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


def _ldifs_setup(released: bool):
    model = peft_wrap(tiny_llama(), random_b=True)
    batch = padded_batch()
    defense = LdifsDefense(layers=(0, 2, 3), released_no_grad_bug=released)
    ctx = DefenseContext()
    defense.setup(model, ctx)
    forward = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    outputs = StepOutputs(model(**forward, output_hidden_states=True),
                          reference_forward(model, **forward, output_hidden_states=True))
    return model, batch, defense, outputs


def test_ldifs_value_matches_an_independent_computation_and_its_gradient_reaches_lora():
    model, batch, defense, outputs = _ldifs_setup(released=False)
    value = defense.extra_loss(model, batch, outputs, DefenseContext())["ldifs"]
    with torch.no_grad(), model.disable_adapter():
        ref_hidden = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           output_hidden_states=True).hidden_states
        pol_hidden = [h.detach() for h in outputs.policy.hidden_states]
    total = 0.0
    for row, n in enumerate(batch["attention_mask"].sum(1).tolist()):
        phi_p = torch.cat([pol_hidden[i + 1][row, :n].flatten() / pol_hidden[i + 1][row, :n].norm() for i in (0, 2, 3)])
        phi_r = torch.cat([ref_hidden[i + 1][row, :n].flatten() / ref_hidden[i + 1][row, :n].norm() for i in (0, 2, 3)])
        total += (phi_p - phi_r).pow(2).sum().item()
    assert value.item() == pytest.approx(total / 2, rel=1e-4) and value.item() > 1e-6
    value.backward()
    lora = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert lora and all(p.grad is not None for p in lora.values())
    assert sum(p.grad.abs().sum().item() for p in lora.values()) > 0


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

    import emalib.losses

    monkeypatch.setattr(emalib.losses, "_chunk_rows", lambda vocab, device: chunk_rows)
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


