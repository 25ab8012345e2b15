"""The task cross-entropy from the final hidden states equals the logits path, in value and gradient."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from emalib.model import hidden_loss
from emalib.model.hidden_loss import hidden_cross_entropy_sum
from emalib.model.losses import IGNORE_INDEX


def test_value_and_gradient_equal_the_plain_cross_entropy(monkeypatch):
    monkeypatch.setattr(hidden_loss, "chunk_rows", lambda vocab, device: 3)  # several chunks, one split mid-run
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 7, 16, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 16, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 50, (2, 7), generator=gen)
    labels[0, :3] = IGNORE_INDEX  # a prompt
    labels[1, 5:] = IGNORE_INDEX  # padding
    total, n = hidden_cross_entropy_sum(hidden, weight, labels)
    total.backward()
    # Independent: position t predicts labels[t+1], through the full logits.
    expected_hidden = hidden.detach().clone().requires_grad_(True)
    logits = expected_hidden[:, :-1] @ weight.T
    expected = F.cross_entropy(logits.reshape(-1, 50), labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX,
                               reduction="sum")
    expected.backward()
    assert n == labels[:, 1:].ne(IGNORE_INDEX).sum()
    # The chunks' softmax is taken in fp32 (as on the logits path), hence the tolerance on float64 inputs.
    assert torch.allclose(total.double(), expected, rtol=1e-6)
    assert torch.allclose(hidden.grad, expected_hidden.grad, rtol=1e-5, atol=1e-6)


def test_a_trained_output_layer_is_refused():
    with pytest.raises(ValueError, match="logits path"):
        hidden_cross_entropy_sum(torch.zeros(1, 2, 4), torch.zeros(5, 4, requires_grad=True), torch.zeros(1, 2).long())


def _loss_and_lora_grads(trainer, model, batch):
    model.zero_grad()
    loss = trainer.compute_loss(model, dict(batch))
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if "lora_" in n}


def test_trainer_loss_from_hidden_states_equals_the_logits_path(tokenizer, tiny_model, tmp_path, monkeypatch):
    from transformers import TrainingArguments

    from emalib.data.standins import em_standin_conversations
    from emalib.defenses.base import DefenseContext
    from emalib.defenses.kl import KLDefense
    from emalib.defenses.ldifs import LdifsDefense
    from emalib.defenses.stack import DefenseStack
    from emalib.model.tokenize import ChatDataset, collate
    from emalib.training import trainer as trainer_module
    from tests.test_losses_and_trainer import peft_tiny

    model = peft_tiny(tiny_model)
    batch = collate(ChatDataset.build(tokenizer, em_standin_conversations()[:3], 128).features,
                    tokenizer.pad_token_id)
    trainer = trainer_module.EmTrainer(model=model, args=TrainingArguments(output_dir=str(tmp_path), report_to="none",
                                                                           use_cpu=True))
    step = trainer_module.step_forwards(model, {k: batch[k] for k in ("input_ids", "attention_mask")},
                                        trainer.defenses, DefenseContext())
    assert step.policy_hidden is not None and step.policy.logits.shape[1] == 1  # no [B, T, V] tensor
    hidden_loss_value, hidden_grads = _loss_and_lora_grads(trainer, model, batch)
    monkeypatch.setattr(trainer_module, "loss_from_hidden", lambda model, stack: False)
    logits_loss_value, logits_grads = _loss_and_lora_grads(trainer, model, batch)
    assert torch.allclose(hidden_loss_value, logits_loss_value, rtol=1e-5)
    assert hidden_grads.keys() == logits_grads.keys() and hidden_grads
    for name, grad in hidden_grads.items():
        assert torch.allclose(grad, logits_grads[name], rtol=1e-4, atol=1e-7), name
    monkeypatch.undo()
    assert trainer_module.loss_from_hidden(model, DefenseStack([LdifsDefense()]))  # reads hidden states only
    assert not trainer_module.loss_from_hidden(model, DefenseStack([KLDefense()]))  # reads the policy's logits


def test_final_hidden_states_are_captured_when_the_norm_module_is_not_called(tokenizer, tiny_model, tmp_path,
                                                                           monkeypatch):
    """Unsloth's fast forward (CUDA only, so imitated here) applies the final norm as a function of its weight:
    the norm module's hooks never run. The capture sits on the backbone's output, so the scoring paths and the
    trainer's loss from hidden states still see the final norm's output."""
    from transformers import TrainingArguments

    from emalib.data.standins import em_standin_conversations
    from emalib.defenses.base import DefenseContext
    from emalib.model.modeling import final_norm
    from emalib.model.token_scores import final_hidden_states
    from emalib.model.tokenize import ChatDataset, collate
    from emalib.training import trainer as trainer_module
    from tests.test_losses_and_trainer import peft_tiny

    model = peft_tiny(tiny_model)
    norm = final_norm(model)

    class CalledAsAFunction(type(norm)):
        def __call__(self, *args, **kwargs):  # as fast_rms_layernorm(self.norm, h): no module hooks
            return self.forward(*args, **kwargs)

    norm.__class__ = CalledAsAFunction
    fired = []
    norm.register_forward_hook(lambda *args: fired.append(True))
    batch = collate(ChatDataset.build(tokenizer, em_standin_conversations()[:2], 96).features, tokenizer.pad_token_id)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        full = model(**inputs, output_hidden_states=True)
        hidden = final_hidden_states(model, **inputs)
    assert not fired  # a hook on the norm would have captured nothing
    assert torch.allclose(hidden, full.hidden_states[-1])
    assert torch.allclose(model.get_output_embeddings()(hidden), full.logits, atol=1e-5)

    trainer = trainer_module.EmTrainer(model=model, args=TrainingArguments(output_dir=str(tmp_path), report_to="none",
                                                                           use_cpu=True))
    step = trainer_module.step_forwards(model, inputs, trainer.defenses, DefenseContext())
    assert step.policy.logits.shape[1] == 1 and torch.allclose(step.policy_hidden, full.hidden_states[-1])
    from_hidden = _loss_and_lora_grads(trainer, model, batch)
    monkeypatch.setattr(trainer_module, "loss_from_hidden", lambda model, stack: False)
    from_logits = _loss_and_lora_grads(trainer, model, batch)
    assert torch.allclose(from_hidden[0], from_logits[0], rtol=1e-5)
    for name, grad in from_hidden[1].items():
        assert torch.allclose(grad, from_logits[1][name], rtol=1e-4, atol=1e-7), name
