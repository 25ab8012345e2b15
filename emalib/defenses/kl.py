"""KL regularisation to the aligned model (docs/methods.md#kl-divergence): loss = CE + lambda * KL(p_theta || p_ref).

The reference is the same PEFT model with its adapter disabled; the trainer computes that forward once per
step (emalib/training/reference.py) and shares it with LDIFS. The maths is `emalib.model.losses.token_kl`.
"""

from __future__ import annotations

import torch

from emalib.defenses.base import DefenseBase, DefenseContext, StepOutputs
from emalib.model.losses import IGNORE_INDEX, token_kl


def kl_mask(batch: dict[str, torch.Tensor], tokens: str) -> torch.Tensor:
    """[B, T] positions whose next-token distribution counts.

    all: every non-padding position (the attention mask, as the released code); assistant: positions t whose
    next token t+1 is labelled, i.e. the distributions the task loss trains (the last position never is).
    """
    if tokens == "all":
        return batch["attention_mask"]
    if tokens == "assistant":
        labelled = batch["labels"][:, 1:].ne(IGNORE_INDEX)
        return torch.nn.functional.pad(labelled, (0, 1), value=False).to(batch["attention_mask"].dtype)
    raise ValueError(f"tokens must be 'all' or 'assistant', got {tokens!r}")


class KLDefense(DefenseBase):
    needs_reference = True
    needs_policy_logits = True  # the KL is taken over the policy's next-token distributions
    has_loss = True

    def __init__(self, name: str = "kl", weight: float = 0.1, direction: str = "forward", tokens: str = "all"):
        self.name, self.weight, self.direction, self.tokens = name, weight, direction, tokens

    def extra_loss(self, model, batch, outputs: StepOutputs, ctx: DefenseContext) -> dict[str, torch.Tensor]:
        mask = kl_mask(batch, self.tokens)
        return {self.name: token_kl(outputs.policy.logits, outputs.reference.logits, mask, self.direction)}
