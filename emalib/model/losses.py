"""Pure tensor functions for training losses. Shapes: B batch, T tokens, V vocabulary."""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def token_cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor,
                            chunked: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token cross-entropy over labelled positions, and the number of those positions.

    logits: [B, T, V]; labels: [B, T] with IGNORE_INDEX where no loss is taken (prompt, padding).
    Computed from the logits rather than by passing labels to the model: Unsloth returns empty logits when
    labels are passed, and later defenses (KL) need the real logits anyway. chunked (default) computes the value
    and its gradient a few labelled positions at a time (`_ChunkedTokenCE`, docs/methods.md#vocabulary-sized-tensors);
    False is the plain autograd computation (kept as the benchmarks' and tests' comparison).
    """
    # Shift the labels, not the logits: position t predicts label t+1 and the last position predicts nothing.
    # A slice of the logits would cost a vocabulary-sized zero-filled gradient buffer in the backward pass.
    next_labels = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    n_labelled = next_labels.ne(IGNORE_INDEX).sum()
    if not chunked:
        total = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), next_labels.reshape(-1),
                                ignore_index=IGNORE_INDEX, reduction="sum")
        return total, n_labelled
    return _ChunkedTokenCE.apply(logits, next_labels), n_labelled


class _ChunkedTokenCE(torch.autograd.Function):
    """sum_t -log softmax(z_t)[y_t] over labelled positions and its gradient softmax(z_t) - onehot(y_t), computed
    in one pass over chunks of the labelled positions. The plain computation holds an fp32 copy of the logits and
    their log-softmax ([N, V] each) until the backward pass; here only the gradient is full-size (in the logits'
    dtype, as the backward through the output layer needs it anyway)."""

    @staticmethod
    def forward(ctx, logits, next_labels):
        vocab = logits.size(-1)
        rows, targets = logits.reshape(-1, vocab), next_labels.reshape(-1)
        writer = _RowGradient(logits, ctx.needs_input_grad[0])
        total = torch.zeros((), dtype=torch.float32, device=logits.device)
        for start, stop in counted_row_ranges(targets.ne(IGNORE_INDEX), chunk_rows(vocab, logits.device)):
            logp = F.log_softmax(rows[start:stop].float(), dim=-1)
            target = targets[start:stop].unsqueeze(1)
            total -= logp.gather(1, target).sum()
            writer.write(start, stop, lambda: logp.exp_().scatter_add_(1, target, torch.full_like(logp[:, :1], -1.0)))
        ctx.grad = writer.finish()
        return total

    @staticmethod
    def backward(ctx, grad_output):
        return _release_scaled(ctx, grad_output, "token_cross_entropy_sum"), None


class _RowGradient:
    """A vocabulary-sized gradient buffer filled chunk by chunk: rows of counted chunks are written, the rows
    between them zeroed. Allocated empty, not zeroed: a fill of a fresh [N, V] buffer costs as much as the loss
    itself on a CPU."""

    def __init__(self, like: torch.Tensor, wanted: bool):
        self.full = torch.empty_like(like) if wanted else None
        self.rows = self.full.view(-1, like.size(-1)) if wanted else None
        self.done = 0  # rows [0, done) are written

    def write(self, start: int, stop: int, chunk_gradient) -> None:
        if self.rows is None:
            return
        self.rows[self.done:start].zero_()
        self.rows[start:stop].copy_(chunk_gradient())
        self.done = stop

    def finish(self) -> torch.Tensor | None:
        if self.rows is not None:
            self.rows[self.done:].zero_()
        return self.full


def _release_scaled(ctx, grad_output: torch.Tensor, name: str) -> torch.Tensor:
    """The gradient kept by forward, scaled in place and released, so autograd can add another term's gradient
    into it without a copy."""
    if ctx.grad is None:
        raise RuntimeError(f"{name}: backward ran twice through the same graph (its gradient is used once)")
    grad, ctx.grad = ctx.grad, None
    return grad.mul_(grad_output.to(grad.dtype))


def token_kl(policy_logits: torch.Tensor, reference_logits: torch.Tensor, mask: torch.Tensor,
             direction: str = "forward", chunked: bool = True) -> torch.Tensor:
    """Mean per-token KL divergence between two next-token distributions over the masked positions.

    policy_logits, reference_logits: [B, T, V]; mask: [B, T] (1 where the position counts).
    forward: KL_t = sum_v p_theta (log p_theta - log p_ref), i.e. KL(p_theta || p_ref) (docs/methods.md#kl-divergence);
    reverse: KL(p_ref || p_theta). Result: sum_t mask_t KL_t / sum_t mask_t (0 when nothing is masked in).

    The reference is a fixed target (computed under no_grad), so the value and its gradient are computed
    together, a few positions at a time (`_ChunkedTokenKL`); a reference that requires grad, or chunked=False (the
    benchmarks' and tests' comparison), takes the plain autograd path instead.
    """
    if direction not in ("forward", "reverse"):
        raise ValueError(f"direction must be 'forward' or 'reverse', got {direction!r}")
    weights = mask.reshape(-1).float()
    weights = weights / weights.sum().clamp(min=1)
    if reference_logits.requires_grad or not chunked:
        vocab = policy_logits.size(-1)
        return _token_kl_autograd(policy_logits.reshape(-1, vocab), reference_logits.reshape(-1, vocab),
                                  weights, direction == "reverse")
    # The logits go in unreshaped: a reshape here would hand autograd a view of the gradient, which it cannot
    # add the task loss's gradient into in place (one more vocabulary-sized buffer per step).
    return _ChunkedTokenKL.apply(policy_logits, reference_logits, weights, direction == "reverse")


def _token_kl_autograd(policy: torch.Tensor, reference: torch.Tensor, weights: torch.Tensor,
                       reverse: bool) -> torch.Tensor:
    logp, logq = F.log_softmax(policy.float(), dim=-1), F.log_softmax(reference.float(), dim=-1)
    if reverse:
        logp, logq = logq, logp
    # kl_div(input=log q, target=log p, log_target=True) = p (log p - log q), elementwise.
    return (F.kl_div(logq, logp, log_target=True, reduction="none").sum(-1) * weights).sum()


def chunk_rows(vocab: int, device: torch.device) -> int:
    """Positions per chunk of a vocabulary-sized computation: ~32 MB of fp32 logits on a CPU, ~256 MB on a GPU.
    On the 2-core box, chunks of a few rows are several times slower than the unchunked computation at 49k and
    152k vocabularies alike (per-call overhead of softmax over a long row); 32 MB ones match it."""
    elements = 2 ** 26 if device.type == "cuda" else 2 ** 23
    return max(1, elements // vocab)


class _ChunkedTokenKL(torch.autograd.Function):
    """sum_t w_t KL_t and its gradient with respect to the policy logits, computed in one pass over chunks of
    the counted positions.

    With p = softmax(policy), q = softmax(reference), d = log p - log q:
      forward  KL(p || q): dKL_t / dz = p * (d - KL_t);   reverse KL(q || p): dKL_t / dz = p - q.
    Autograd through log_softmax and kl_div keeps five vocabulary-sized [N, V] tensors alive and walks them again
    in the backward pass; here the only full-size tensor is the gradient, written as each chunk is done, and
    positions with zero weight (padding, or prompt tokens when only assistant tokens count) are skipped.
    """

    @staticmethod
    def forward(ctx, policy_logits, reference_logits, weights, reverse):
        vocab = policy_logits.size(-1)
        policy, reference = policy_logits.reshape(-1, vocab), reference_logits.reshape(-1, vocab)
        writer = _RowGradient(policy_logits, ctx.needs_input_grad[0])
        total = torch.zeros((), dtype=torch.float32, device=policy.device)
        for start, stop in counted_row_ranges(weights, chunk_rows(vocab, policy.device)):
            kl, chunk_grad = kl_rows(policy[start:stop], reference[start:stop], reverse)
            w = weights[start:stop]
            total += (kl * w).sum()
            writer.write(start, stop, lambda: chunk_grad.mul_(w.unsqueeze(1)))
        ctx.grad = writer.finish()
        return total

    @staticmethod
    def backward(ctx, grad_output):
        return _release_scaled(ctx, grad_output, "token_kl"), None, None, None


def kl_rows(policy: torch.Tensor, reference: torch.Tensor, reverse: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row KL of two [n, V] logit chunks and its gradient with respect to the policy logits ([n], [n, V] fp32).

    forward KL(p || q): dKL / dz = p * (d - KL) with d = log p - log q;  reverse KL(q || p): dKL / dz = p - q.
    """
    logp = F.log_softmax(policy.float(), dim=-1)
    logq = F.log_softmax(reference.float(), dim=-1)
    p = logp.exp()
    if reverse:
        q = logq.exp()
        return (q * (logq - logp)).sum(-1), p.sub_(q)
    d = logp.sub_(logq)
    kl = (p * d).sum(-1)
    return kl, p.mul_(d.sub_(kl.unsqueeze(1)))


def counted_row_ranges(weights: torch.Tensor, longest: int) -> list[tuple[int, int]]:
    """[start, stop) ranges of consecutive rows with non-zero weight, each at most `longest` rows: in a padded
    batch the counted rows come in a few long runs (one per sequence, or per assistant turn)."""
    counted = weights.nonzero().squeeze(1).cpu()
    if counted.numel() == 0:
        return []
    breaks = ((counted.diff() != 1).nonzero().squeeze(1) + 1).tolist()
    ranges = []
    for first, last in zip([0, *breaks], [*breaks, counted.numel()]):
        begin, end = int(counted[first]), int(counted[last - 1]) + 1
        ranges += [(lo, min(lo + longest, end)) for lo in range(begin, end, longest)]
    return ranges


def ldifs_features(hidden_states: list[torch.Tensor] | tuple[torch.Tensor, ...], mask: torch.Tensor,
                   exclude_padding: bool = True) -> torch.Tensor:
    """LDIFS feature vector per example: each layer's [T, D] activations flattened and l2-normalised, then
    concatenated over layers.

    hidden_states: n tensors [B, T, D] (the selected block outputs); mask: [B, T] (1 on real tokens). Returns
    [B, n*T*D]. exclude_padding zeroes padded positions first, so they add nothing to a norm or a distance and the
    value does not depend on how a batch is padded; False keeps them, as the released extractor does.
    """
    if exclude_padding:
        keep = mask.unsqueeze(-1).to(hidden_states[0].dtype)
        hidden_states = [h * keep for h in hidden_states]
    parts = [F.normalize(h.flatten(1).float(), dim=-1) for h in hidden_states]
    return torch.cat(parts, dim=-1)


def ldifs_distance(policy_features: torch.Tensor, reference_features: torch.Tensor) -> torch.Tensor:
    """Batch mean of the squared l2 distance between feature vectors [B, F] (docs/methods.md#ldifs)."""
    return (policy_features - reference_features).pow(2).sum(-1).mean()
