"""The preparatory steps of the defenses that need work before training, each a function a notebook calls:

- persona_vector: extract the persona vector of the run's `persona_steering` block (Chen et al.'s pipeline),
- safelora_matrices: save SafeLoRA's alignment matrices V = W_aligned - W_base for the `safelora` block,
- interleave_selection: score the safe candidates by the perplexity gap and select them for the
  `interleave_plus` / `interleave_plusplus` block.

Each writes exactly the file the training step would otherwise build at its start (the persona vector, the
matrices folder, the scores file and the selection), so `train` afterwards finds it and reuses it; a step whose
output exists is skipped. Running them as their own notebooks lets one expensive preparation (a vector, a
7B pair's matrices, 100k scored candidates) be inspected first and shared by many runs through the paths in
the params.
"""

from __future__ import annotations

import logging
from pathlib import Path

from emalib.config import PREPARED_BY, RunParams
from emalib.errors import ParamsError
from emalib.results import prepare_run_dir, timed, update_manifest

log = logging.getLogger(__name__)


def defense_block(params: RunParams, step: str):
    """The defense block a preparatory step works for (the params validation guarantees there is one)."""
    for spec in params.defenses:
        if spec.name in PREPARED_BY[step]:
            return spec
    raise ParamsError(f"steps: '{step}' prepares {' or '.join(PREPARED_BY[step])}, which is not in defenses")


def _context(params: RunParams, run_dir: Path):
    from emalib.defenses.base import DefenseContext

    return DefenseContext(seed=params.seed, run_dir=run_dir, params=params)


def persona_vector(params: RunParams, run_dir: Path | None = None) -> dict:
    """Extract the persona vector into the block's vector_path (default <run>/persona_vector.pt) from the
    model without adapter; returns what was saved, less the vector itself, plus its path and per-layer norms."""
    from emalib.defenses.persona_steering import load_persona_vector
    from emalib.defenses.registry import build_defense
    from emalib.engines import load_base

    run_dir = prepare_run_dir(params, run_dir)
    defense = build_defense(defense_block(params, "persona_vector"))
    ctx = _context(params, run_dir)
    path = defense.vector_file(ctx)
    if path.is_file():
        log.info("%s exists: persona vector already extracted", path)
    else:
        model, tokenizer = load_base(params.model, params.train.max_seq_length)
        ctx.tokenizer = tokenizer
        with timed(run_dir, "persona_vector"):
            defense.setup(model, ctx)
    data = load_persona_vector(path)
    summary = {k: v for k, v in data.items() if k != "vector"}
    summary.update(path=str(path), layer_norms=[float(n) for n in data["vector"].norm(dim=-1)])
    update_manifest(run_dir, persona_vector={k: v for k, v in summary.items() if k != "layer_norms"})
    return summary


def safelora_matrices(params: RunParams, run_dir: Path | None = None) -> dict:
    """Save V for every LoRA-targeted weight into the block's `matrices` folder, which training then reads;
    returns its summary (the two models, each module's key, shape and ||V||_F) and path."""
    from emalib.defenses.registry import build_defense

    spec = defense_block(params, "safelora_matrices")
    if spec.matrices is None:
        raise ParamsError("defenses.safelora.matrices: not set; name the folder training will read the matrices from")
    run_dir = prepare_run_dir(params, run_dir)
    with timed(run_dir, "safelora_matrices"):
        summary = build_defense(spec).prepare(params.lora.target_modules)
    update_manifest(run_dir, safelora_matrices={"path": spec.matrices, "modules": len(summary["modules"])})
    return {**summary, "path": spec.matrices}


def interleave_selection(params: RunParams, run_dir: Path | None = None) -> list[dict]:
    """Score the candidates and select the safe examples exactly as training will (same task set, ratio and
    seed); writes the scores file and <run>/interleave_selected.jsonl; returns the selected rows, best first."""
    from emalib.defenses.registry import build_defense
    from emalib.io import read_jsonl
    from emalib.pipeline import check_inputs, training_conversations

    run_dir = prepare_run_dir(params, run_dir)
    check_inputs(params, ("interleave_selection",))
    conversations = training_conversations(params)
    defense = build_defense(defense_block(params, "interleave_selection"))
    ctx = _context(params, run_dir)
    with timed(run_dir, "interleave_selection"):
        defense.transform_data(conversations, ctx)
    update_manifest(run_dir, interleave_selection=ctx.notes[defense.name])
    return read_jsonl(run_dir / "interleave_selected.jsonl")
