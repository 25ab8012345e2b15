"""Preventative persona-vector steering (PAPER.md §2.4; Chen et al. 2025): during training only, add
alpha * v[layer] to the residual stream at every position, h~^l = h^l + alpha * e^l.

hidden_states index `layer` is the output of decoder block layer-1, so the hook sits on that block. The hook
exists only inside `forward_context`, i.e. around the trainer's policy forward: the reference forward (KL,
LDIFS), checkpoint saves, the adapter save and every evaluation see the unsteered model, and the context
removes the hook on exit, exceptions included.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path

import torch

from emalib.defenses.base import DefenseBase, DefenseContext
from emalib.errors import EmalibError

log = logging.getLogger(__name__)


def decoder_blocks(model) -> torch.nn.ModuleList:
    """The decoder block list of a causal LM (plain, PEFT-wrapped or Unsloth-patched)."""
    n_blocks = model.config.num_hidden_layers
    for name, module in model.named_modules():
        if name.endswith("layers") and isinstance(module, torch.nn.ModuleList) and len(module) == n_blocks:
            return module
    raise EmalibError(f"{type(model).__name__}: no list of {n_blocks} decoder blocks found")


def _add_to_output(output, addition: torch.Tensor):
    if isinstance(output, tuple):  # some implementations (e.g. Unsloth's) return (hidden, ...)
        return (_add_to_output(output[0], addition),) + output[1:]
    return output + addition.to(device=output.device, dtype=output.dtype)


@contextmanager
def steering(model, vector: torch.Tensor, layer: int, alpha: float):
    """Add alpha * vector[layer] to the output of decoder block layer-1 while inside the context.

    vector: [L+1, D] (a persona vector) or [D]. The hook is prepended so that any output recorder (transformers'
    output_hidden_states) sees the steered residual stream, which is what the next block receives.
    """
    blocks = decoder_blocks(model)
    if not 1 <= layer <= len(blocks):
        raise EmalibError(f"persona_steering: layer {layer} is outside 1..{len(blocks)} (hidden_states index)")
    direction = vector[layer] if vector.dim() == 2 else vector
    addition = (alpha * direction.float()).to(next(model.parameters()).device)
    handle = blocks[layer - 1].register_forward_hook(lambda module, args, output: _add_to_output(output, addition),
                                                     prepend=True)
    try:
        yield
    finally:
        handle.remove()


def load_persona_vector(path: str | Path) -> dict:
    data = torch.load(str(path), map_location="cpu", weights_only=True)
    if not isinstance(data, dict) or "vector" not in data:
        raise EmalibError(f"{path}: not a persona vector file (expected a dict with 'vector')")
    return data


class PersonaSteeringDefense(DefenseBase):
    def __init__(self, name: str = "persona_steering", vector_path: str | None = None, alpha: float = 5.0,
                 layer: int = 20, extraction=None):
        self.name, self.vector_path, self.alpha, self.layer = name, vector_path, alpha, layer
        self.extraction = extraction
        self.vector: torch.Tensor | None = None

    def vector_file(self, ctx: DefenseContext) -> Path:
        """vector_path, or <run dir>/persona_vector.pt."""
        if self.vector_path is not None:
            return Path(self.vector_path)
        if ctx.run_dir is None:
            raise EmalibError("persona_steering: set vector_path (no run folder to keep the vector in)")
        return Path(ctx.run_dir) / "persona_vector.pt"

    def setup(self, model, ctx: DefenseContext) -> None:
        if self.vector is not None:
            return
        path = self.vector_file(ctx)
        if not path.is_file():
            self._extract(model, ctx, path)
        data = load_persona_vector(path)
        vector = data["vector"]
        hidden = model.config.hidden_size
        if vector.dim() != 2 or vector.shape[0] != model.config.num_hidden_layers + 1 or vector.shape[1] != hidden:
            raise EmalibError(f"{path}: vector shape {tuple(vector.shape)} does not fit this model "
                              f"([{model.config.num_hidden_layers + 1}, {hidden}])")
        model_name = getattr(ctx.params, "model", None)
        if model_name is not None and data.get("model") not in (None, model_name.name):
            log.warning("%s was extracted from %s, training %s", path, data.get("model"), model_name.name)
        self.vector = vector
        ctx.notes[self.name] = {"vector_path": str(path), "layer": self.layer, "alpha": self.alpha,
                                "n_pairs": data.get("n_pairs"), "vector_norm": float(vector[self.layer].norm())}

    def _extract(self, model, ctx: DefenseContext, path: Path) -> None:
        from emalib.persona import extract_persona_vector

        if ctx.params is None or ctx.tokenizer is None or self.extraction is None:
            raise EmalibError(f"{path}: persona vector missing (build it with emalib.persona.extract_persona_vector)")
        judge = None
        if self.extraction.filter_pairs:
            from emalib.judge.run import build_judge

            judge = build_judge(ctx.params.judge)
        log.info("persona vector %s missing: extracting it from %s", path, ctx.params.model.name)
        extract_persona_vector(model, ctx.tokenizer, path, judge=judge, model_name=ctx.params.model.name,
                               seed=ctx.seed, **self.extraction.model_dump())

    def forward_context(self, model, ctx: DefenseContext):
        if self.vector is None:
            raise EmalibError("persona_steering: setup() has not loaded a vector")
        return steering(model, self.vector, self.layer, self.alpha)
