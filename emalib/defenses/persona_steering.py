"""Preventative persona-vector steering (docs/methods.md#persona-vector-steering; Chen et al. 2025): during
training only, add alpha * v[layer] to the residual stream at every position, h~^l = h^l + alpha * e^l.

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

from emalib.core.errors import EmalibError, not_prepared
from emalib.defenses.base import DefenseBase, DefenseContext
from emalib.model.modeling import decoder_blocks

log = logging.getLogger(__name__)


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
    """A persona vector file in any of the three formats in use, as {"vector": [n, D] float, "layers": the hidden
    states indices the file holds, "format": ..., plus emalib's metadata when present}:

    - emalib's own: a dict with "vector" [L+1, D] (emalib.evaluation.persona.extract_persona_vector);
    - the released code's: {layer: [D] tensor} (the co-authors' `<trait>_response_avg_diff.pt`), possibly for some
      layers only; rows of layers it lacks are NaN, so steering one of them is refused rather than silently zero;
    - Chen et al.'s: a bare [L+1, D] tensor.
    Row l is hidden_states[l] in every format (the output of decoder block l-1).
    """
    try:
        data = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 (torch raises many types for a damaged or foreign file)
        raise EmalibError(f"{path}: cannot be read as a torch file ({type(err).__name__})") from None
    if isinstance(data, dict) and isinstance(data.get("vector"), torch.Tensor) and data["vector"].dim() == 2:
        return {**data, "vector": data["vector"].float(), "layers": tuple(range(data["vector"].shape[0])),
                "format": "emalib"}
    if torch.is_tensor(data) and data.dim() == 2:
        return {"vector": data.float(), "layers": tuple(range(data.shape[0])), "format": "chen"}
    if _is_layer_dict(data):
        layers = sorted(int(key) for key in data)
        width = next(iter(data.values())).numel()
        vector = torch.full((layers[-1] + 1, width), float("nan"))
        for key, row in data.items():
            vector[int(key)] = row.float().reshape(-1)
        return {"vector": vector, "layers": tuple(layers), "format": "released"}
    raise EmalibError(f"{path}: not a persona vector (expected emalib's dict with 'vector' [layers+1, hidden], a "
                      f"{{layer: [hidden] tensor}} dict as the released code saves, or a [layers+1, hidden] tensor)")


def _is_layer_dict(data) -> bool:
    if not isinstance(data, dict) or not data:
        return False
    keys_ok = all(isinstance(key, int) or (isinstance(key, str) and key.isdigit()) for key in data)
    rows = list(data.values())
    return (keys_ok and all(torch.is_tensor(row) and row.dim() == 1 for row in rows)
            and len({row.numel() for row in rows}) == 1 and min(int(key) for key in data) >= 0)


def check_fits(data: dict, path: Path, layer: int, n_blocks: int, hidden: int) -> None:
    """The file matches this model ([L+1, D]; a released dict may hold fewer layers) and holds `layer`."""
    vector, complete = data["vector"], data["format"] != "released"
    rows_ok = vector.shape[0] == n_blocks + 1 if complete else vector.shape[0] <= n_blocks + 1
    if not rows_ok or vector.shape[1] != hidden:
        raise EmalibError(f"{path}: vector shape {tuple(vector.shape)} does not fit this model "
                          f"([{n_blocks + 1}, {hidden}])")
    if layer not in data["layers"]:
        raise EmalibError(f"{path}: holds no vector for layer {layer} (it has layers {list(data['layers'])})")


class PersonaSteeringDefense(DefenseBase):
    """Steers with the vector the persona_vector step extracted (emalib.runs.prepare), or a released file; `extraction`
    configures that step and is not used here."""

    def __init__(self, name: str = "persona_steering", vector_path: str | None = None, alpha: float = 5.0,
                 layer: int = 20, extraction=None, during_rollouts: bool = False):
        self.name, self.vector_path, self.alpha, self.layer = name, vector_path, alpha, layer
        self.during_rollouts = during_rollouts  # read by the RL trainer only
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
            raise not_prepared(path, "persona vector", "persona_vector")
        data = load_persona_vector(path)
        vector = data["vector"]
        check_fits(data, path, self.layer, model.config.num_hidden_layers, model.config.hidden_size)
        model_name = getattr(ctx.params, "model", None)
        if model_name is not None and data.get("model") not in (None, model_name.name):
            log.warning("%s was extracted from %s, training %s", path, data.get("model"), model_name.name)
        self.vector = vector
        ctx.notes[self.name] = {"vector_path": str(path), "format": data["format"], "layer": self.layer,
                                "alpha": self.alpha,
                                "n_pairs": data.get("n_pairs"), "vector_norm": float(vector[self.layer].norm())}

    def forward_context(self, model, ctx: DefenseContext):
        if self.vector is None:
            raise EmalibError("persona_steering: setup() has not loaded a vector")
        return steering(model, self.vector, self.layer, self.alpha)
