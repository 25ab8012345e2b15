"""TReFT, token-regularized fine-tuning (docs/methods.md#treft; Zhao et al., "The Piggyback Hypothesis of
Generalization", arXiv 2606.06667).

Keeps the attention keys and values of the chat template's own tokens close to the initial model's:
    L_KV = (1/L) sum_l [ mean_t |k_t - k_t^init|^2 / |k_t^init|^2 + mean_t |v_t - v_t^init|^2 / |v_t^init|^2 ],
added as lambda * L_KV. region prefix: the tokens before the user's content (system block + user header);
postfix: those between the user's content and the assistant's (for thinking models).

variant paper (default): the real keys and values, caught at every layer's k_proj / v_proj outputs during the
training forward; each row's own region, located in its tokens (any padding side); per row the formula above,
then the mean over rows. The reference is the adapter-disabled model's keys and values on the row's tokens up to
the region's end: for the prefix it depends on the prefix tokens only (causal attention), so it is computed once
per distinct prefix and cached.
variant released: the authors' computation: k_proj / v_proj applied to hidden_states[l] (the residual stream
entering block l, embeddings at l = 0, without the block's input RMSNorm), at positions [:, :k] of every row,
k and the reference taken from the first row seen (right padding and one identical prefix assumed); postfix:
each row's last occurrence, the reference from the first row seen.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from emalib.core.errors import EmalibError
from emalib.defenses.base import DefenseBase, DefenseContext, StepOutputs
from emalib.model.kv_capture import attention_modules, captured_kv
from emalib.model.template_regions import postfix_ids, row_spans, user_header_ids

KV = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: (keys, values) [n, kv_dim]


def relative_drift(current: torch.Tensor, initial: torch.Tensor) -> torch.Tensor:
    """mean over tokens of |x - x_init|^2 / |x_init|^2 (the norm over the last dimension), in fp32."""
    initial = initial.float()
    distance = (current.float() - initial).norm(dim=-1) / initial.norm(dim=-1).clamp_min(1e-12)
    return distance.pow(2).mean()


def kv_drift(current: KV, initial: KV) -> torch.Tensor:
    """(1/L) sum_l [drift of keys + drift of values]."""
    return torch.stack([relative_drift(k, k0) + relative_drift(v, v0)
                        for (k, v), (k0, v0) in zip(current, initial)]).mean()


class TreftDefense(DefenseBase):
    has_loss = True

    def __init__(self, name: str = "treft", weight: float = 10.0, region: str = "prefix", variant: str = "paper",
                 drift_threshold: float = 0.0):
        if region not in ("prefix", "postfix") or variant not in ("paper", "released"):
            raise EmalibError(f"treft: region must be prefix|postfix and variant paper|released, got {region!r}, "
                              f"{variant!r}")
        self.name, self.weight, self.region, self.variant = name, weight, region, variant
        self.drift_threshold = drift_threshold
        self.needs_policy_hidden = variant == "released"  # it projects the policy's hidden_states itself
        self.region_tokens: list[int] | None = None
        self.attention: list[torch.nn.Module] = []
        self.cache: dict[tuple[int, ...], KV] = {}  # prefix tokens -> the initial model's keys and values
        self.released_reference: KV | None = None
        self.captured: dict[tuple[int, str], torch.Tensor] = {}

    def setup(self, model, ctx: DefenseContext) -> None:
        if not hasattr(model, "disable_adapter"):
            raise EmalibError("treft: the initial model is the adapter-disabled model; train with a LoRA adapter")
        self.region_tokens = (user_header_ids if self.region == "prefix" else postfix_ids)(ctx.tokenizer)
        self.attention = attention_modules(model)
        ctx.notes.setdefault(self.name, {}).update(
            region=self.region, variant=self.variant,
            region_marker=ctx.tokenizer.decode(self.region_tokens), layers=len(self.attention))

    @contextmanager
    def forward_context(self, model, ctx: DefenseContext):
        if self.variant != "paper":
            yield
            return
        with captured_kv(self.attention) as store:
            yield
        self.captured = store

    def extra_loss(self, model, batch, outputs: StepOutputs, ctx: DefenseContext) -> dict[str, torch.Tensor]:
        value = self._paper(model, batch) if self.variant == "paper" else self._released(model, batch, outputs)
        ctx.notes.setdefault(self.name, {})["distinct_prefixes"] = len(self.cache)
        if self.drift_threshold > 0 and self.weight > 0:
            # the released hinge max(lambda * L - tau, 0), returned unweighted (the trainer multiplies by lambda)
            value = (value - self.drift_threshold / self.weight).clamp(min=0)
        return {self.name: value}

    # --- paper: real keys and values, each row's own region -------------------------------------------------------

    def _paper(self, model, batch) -> torch.Tensor:
        captured, self.captured = self.captured, {}
        if len(captured) != 2 * len(self.attention):
            raise EmalibError("treft: no keys/values were caught at k_proj/v_proj in the training forward (the "
                              "engine's fused attention skips those modules?); use model.engine: hf")
        if torch.is_grad_enabled() and not any(t.requires_grad for t in captured.values()):
            raise EmalibError("treft: the caught keys/values carry no gradient (reentrant gradient checkpointing); "
                              "use model.engine: hf")
        mask = batch["attention_mask"]
        spans = row_spans(batch["input_ids"], mask, self.region_tokens, self.region)
        rows = []
        for row, span in enumerate(spans):
            if span is None:
                continue
            start, end = span
            first = int(mask[row].nonzero()[0])
            initial = self._initial_kv(model, batch["input_ids"][row, first:end].tolist(), start - first)
            current = [(captured[layer, "k"][row, start:end], captured[layer, "v"][row, start:end])
                       for layer in range(len(self.attention))]
            rows.append(kv_drift(current, initial))
        if not rows:
            raise EmalibError(f"treft: no row of the batch holds the {self.region} tokens "
                              f"{self.region_tokens} (tokenised with another template?)")
        return torch.stack(rows).mean()

    def _initial_kv(self, model, tokens: list[int], start: int) -> KV:
        """The adapter-disabled model's keys and values at tokens[start:], from a forward on `tokens` alone."""
        key = tuple(tokens)
        if key in self.cache:
            return self.cache[key]
        store = self._initial_forward(model, tokens, hidden=False)[1]
        initial = [(store[layer, "k"][0, start:].float(), store[layer, "v"][0, start:].float())
                   for layer in range(len(self.attention))]
        if self.region == "prefix":  # the postfix depends on the user's content: no reuse across rows
            self.cache[key] = initial
        return initial

    @torch.no_grad()
    def _initial_forward(self, model, tokens: list[int], hidden: bool):
        """(hidden_states or None, caught keys/values) of the adapter-disabled model in eval mode on `tokens`."""
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        try:
            with model.disable_adapter(), captured_kv(self.attention) as store:
                out = model(input_ids=torch.tensor([tokens], device=device), output_hidden_states=hidden,
                            logits_to_keep=1)
        finally:
            model.train(was_training)
        return (out.hidden_states if hidden else None), store

    # --- released: projections of the residual stream, positions [:, :k] -------------------------------------------

    def _released(self, model, batch, outputs: StepOutputs) -> torch.Tensor:
        hidden = getattr(outputs.policy, "hidden_states", None)
        if hidden is None:
            raise EmalibError("treft (released): the step carries no hidden states")
        if self.released_reference is None:
            self.released_reference = self._released_initial(model, batch)
        if self.region == "prefix":
            k = self.released_reference[0][0].shape[0]
            current = [(attn.k_proj(hidden[layer][:, :k]), attn.v_proj(hidden[layer][:, :k]))
                       for layer, attn in enumerate(self.attention)]
            return kv_drift(current, [(k0.unsqueeze(0), v0.unsqueeze(0)) for k0, v0 in self.released_reference])
        rows = []
        for row, span in enumerate(row_spans(batch["input_ids"], batch["attention_mask"], self.region_tokens,
                                             "postfix")):
            if span is None:  # the released code skips such rows
                continue
            start, end = span
            current = [(attn.k_proj(hidden[layer][row, start:end]), attn.v_proj(hidden[layer][row, start:end]))
                       for layer, attn in enumerate(self.attention)]
            rows.append(kv_drift(current, self.released_reference))
        if not rows:
            return hidden[0].sum() * 0.0  # keeps the graph; the released code adds a zero
        return torch.stack(rows).mean()

    @torch.no_grad()
    def _released_initial(self, model, batch) -> KV:
        """The reference from the first row of the first batch: its region's residual stream through k_proj/v_proj
        of the adapter-disabled model (the released code: the first training conversation)."""
        span = row_spans(batch["input_ids"][:1], batch["attention_mask"][:1], self.region_tokens, self.region)[0]
        if span is None:
            raise EmalibError(f"treft (released): the first row holds no {self.region} tokens {self.region_tokens}")
        start, end = span
        real = int(batch["attention_mask"][0].sum())
        tokens = batch["input_ids"][0, :real if self.region == "postfix" else end].tolist()
        hidden, _ = self._initial_forward(model, tokens, hidden=True)
        was_training = model.training
        model.eval()
        try:
            with model.disable_adapter():
                return [(attn.k_proj(hidden[layer][0, start:end]).float(),
                         attn.v_proj(hidden[layer][0, start:end]).float())
                        for layer, attn in enumerate(self.attention)]
        finally:
            model.train(was_training)
