"""The prepared inputs of training (a persona vector, interleave scores, SafeLoRA matrices): where each is, which
preparatory step writes it, and the check that fails before any model is loaded when one is missing."""

from __future__ import annotations

from pathlib import Path

from emalib.core.config import RunParams
from emalib.core.defense_specs import prepared_by
from emalib.core.errors import not_prepared

TRAINING_STEPS = ("train", "rl", "quickstart")


def defense_context(params: RunParams, run_dir: Path):
    from emalib.defenses.base import DefenseContext

    return DefenseContext(seed=params.seed, run_dir=run_dir, params=params)


def prepared_inputs(params: RunParams, run_dir: Path) -> list[tuple[str, Path, str]]:
    """(step, the file it writes, what that is) for every prepared input training will read."""
    from emalib.defenses.registry import build_defense
    from emalib.defenses.safelora import MATRICES_SUMMARY

    ctx = defense_context(params, run_dir)
    inputs = []
    for spec in params.defenses:  # the paths come from the defenses themselves, so both sides agree
        if spec.name == "persona_steering":
            inputs.append(("persona_vector", build_defense(spec).vector_file(ctx), "persona vector"))
        elif spec.name in prepared_by()["interleave_selection"]:
            inputs.append(("interleave_selection", build_defense(spec).scores_file(ctx), "interleave scores"))
        elif spec.name == "safelora" and spec.matrices is not None:
            inputs.append(("safelora_matrices", Path(spec.matrices) / MATRICES_SUMMARY, "SafeLoRA alignment matrices"))
        elif spec.name == "caft" and spec.adapter is not None and spec.select != "persona_vector":
            inputs.append(("caft_directions", build_defense(spec).directions_file(ctx), "CAFT directions"))
    return inputs


def check_prepared(params: RunParams, steps: tuple[str, ...], run_dir: Path) -> None:
    """Fail before any model is loaded when training would read a prepared input that does not exist and that no
    step listed before training in `steps` will write."""
    training = [steps.index(step) for step in TRAINING_STEPS if step in steps]
    if not training or (Path(run_dir) / "adapter" / "adapter_config.json").is_file():
        return  # no training, or it is done and reads nothing again
    earlier = steps[:min(training)]
    for step, path, what in prepared_inputs(params, Path(run_dir)):
        if step not in earlier and not path.exists():
            raise not_prepared(path, what, step)
