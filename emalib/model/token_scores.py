"""Per-token log-probabilities and KL between next-token distributions, computed from a causal LM's final hidden
states a chunk of positions at a time, so no [B, T, V] logits tensor is ever made (docs/methods.md#vocabulary-sized-tensors).

For a model whose logits are `output_layer(final_norm(h))` (Qwen2, Llama, SmolLM2 and their PEFT/Unsloth
wrappers), the forward runs with `logits_to_keep=1` (logits of the last position only) while a hook keeps the
final norm's output; the logits of `chunk_rows` positions at a time are then one matrix product each. Extra
memory: a chunk of fp32 logits and its temporaries instead of batch x length x vocabulary. Used by the scoring
paths under no_grad (Interleaving+ NLL, the judge-free signals); training keeps the model's logits because the
output layer's backward needs them (emalib/model/losses.py chunks its losses over positions instead).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from emalib.core.errors import EmalibError
from emalib.model.losses import IGNORE_INDEX, chunk_rows, counted_row_ranges, kl_rows
from emalib.model.modeling import final_norm_output


def output_layer(model) -> torch.nn.Module:
    """The layer mapping final hidden states to logits; models that scale or cap logits after it are refused."""
    config = model.config
    for name in ("final_logit_softcapping", "logit_scale"):
        if getattr(config, name, None) not in (None, 1.0):
            raise EmalibError(f"{type(model).__name__}: logits from hidden states do not apply its {name}")
    return model.get_output_embeddings()


def final_hidden_states(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, **extra) -> torch.Tensor:
    """[B, T, D] final norm outputs of one forward that computes the logits of the last position only."""
    with final_norm_output(model) as captured:
        model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=1, use_cache=False, **extra)
    if "output" not in captured:
        raise EmalibError(f"{type(model).__name__}: the final norm did not run (no hidden states to score)")
    return captured["output"]


def _shifted(hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows that predict a token ([B*(T-1), D]) and the token each predicts ([B*(T-1)])."""
    return hidden[:, :-1].reshape(-1, hidden.size(-1)), labels[:, 1:].reshape(-1)


@torch.no_grad()
def label_logprobs(hidden: torch.Tensor, head: torch.nn.Module, labels: torch.Tensor) -> torch.Tensor:
    """[B, T-1]: log p(labels[:, t+1] | tokens <= t) where that label is not IGNORE_INDEX, else 0."""
    rows, targets = _shifted(hidden, labels)
    out = torch.zeros(targets.shape, dtype=torch.float32, device=hidden.device)
    for start, stop in counted_row_ranges(targets.ne(IGNORE_INDEX), chunk_rows(head.weight.size(0), hidden.device)):
        logits = head(rows[start:stop]).float()
        picked = logits.gather(1, targets[start:stop].unsqueeze(1)).squeeze(1)
        out[start:stop] = picked - torch.logsumexp(logits, dim=-1)
    return out.view(labels.size(0), -1)


@torch.no_grad()
def label_logprobs_and_kl(hidden: torch.Tensor, reference_hidden: torch.Tensor, head: torch.nn.Module,
                          labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """label_logprobs of `hidden` and, at the same positions, KL(p || p_ref) of the next-token distributions
    ([B, T-1] each, 0 where the next label is IGNORE_INDEX), from one product per model and chunk."""
    rows, targets = _shifted(hidden, labels)
    reference_rows, _ = _shifted(reference_hidden, labels)
    logprobs = torch.zeros(targets.shape, dtype=torch.float32, device=hidden.device)
    kl = torch.zeros_like(logprobs)
    for start, stop in counted_row_ranges(targets.ne(IGNORE_INDEX), chunk_rows(head.weight.size(0), hidden.device)):
        logits = head(rows[start:stop]).float()
        picked = logits.gather(1, targets[start:stop].unsqueeze(1)).squeeze(1)
        logprobs[start:stop] = picked - torch.logsumexp(logits, dim=-1)
        kl[start:stop] = kl_rows(logits, head(reference_rows[start:stop]), reverse=False)[0]
    return logprobs.view(labels.size(0), -1), kl.view(labels.size(0), -1)


def mean_over_labels(per_position: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[B]: the mean of [B, T-1] per-position values over each row's labelled positions (NaN for none)."""
    counted = labels[:, 1:].ne(IGNORE_INDEX)
    return (per_position * counted).sum(1) / counted.sum(1)


def unchunked_label_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """label_logprobs from full logits [B, T, V] (the plain computation; the tests' and benchmarks' comparison)."""
    token_nll = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), labels[:, 1:], ignore_index=IGNORE_INDEX,
                                reduction="none")
    return -token_nll
