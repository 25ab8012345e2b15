"""Test oracles: the plain computations (full logits, no chunking) that emalib's bounded-memory versions must equal.
They live here, not in the package, because only the tests compare against them."""

from __future__ import annotations

import torch

from emalib.model.losses import IGNORE_INDEX


def per_token_logprob(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean log-probability of the labelled tokens of each row. logits [B, T, V], labels [B, T] -> [B]."""
    logprobs = logits[:, :-1].float().log_softmax(-1)
    targets = labels[:, 1:]
    mask = targets.ne(IGNORE_INDEX)
    picked = logprobs.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * mask).sum(-1) / mask.sum(-1).clamp(min=1)


def masked_token_kl(logits: torch.Tensor, base_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean over labelled positions of KL(p || p_base) of the next-token distributions. Shapes [B, T, V]."""
    logp = logits[:, :-1].float().log_softmax(-1)
    logq = base_logits[:, :-1].float().log_softmax(-1)
    kl = (logp.exp() * (logp - logq)).sum(-1)
    mask = labels[:, 1:].ne(IGNORE_INDEX)
    return (kl * mask).sum() / mask.sum().clamp(min=1)
