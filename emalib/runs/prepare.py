"""The preparatory steps of the defenses that need work before training, each a function a notebook calls:

- persona_vector: extract the persona vector of the run's `persona_steering` block (Chen et al.'s pipeline),
- safelora_matrices: save SafeLoRA's alignment matrices V = W_aligned - W_base for the `safelora` block,
- interleave_selection: score the safe candidates by the perplexity gap and select them for the
  `interleave_plus` / `interleave_plusplus` block.
- caft_directions: principal components of (fine-tuned - base) block outputs for the `caft` block.

Each writes a file training reads (the persona vector, the matrices folder, the scores file); training never
builds one itself: a missing one fails with "run step '<step>' first", before any model is loaded
(`emalib.runs.prepared.check_prepared`, called by `pipeline.check_inputs`). A step whose output exists is
skipped. Running them as their own notebooks lets one expensive preparation (a vector, a 7B pair's matrices,
100k scored candidates) be inspected first and shared by many runs through the paths in the params.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from emalib.core.config import RunParams
from emalib.core.defense_specs import prepared_by
from emalib.core.errors import EmalibError, ParamsError
from emalib.runs.prepared import defense_context
from emalib.runs.results import prepare_run_dir, timed, update_manifest

log = logging.getLogger(__name__)

def defense_block(params: RunParams, step: str):
    """The defense block a preparatory step works for (the params validation guarantees there is one)."""
    for spec in params.defenses:
        if spec.name in prepared_by()[step]:
            return spec
    raise ParamsError(f"steps: '{step}' prepares {' or '.join(prepared_by()[step])}, which is not in defenses")


def persona_vector(params: RunParams, run_dir: Path | None = None) -> dict:
    """Extract the persona vector into the block's vector_path (default <run>/persona_vector.pt) from the
    model without adapter; returns what was saved, less the vector itself, plus its path and per-layer norms."""
    from emalib.defenses.persona_steering import load_persona_vector
    from emalib.defenses.registry import build_defense

    run_dir = prepare_run_dir(params, run_dir)
    spec = defense_block(params, "persona_vector")
    path = build_defense(spec).vector_file(defense_context(params, run_dir))
    if path.is_file():
        log.info("%s exists: persona vector already extracted", path)
    else:
        _extract_persona_vector(params, spec, run_dir, path)
    data = load_persona_vector(path)
    made_with = data.get("trait_prefix", False) if data["format"] == "emalib" else None  # older files: bare prompts
    if made_with is not None and made_with != spec.extraction.trait_prefix:
        # A vector from the other system prompts would steer along another direction than the params describe.
        raise EmalibError(f"{path}: extracted with extraction.trait_prefix={made_with}, the params ask for "
                          f"{spec.extraction.trait_prefix}; delete the file to extract it again")
    summary = {k: v for k, v in data.items() if k != "vector"}
    summary.update(path=str(path), layer_norms=[float(n) for n in data["vector"].norm(dim=-1)])
    update_manifest(run_dir, persona_vector={k: v for k, v in summary.items() if k != "layer_norms"})
    return summary


def _extract_persona_vector(params: RunParams, spec, run_dir: Path, path: Path) -> None:
    """Chen et al.'s pipeline with the block's extraction settings, judged by the run's judge when pairs are
    filtered."""
    from emalib.model.engines import import_engine_first

    import_engine_first(params.model.engine)  # before evaluation.persona imports transformers
    from emalib.evaluation import persona
    from emalib.model.engines import load_base
    from emalib.runs.pipeline import check_inputs

    # The trait and coherence files are read before the model loads, and recorded.
    update_manifest(run_dir, data_sha256=check_inputs(params, ("persona_vector",)))
    judge = cache = None
    if spec.extraction.filter_pairs:
        from emalib.evaluation.judge.run import build_judge, open_cache

        judge, cache = build_judge(params.judge), open_cache(params.judge)  # judgments cached as the evaluation's
    model, tokenizer = load_base(params.model, params.train.max_seq_length)
    log.info("extracting the persona vector %s from %s", path, params.model.name)
    try:
        with timed(run_dir, "persona_vector"):
            persona.extract_persona_vector(model, tokenizer, path, judge=judge, model_name=params.model.name,
                                           seed=params.seed, cache=cache, **spec.extraction.model_dump())
    finally:
        if cache is not None:
            cache.close()


def safelora_matrices(params: RunParams, run_dir: Path | None = None) -> dict:
    """Save V for every LoRA-targeted weight into the block's `matrices` folder, which training then reads;
    returns its summary (the two models, each module's key, shape and ||V||_F) and path. An existing folder is
    kept (after checking it was made from the same model pair)."""
    from emalib.defenses.safelora import MATRICES_SUMMARY, prepared_matrices, save_alignment_matrices

    spec = defense_block(params, "safelora_matrices")
    if spec.matrices is None:
        raise ParamsError("defenses.safelora.matrices: not set; name the folder training will read the matrices from")
    run_dir = prepare_run_dir(params, run_dir)
    summary_path = Path(spec.matrices) / MATRICES_SUMMARY
    if summary_path.is_file():
        prepared_matrices(spec.matrices, spec.aligned, spec.base)  # refuses another model pair
        summary = json.loads(summary_path.read_text())
    else:
        log.info("safelora: preparing alignment matrices in %s", spec.matrices)
        with timed(run_dir, "safelora_matrices"):
            summary = save_alignment_matrices(spec.aligned, spec.base, params.lora.target_modules, spec.matrices)
    update_manifest(run_dir, safelora_matrices={"path": spec.matrices, "modules": len(summary["modules"])})
    return {**summary, "path": spec.matrices}


def interleave_selection(params: RunParams, run_dir: Path | None = None) -> list[dict]:
    """Score the candidates the scores file lacks (resuming an interrupted scoring), then select the safe
    examples exactly as training will (the same code, task set, ratio and seed); writes the scores file and
    <run>/interleave_selected.jsonl; returns the selected rows, best first."""
    from emalib.model.engines import import_engine_first

    import_engine_first(params.model.engine)  # the scoring loads the model: Unsloth before transformers
    from emalib.core.io import read_jsonl
    from emalib.defenses.registry import build_defense
    from emalib.runs.pipeline import check_inputs, training_conversations

    run_dir = prepare_run_dir(params, run_dir)
    check_inputs(params, ("interleave_selection",))
    conversations = training_conversations(params)
    defense = build_defense(defense_block(params, "interleave_selection"))
    ctx = defense_context(params, run_dir)
    with timed(run_dir, "interleave_selection"):
        defense.score_candidates(ctx)
        defense.transform_data(conversations, ctx)
    update_manifest(run_dir, interleave_selection=ctx.notes[defense.name])
    return read_jsonl(run_dir / "interleave_selected.jsonl")


def caft_directions(params: RunParams, run_dir: Path | None = None) -> dict:
    """Principal components of (adapter - base) outputs of the `caft` block's layers on the response tokens of
    its neutral prompts (Casademunt et al.'s preparation), saved where training reads them (directions_path,
    default <run>/caft_directions.pt); returns the file's summary (explained variances per layer) and path. An
    existing file is kept."""
    from emalib.model.engines import import_engine_first

    import_engine_first(params.model.engine)
    import torch

    from emalib.defenses import caft
    from emalib.defenses.registry import build_defense

    run_dir = prepare_run_dir(params, run_dir)
    spec = defense_block(params, "caft_directions")
    if spec.adapter is None or spec.select == "persona_vector":
        raise ParamsError("defenses.caft.adapter: the caft_directions step needs a plain fine-tune's adapter "
                          "(and a select other than persona_vector)")
    defense = build_defense(spec)
    path = defense.directions_file(defense_context(params, run_dir))
    if not path.is_file():
        with timed(run_dir, "caft_directions"):
            _compute_caft_directions(params, defense, path)
    data = torch.load(str(path), map_location="cpu", weights_only=True)
    summary = {"path": str(path), "layers": sorted(caft.load_directions(path)),
               "explained_variance": {str(b): [float(v) for v in values]
                                      for b, values in data.get("explained_variance", {}).items()},
               "n_positions": data.get("n_positions")}
    update_manifest(run_dir, caft_directions={k: v for k, v in summary.items() if k != "explained_variance"})
    return summary


def _compute_caft_directions(params: RunParams, defense, path: Path) -> None:
    import torch

    from emalib.data.chat import read_chat_jsonl, select_examples
    from emalib.data.registry import resolve
    from emalib.defenses.caft import activation_differences, pca_components, save_directions
    from emalib.model.engines import load_model
    from emalib.model.tokenize import ChatDataset, collate
    from emalib.runs.pipeline import check_inputs

    check_inputs(params, ("caft_directions",))
    conversations = select_examples(read_chat_jsonl(resolve(defense.prompts)), defense.max_prompts, params.seed)
    model, tokenizer = load_model(params.model, params.lora, params.seed, params.train.max_seq_length,
                                  adapter_path=defense.adapter)
    model.eval()
    features = ChatDataset.build(tokenizer, conversations, params.train.max_seq_length).features
    device = next(model.parameters()).device
    diffs: dict[int, list] = {b: [] for b in defense.layers}
    log.info("caft: activations of %d conversations at blocks %s", len(features), list(defense.layers))
    for start in range(0, len(features), defense.batch_size):
        batch = collate(features[start:start + defense.batch_size], tokenizer.pad_token_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        for block, rows in activation_differences(model, batch, defense.layers).items():
            diffs[block].append(rows.cpu())
    directions, variances = {}, {}
    for block, rows in diffs.items():
        directions[block], variances[block] = pca_components(torch.cat(rows), defense.n_components)
    save_directions(path, directions, explained_variance=variances, n_positions=sum(len(r) for r in next(iter(diffs.values()))),
                    adapter=str(defense.adapter), prompts=defense.prompts, model=params.model.name)
