"""KL on a retain set (docs/methods.md#kl-on-a-retain-set; Soligo et al. 2026): the KL term of the KL defense,
computed on rows of aligned data from other domains instead of on the task rows.

round(ratio * |task|) retain conversations are drawn from `source` (as interleaving draws its safe data) and
shuffled into the task data as `RetainConversation`s: tokenisation gives them no labels, so they add nothing to the
task loss, and marks their rows (`batch["retain"]`). The term is `token_kl` (the KL defense's maths) over the retain
rows' positions only; a micro-batch without a retain row adds 0.
"""

from __future__ import annotations

import torch

from emalib.data.chat import RetainConversation
from emalib.defenses.base import Conversation, DefenseBase, DefenseContext, StepOutputs
from emalib.defenses.interleave import load_pool, mix_in, safe_count, sample_safe
from emalib.defenses.kl import kl_mask
from emalib.model.losses import token_kl


def retain_mask(batch: dict[str, torch.Tensor], tokens: str) -> torch.Tensor:
    """[B, T] positions of the retain rows whose next-token distribution counts (kl_mask's rule on those rows);
    all zeros when the batch has no retain row."""
    if "retain" not in batch:
        return torch.zeros_like(batch["attention_mask"])
    rows = batch["retain"].to(batch["attention_mask"].dtype)[:, None]
    retain_view = {"attention_mask": batch["attention_mask"] * rows, "labels": batch["retain_labels"]}
    return kl_mask(retain_view, tokens) * rows


class KLRetainDefense(DefenseBase):
    needs_reference = True
    needs_policy_logits = True
    has_loss = True

    def __init__(self, name: str = "kl_retain", weight: float = 0.1, direction: str = "forward",
                 tokens: str = "all", source: str = "wildguard_benign", ratio: float = 1.0, seed: int | None = None):
        self.name, self.weight, self.direction, self.tokens = name, weight, direction, tokens
        self.source, self.ratio, self.seed = source, ratio, seed

    def transform_data(self, conversations: list[Conversation], ctx: DefenseContext) -> list[Conversation]:
        seed = ctx.seed if self.seed is None else self.seed
        n = safe_count(len(conversations), self.ratio)
        retain = [RetainConversation(m) for m in sample_safe(load_pool(self.source), n, seed, self.source)]
        ctx.notes[self.name] = {"source": self.source, "ratio": self.ratio, "n_task": len(conversations),
                                "n_retain": n}
        return mix_in(conversations, retain, seed)

    def extra_loss(self, model, batch, outputs: StepOutputs, ctx: DefenseContext) -> dict[str, torch.Tensor]:
        mask = retain_mask(batch, self.tokens)
        return {self.name: token_kl(outputs.policy.logits, outputs.reference.logits, mask, self.direction)}
