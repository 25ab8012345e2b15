"""The task cross-entropy from the final hidden states, a chunk of labelled positions at a time: no
[batch, length, vocabulary] logits tensor and no logits gradient exist (docs/methods.md#vocabulary-sized-tensors).

For a model whose logits are `W · h` (h: the final norm's output; `emalib.model.token_scores.output_layer`), the
value and the gradient with respect to h are computed together per chunk: dCE_t/dh_t = (softmax(W h_t) − onehot) W.
The only full-size tensor kept is that gradient, [B, T, D]. The output layer's weight is frozen (LoRA does not train
it), so no gradient flows to W.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from emalib.model.losses import IGNORE_INDEX, chunk_rows, counted_row_ranges


def hidden_cross_entropy_sum(hidden: torch.Tensor, head_weight: torch.Tensor,
                             labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What `token_cross_entropy_sum(hidden @ head_weight.T, labels)` returns, without the logits.

    hidden: [B, T, D] final norm outputs; head_weight: [V, D], frozen; labels: [B, T] with IGNORE_INDEX where no
    loss is taken. Returns the summed next-token cross-entropy and the number of labelled positions."""
    if head_weight.requires_grad:
        raise ValueError("hidden_cross_entropy_sum: the output layer is trained; use the logits path")
    next_labels = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    return _ChunkedHiddenCE.apply(hidden, head_weight, next_labels), next_labels.ne(IGNORE_INDEX).sum()


class _ChunkedHiddenCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, head_weight, next_labels):
        rows, targets = hidden.reshape(-1, hidden.size(-1)), next_labels.reshape(-1)
        grad = torch.zeros_like(rows) if ctx.needs_input_grad[0] else None  # [N, D]: small beside [N, V]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start, stop in counted_row_ranges(targets.ne(IGNORE_INDEX), chunk_rows(head_weight.size(0), hidden.device)):
            logp = F.log_softmax((rows[start:stop] @ head_weight.T).float(), dim=-1)
            target = targets[start:stop].unsqueeze(1)
            total -= logp.gather(1, target).sum()
            if grad is not None:
                dlogits = logp.exp_().scatter_add_(1, target, torch.full_like(logp[:, :1], -1.0))
                grad[start:stop] = dlogits.to(head_weight.dtype) @ head_weight
        ctx.grad = None if grad is None else grad.view_as(hidden)
        return total

    @staticmethod
    def backward(ctx, grad_output):
        if ctx.grad is None:
            raise RuntimeError("hidden_cross_entropy_sum: backward ran twice through the same graph")
        grad, ctx.grad = ctx.grad, None
        return grad.mul_(grad_output.to(grad.dtype)), None, None
