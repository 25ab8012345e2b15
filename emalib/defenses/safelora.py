"""SafeLoRA (docs/methods.md#safelora; Hsu et al. 2024): project LoRA updates that stray from the alignment
subspace.

Per LoRA module: V = W_aligned - W_base (instruct minus pretrained weights of that module), C = V V^T / ||V||_F,
dW = scaling * B A. Where cos(C dW, dW) (flattened), rounded to 5 decimals, is at most tau (as the reference
implementation, IBM/SafeLoRA, decides), or on the k lowest-cosine modules
(`select: lowest_k`), dW is replaced by C dW, done by replacing B with C B so the adapter stays in PEFT format.

Memory: weight pairs are read one module at a time from the safetensors files (`safe_open`), and C is never
formed: C B = V (V^T B) / ||V||_F and the cosine uses r x r Gram matrices, so a 7B pair needs only one module's
V at a time (a [out, out] C of an MLP projection would be 1.4 GB in float32).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch

from emalib.core.errors import EmalibError, not_prepared
from emalib.defenses.base import DefenseBase, DefenseContext

log = logging.getLogger(__name__)


def projected_b(V: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """C B with C = V V^T / ||V||_F, without forming C. V: [out, in], B: [out, r] -> [out, r]."""
    return V @ (V.T @ B) / torch.linalg.matrix_norm(V)


def update_cosine(B_new: torch.Tensor, B: torch.Tensor, A: torch.Tensor) -> float:
    """cos(B_new A, B A) of the flattened [out, in] products, from [r, r] Gram matrices:
    <X A, Y A>_F = tr(X^T Y A A^T)."""
    gram = A @ A.T
    dot = ((B_new.T @ B) * gram).sum()
    norms = ((B_new.T @ B_new) * gram).sum().clamp(min=0).sqrt() * ((B.T @ B) * gram).sum().clamp(min=0).sqrt()
    return float(dot / norms) if norms > 0 else float("nan")


def below_threshold(cosine: float, tau: float) -> bool:
    """The reference's rule: numpy.round(cos, 5) <= tau (a NaN cosine, from a zero update, never projects)."""
    return bool(np.round(cosine, 5) <= tau)


def project_update(V: torch.Tensor, B: torch.Tensor, A: torch.Tensor, scaling: float,
                   tau: float) -> tuple[torch.Tensor, float, bool]:
    """One module: (B to keep, cos(C dW, dW), projected?). dW = scaling B A; projected when below_threshold.

    V: [out, in], B: [out, r], A: [r, in]. The scaling multiplies both C dW and dW, so it cancels in the cosine
    and in the replacement (C (s B) A = s (C B) A); it is a parameter so the contract reads like the formula.
    """
    cb, cosine = _projection(V, B, A)
    if below_threshold(cosine, tau):
        return cb, cosine, True
    return B, cosine, False


def _projection(V: torch.Tensor, B: torch.Tensor, A: torch.Tensor) -> tuple[torch.Tensor, float]:
    """(C B in B's dtype, cos(C dW, dW)), computed in float32 (float64 inputs stay float64)."""
    dtype = torch.float64 if V.dtype == torch.float64 else torch.float32
    V, B32, A32 = V.to(dtype), B.to(dtype), A.to(dtype)
    cb = projected_b(V, B32)
    return cb.to(B.dtype), update_cosine(cb, B32, A32)


def _local_snapshot(name: str) -> Path:
    """A folder of safetensors for a local path, the embedded model, or a Hugging Face id (weights only)."""
    from emalib.model.engines import resolve_model_name

    path = Path(resolve_model_name(name))
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(name, allow_patterns=["*.safetensors", "*.safetensors.index.json", "config.json"]))


class WeightReader:
    """Tensors of a safetensors checkpoint (single file or sharded), read one at a time."""

    def __init__(self, name: str):
        self.folder = _local_snapshot(name)
        index = self.folder / "model.safetensors.index.json"
        if index.is_file():
            self.where = {k: self.folder / f for k, f in json.loads(index.read_text())["weight_map"].items()}
        else:
            files = sorted(self.folder.glob("*.safetensors"))
            if not files:
                raise EmalibError(f"{self.folder}: no safetensors weights (SafeLoRA reads them module by module)")
            from safetensors import safe_open

            self.where = {}
            for file in files:
                with safe_open(str(file), framework="pt") as handle:
                    self.where.update(dict.fromkeys(handle.keys(), file))

    def key_for(self, module_name: str) -> str:
        """The checkpoint key of a LoRA module's weight: the module path with PEFT's prefix stripped."""
        stem = module_name.removeprefix("base_model.model.")
        if f"{stem}.weight" in self.where:
            return f"{stem}.weight"
        matches = [k for k in self.where if k.endswith(f".{stem.split('.', 1)[-1]}.weight")]
        if len(matches) == 1:
            return matches[0]
        raise EmalibError(f"{self.folder}: no unique weight for module {module_name} (tried {stem}.weight)")

    def get(self, key: str) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(str(self.where[key]), framework="pt") as handle:
            return handle.get_tensor(key)


def lora_modules(model, adapter: str | None = None) -> dict[str, torch.nn.Module]:
    """Name -> LoRA layer holding the (active) adapter."""
    adapter = adapter or getattr(model, "active_adapter", "default")
    return {name: module for name, module in model.named_modules()
            if hasattr(module, "lora_A") and adapter in getattr(module, "lora_A", {})}


def iter_alignment_matrices(aligned: str, base: str, module_names: list[str], matrices: str | None = None):
    """Lazily yield (module name, V = W_aligned - W_base in float32), one module at a time; from the prepared
    folder `matrices` (`save_alignment_matrices`) when given, else from the two checkpoints."""
    if matrices is not None:
        reader = prepared_matrices(matrices, aligned, base)
        for name in module_names:
            yield name, reader.get(reader.key_for(name)).float()
        return
    aligned_reader, base_reader = WeightReader(aligned), WeightReader(base)
    for name in module_names:
        key = aligned_reader.key_for(name)
        yield name, aligned_reader.get(key).float() - base_reader.get(base_reader.key_for(name)).float()


MATRICES_FILE, MATRICES_SUMMARY = "model.safetensors", "alignment.json"


def target_keys(reader: WeightReader, target_modules: list[str] | tuple[str, ...]) -> list[str]:
    """Checkpoint keys of the weights LoRA targets (e.g. model.layers.3.self_attn.q_proj.weight), in order."""
    keys = [k for k in reader.where if k.endswith(".weight") and k.rsplit(".", 2)[-2] in set(target_modules)]
    if not keys:
        raise EmalibError(f"{reader.folder}: no weight of the LoRA target modules {list(target_modules)}")
    return sorted(keys, key=_natural_order)


def _natural_order(key: str) -> list:
    return [int(part) if part.isdigit() else part for part in key.split(".")]


@torch.no_grad()
def save_alignment_matrices(aligned: str, base: str, target_modules: list[str] | tuple[str, ...],
                            out_dir: str | Path) -> dict:
    """SafeLoRA's preparatory step: V = W_aligned - W_base of every LoRA-targeted weight, saved once (float32
    safetensors under the checkpoint's keys, so `WeightReader` reads it module by module like a model) with a
    summary (alignment.json: the two models, and each module's shape and ||V||_F). Built in a temporary folder
    and renamed, so a killed run leaves no half-written matrices. Returns the summary."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    aligned_reader, base_reader = WeightReader(aligned), WeightReader(base)
    tensors, modules = {}, []
    for key in target_keys(aligned_reader, target_modules):
        V = aligned_reader.get(key).float() - base_reader.get(base_reader.key_for(key.removesuffix(".weight"))).float()
        tensors[key] = V.contiguous()
        modules.append({"key": key, "shape": list(V.shape), "frobenius_norm": float(torch.linalg.matrix_norm(V))})
    summary = {"aligned": aligned, "base": base, "target_modules": list(target_modules), "modules": modules}
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(tmp / MATRICES_FILE), metadata={"aligned": aligned, "base": base})
    (tmp / MATRICES_SUMMARY).write_text(json.dumps(summary, indent=1))
    if out_dir.exists():
        import shutil

        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    return summary


def prepared_matrices(folder: str | Path, aligned: str, base: str) -> WeightReader:
    """A reader over a prepared matrices folder, refusing one made from another model pair."""
    summary_path = Path(folder) / MATRICES_SUMMARY
    if not summary_path.is_file():
        raise not_prepared(summary_path, "SafeLoRA alignment matrices", "safelora_matrices")
    summary = json.loads(summary_path.read_text())
    if (summary.get("aligned"), summary.get("base")) != (aligned, base):
        raise EmalibError(f"{summary_path}: matrices of aligned={summary.get('aligned')!r}, "
                          f"base={summary.get('base')!r}; this run has aligned={aligned!r}, base={base!r}")
    return WeightReader(str(folder))


@torch.no_grad()
def apply_safelora(model, aligned: str, base: str, tau: float = 0.3, select: str = "threshold",
                   k: int | None = None, matrices: str | None = None) -> list[dict]:
    """Project the adapter in place; one report row per module (cosine, projected). Each module's C B is only
    [out, r], so all candidates are kept until the selection (threshold or lowest k) is known: one read of the
    weights suffices. Same maths as `project_update`."""
    adapter = getattr(model, "active_adapter", "default")
    modules = lora_modules(model, adapter)
    if not modules:
        raise EmalibError("safelora: the model has no LoRA modules")
    candidates = {}
    for name, V in iter_alignment_matrices(aligned, base, list(modules), matrices):
        layer = modules[name]
        B, A = layer.lora_B[adapter].weight, layer.lora_A[adapter].weight
        if tuple(V.shape) != (B.shape[0], A.shape[1]):
            raise EmalibError(f"safelora: {name}: alignment matrix {tuple(V.shape)} does not match the LoRA update "
                              f"({B.shape[0]}, {A.shape[1]})")
        new_b, cosine = _projection(V.to(B.device), B, A)
        candidates[name] = (new_b, cosine, below_threshold(cosine, tau))
    if select == "lowest_k":
        ranked = sorted(candidates, key=lambda n: candidates[n][1])
        chosen = set(ranked[:k])
    else:
        chosen = {n for n, (_, _, below) in candidates.items() if below}
    report = []
    for name, (new_b, cosine, _) in candidates.items():
        if name in chosen:
            modules[name].lora_B[adapter].weight.copy_(new_b)
        report.append({"module": name, "cosine": cosine, "projected": name in chosen})
    return report


class SafeLoraDefense(DefenseBase):
    def __init__(self, name: str = "safelora", aligned: str = "", base: str = "", tau: float = 0.3,
                 select: str = "threshold", k: int | None = None, every_k_steps: int | None = None,
                 matrices: str | None = None):
        self.name, self.aligned, self.base, self.tau = name, aligned, base, tau
        self.select, self.k, self.every_k_steps, self.matrices = select, k, every_k_steps, matrices

    def setup(self, model, ctx: DefenseContext) -> None:
        if self.matrices is not None:  # written by the safelora_matrices step: missing or another pair fails now
            prepared_matrices(self.matrices, self.aligned, self.base)

    def _project(self, model, ctx: DefenseContext, when: str) -> list[dict]:
        report = apply_safelora(model, self.aligned, self.base, self.tau, self.select, self.k, self.matrices)
        n = sum(row["projected"] for row in report)
        ctx.notes.setdefault(self.name, {})[when] = {"modules": len(report), "projected": n}
        log.info("safelora (%s): projected %d of %d modules", when, n, len(report))
        return report

    def on_step(self, model, step: int, ctx: DefenseContext) -> None:
        if self.every_k_steps and step % self.every_k_steps == 0:
            self._project(model, ctx, f"step_{step}")

    def after_train(self, model, ctx: DefenseContext) -> None:
        report = self._project(model, ctx, "after_train")
        if ctx.run_dir is not None:
            from emalib.core.io import atomic_write_json

            atomic_write_json(Path(ctx.run_dir) / "safelora.json", {"tau": self.tau, "select": self.select,
                                                                    "k": self.k, "modules": report})
