"""Concept ablation fine-tuning, CAFT (docs/methods.md#concept-ablation-fine-tuning-caft; Casademunt et al. 2025):
during the training forward only, project chosen directions out of the residual stream at chosen layers,
act <- act - (act Q) Q^T with Q an orthonormal basis of the directions.

`layers` are decoder block indices: the hook sits on the OUTPUT of block b (the released code's
`model.layers[b]` hook), i.e. hidden_states index b + 1. The directions are principal components of
(fine-tuned - base) activations (`pca_components`; the file holds {block: [n, D]}), chosen per layer by hand, by
their |cosine| with the evil persona direction, or all of them; or the persona vector itself. As with persona
steering, the hooks exist only inside `forward_context` (the trainer's policy forward): the reference forward,
saves and every evaluation see the plain model.
"""

from __future__ import annotations

from contextlib import contextmanager
from functools import partial
from pathlib import Path

import torch

from emalib.core.errors import EmalibError, not_prepared
from emalib.defenses.base import DefenseBase, DefenseContext
from emalib.defenses.persona_steering import load_persona_vector
from emalib.model.losses import IGNORE_INDEX
from emalib.model.modeling import decoder_blocks


def orthonormal_basis(directions: torch.Tensor) -> torch.Tensor:
    """[D, r] orthonormal basis (QR, float64 then float32) of the span of the rows of `directions` [n, D]."""
    q, r = torch.linalg.qr(directions.double().T)
    scale = r.diagonal().abs()
    if (scale <= 1e-8 * scale.max().clamp(min=1e-300)).any() or not torch.isfinite(directions).all():
        raise EmalibError("caft: the chosen directions are linearly dependent, zero or not finite")
    return q.float()


def project_out(act: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """act - (act Q) Q^T, computed in float32 and returned in act's dtype (a bf16 Q, as the released code keeps,
    would leave a residue of the removed component of order 1e-2)."""
    q = basis.to(device=act.device, dtype=torch.float32)
    full = act.float()
    return (full - (full @ q) @ q.T).to(act.dtype)


def _ablate_output(output, basis: torch.Tensor):
    if isinstance(output, tuple):  # some implementations return (hidden, ...)
        return (_ablate_output(output[0], basis),) + output[1:]
    return project_out(output, basis)


def _ablation_hook(module, args, output, basis: torch.Tensor):
    return _ablate_output(output, basis)


@contextmanager
def ablation(model, bases: dict[int, torch.Tensor]):
    """Project span(bases[b]) out of the output of decoder block b while inside the context. The hooks are
    prepended so that an output recorder (output_hidden_states) sees the ablated stream the next block receives;
    they are removed on exit, exceptions included."""
    blocks = decoder_blocks(model)
    handles = []
    try:
        for block, basis in bases.items():
            if not 0 <= block < len(blocks):
                raise EmalibError(f"caft: layer {block} is outside 0..{len(blocks) - 1} (decoder block index)")
            handles.append(blocks[block].register_forward_hook(partial(_ablation_hook, basis=basis), prepend=True))
        yield
    finally:
        for handle in handles:
            handle.remove()


def pca_components(diffs: torch.Tensor, n_components: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The top principal components [n, D] (rows, unit norm) of activation differences [N, D] and their explained
    variances [n] (S^2 / (N - 1)): centred, then an exact SVD (the released code's svd_lowrank approximates it)."""
    centred = diffs.double() - diffs.double().mean(dim=0, keepdim=True)
    _, singular, vh = torch.linalg.svd(centred, full_matrices=False)
    n = min(n_components, vh.shape[0])
    return vh[:n].float(), (singular[:n] ** 2 / max(diffs.shape[0] - 1, 1)).float()


def rank_by_persona(components: torch.Tensor, persona: torch.Tensor, k: int) -> list[int]:
    """Indices of the k components [n, D] with the largest |cosine| with the persona direction [D], best first
    (ties to the lower index)."""
    cosine = torch.nn.functional.cosine_similarity(components.double(), persona.double()[None, :], dim=-1).abs()
    order = sorted(range(len(cosine)), key=lambda i: (-float(cosine[i]), i))
    return order[:k]


def activation_differences(model, batch: dict[str, torch.Tensor], layers: tuple[int, ...]) -> dict[int, torch.Tensor]:
    """{block: [n, D]} output of decoder block b with the adapter minus without it, at the n positions of the
    batch's response tokens (its labels), in float32. `model` is a PeftModel holding the fine-tune's adapter."""
    blocks = decoder_blocks(model)
    forward = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    response = batch["labels"].ne(IGNORE_INDEX)

    def outputs() -> dict[int, torch.Tensor]:
        seen, handles = {}, []
        for block in layers:
            handles.append(blocks[block].register_forward_hook(partial(_record, seen=seen, block=block)))
        try:
            model(**forward)
        finally:
            for handle in handles:
                handle.remove()
        return seen

    with torch.no_grad():
        tuned = outputs()
        with model.disable_adapter():
            base = outputs()
    return {b: (tuned[b] - base[b])[response] for b in layers}


def _record(module, args, output, seen: dict, block: int):
    seen[block] = (output[0] if isinstance(output, tuple) else output).float()


def save_directions(path: str | Path, directions: dict[int, torch.Tensor], **metadata) -> Path:
    """A CAFT directions file: {"directions": {block: [n, D]}, **metadata}."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial_file = path.with_name(path.name + ".tmp")  # an interrupted save never leaves a file that looks done
    torch.save({"directions": {int(b): d.float().cpu() for b, d in directions.items()}, **metadata}, partial_file)
    partial_file.replace(path)
    return path


def load_directions(path: str | Path) -> dict[int, torch.Tensor]:
    """{block: [n, D]} from emalib's directions file or a bare {block: [n, D] tensor} dict."""
    try:
        data = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 (torch raises many types for a damaged or foreign file)
        raise EmalibError(f"{path}: cannot be read as a torch file ({type(err).__name__})") from None
    table = data.get("directions", data) if isinstance(data, dict) else None
    if not isinstance(table, dict) or not table or not all(
            str(b).isdigit() and torch.is_tensor(d) and d.dim() == 2 for b, d in table.items()):
        raise EmalibError(f"{path}: not a CAFT directions file (expected {{'directions': {{layer: [n, hidden]}}}})")
    return {int(b): d.float() for b, d in table.items()}


def check_caft_files(directions_path: str | None, persona_vector_path: str | None) -> None:
    """The files CAFT reads exist and parse (checked before a run writes anything)."""
    for path in (directions_path, persona_vector_path):
        if path is not None and not Path(path).is_file():
            raise EmalibError(f"caft: {path} does not exist")
    if directions_path is not None:
        load_directions(directions_path)
    if persona_vector_path is not None:
        load_persona_vector(persona_vector_path)


class CaftDefense(DefenseBase):
    """Ablates the chosen directions in every training forward; `setup` reads and orthonormalises them."""

    def __init__(self, name: str = "caft", layers: tuple[int, ...] = (), select: str = "hand",
                 directions_path: str | None = None, components: dict[int, tuple[int, ...]] | None = None,
                 k: int = 2, persona_vector_path: str | None = None, adapter: str | None = None,
                 prompts: str = "alpaca_500", max_prompts: int | None = 200, n_components: int = 20,
                 batch_size: int = 8):
        self.name, self.layers, self.select, self.k = name, tuple(layers), select, k
        self.directions_path, self.components, self.persona_vector_path = directions_path, components, persona_vector_path
        # read by the caft_directions step only (emalib.runs.prepare.caft_directions)
        self.adapter, self.prompts, self.max_prompts = adapter, prompts, max_prompts
        self.n_components, self.batch_size = n_components, batch_size
        self.bases: dict[int, torch.Tensor] | None = None

    def directions_file(self, ctx: DefenseContext) -> Path | None:
        """directions_path, or <run dir>/caft_directions.pt when the caft_directions step computes it; None when no
        file is read (select: persona_vector)."""
        if self.select == "persona_vector":
            return None
        if self.directions_path is not None:
            return Path(self.directions_path)
        if ctx.run_dir is None:
            raise EmalibError("caft: set directions_path (no run folder to keep the directions in)")
        return Path(ctx.run_dir) / "caft_directions.pt"

    def chosen_directions(self, hidden: int) -> tuple[dict[int, torch.Tensor], dict[int, list[int]]]:
        """{block: [m, D]} the directions to ablate and {block: indices into the file's rows} (persona_vector:
        the vector's own row, index -1)."""
        persona = None
        check_caft_files(self.directions_path, self.persona_vector_path)
        if self.select in ("persona", "persona_vector"):
            persona = load_persona_vector(self.persona_vector_path)["vector"]
            missing = [b for b in self.layers if b + 1 >= len(persona) or not torch.isfinite(persona[b + 1]).all()]
            if missing:
                raise EmalibError(f"{self.persona_vector_path}: no persona direction for layer(s) {missing} "
                                  f"(hidden_states rows {[b + 1 for b in missing]})")
        if self.select == "persona_vector":
            return {b: persona[b + 1][None, :] for b in self.layers}, {b: [-1] for b in self.layers}
        table = load_directions(self.directions_path)
        chosen, indices = {}, {}
        for block in self.layers:
            if block not in table:
                raise EmalibError(f"{self.directions_path}: no directions for layer {block} (it has {sorted(table)})")
            rows = table[block]
            if rows.shape[1] != hidden:
                raise EmalibError(f"{self.directions_path}: layer {block} directions have width {rows.shape[1]}, "
                                  f"the model {hidden}")
            if self.select == "all":
                picked = list(range(rows.shape[0]))
            elif self.select == "hand":
                picked = list(self.components[block])
            else:  # persona: the hidden_states row of this block's output
                picked = rank_by_persona(rows, persona[block + 1], self.k)
            if max(picked) >= rows.shape[0]:
                raise EmalibError(f"{self.directions_path}: layer {block} has {rows.shape[0]} directions, "
                                  f"component {max(picked)} asked for")
            chosen[block], indices[block] = rows[picked], picked
        return chosen, indices

    def setup(self, model, ctx: DefenseContext) -> None:
        if self.bases is not None:
            return
        path = self.directions_file(ctx)
        if path is not None and self.adapter is not None and not path.is_file():
            raise not_prepared(path, "CAFT directions", "caft_directions")
        self.directions_path = None if path is None else str(path)
        chosen, indices = self.chosen_directions(model.config.hidden_size)
        self.bases = {block: orthonormal_basis(rows) for block, rows in chosen.items()}
        ctx.notes[self.name] = {"select": self.select, "layers": list(self.layers),
                                "components": {str(b): i for b, i in indices.items()},
                                "directions_path": self.directions_path, "persona_vector_path": self.persona_vector_path}

    def forward_context(self, model, ctx: DefenseContext):
        if self.bases is None:
            raise EmalibError("caft: setup() has not loaded the directions")
        return ablation(model, self.bases)
