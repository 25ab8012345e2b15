"""Pure tensor functions for training losses. Shapes: B batch, T tokens, V vocabulary."""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def token_cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token cross-entropy over labelled positions, and the number of those positions.

    logits: [B, T, V]; labels: [B, T] with IGNORE_INDEX where no loss is taken (prompt, padding).
    Computed from the logits rather than by passing labels to the model: Unsloth returns empty logits when
    labels are passed, and later defenses (KL) need the real logits anyway.
    """
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:]
    total = F.cross_entropy(shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1),
                            ignore_index=IGNORE_INDEX, reduction="sum")
    return total, shift_labels.ne(IGNORE_INDEX).sum()
