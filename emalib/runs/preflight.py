"""What a run's notebooks would refuse on this machine, checked before anything is written: the optimizer name
(transformers' list), an evaluation without an adapter to evaluate, an explicitly requested engine or generation
backend that is not installed, and a run folder that cannot be made. `python -m emalib run` and `check --data` call it after the data checks, so params that
pass `check --data` do not fail on their params inside a notebook.

What depends only on the params themselves (e.g. the em_grader reward needs the online OpenAI-compatible judge)
is refused when they are loaded (emalib.core.config).
"""

from __future__ import annotations

import ast
import difflib
import functools
import importlib.util
from pathlib import Path

from emalib.core.config import RunParams
from emalib.core.errors import ParamsError

TRAINING_STEPS = ("train", "rl", "quickstart")
EVALUATION_STEPS = ("evaluate", "evaluate_base", "quickstart")


def check_runnable(params: RunParams, source: str) -> None:
    """One ParamsError line '<source>: <key>: ...' for the first thing the run's steps would refuse."""
    from emalib.runs.results import check_results_dir

    steps = set(params.steps)
    if steps & set(TRAINING_STEPS):
        _check_optimizer(params.train.optim, source)
    adapter = Path(params.run_dir) / "adapter"
    if "evaluate" in steps and not steps & set(TRAINING_STEPS) and not (adapter / "adapter_config.json").is_file():
        raise ParamsError(f"{source}: steps: 'evaluate' reads the run's adapter and {adapter} holds none; list a "
                          "training step before it (steps: [train, evaluate]) or evaluate_base for the base model")
    if params.model.engine == "unsloth" and importlib.util.find_spec("unsloth") is None:
        raise ParamsError(f"{source}: key 'model.engine': unsloth is not installed (pip install 'emalib[gpu]' on a CUDA "
                          "machine, or engine: hf)")
    if steps & set(EVALUATION_STEPS) and params.generation.backend == "vllm":
        from emalib.core.errors import EmalibError
        from emalib.evaluation.generate_vllm import choose_backend

        try:
            choose_backend("vllm")
        except EmalibError as err:
            raise ParamsError(f"{source}: {err}") from None
    try:
        check_results_dir(params)
    except ParamsError as err:
        raise ParamsError(f"{source}: {err}") from None


def _check_optimizer(name: str, source: str) -> None:
    known = transformers_optimizers()
    if name not in known:
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
        hint = f"did you mean '{close[0]}'?" if close else f"known: {', '.join(known[:8])}, ..."
        raise ParamsError(f"{source}: key 'train.optim': {name!r} is not an optimizer transformers knows ({hint})")


@functools.lru_cache(maxsize=1)
def transformers_optimizers() -> tuple[str, ...]:
    """The `optim` names transformers' TrainingArguments accepts (its OptimizerNames enum).

    Read from transformers/training_args.py without importing it: the import pulls in torch and accelerate (over
    ten seconds on a loaded 2-core machine, and start-up warnings on stderr) for a check that needs a list of
    strings. Imported after all if the source no longer defines the enum there."""
    spec = importlib.util.find_spec("transformers")
    source = Path(spec.origin).parent / "training_args.py" if spec and spec.origin else None
    if source is not None and source.is_file():
        for node in ast.parse(source.read_text(encoding="utf-8")).body:
            if isinstance(node, ast.ClassDef) and node.name == "OptimizerNames":
                names = tuple(stmt.value.value for stmt in node.body if isinstance(stmt, ast.Assign)
                              and isinstance(stmt.value, ast.Constant) and isinstance(stmt.value.value, str))
                if names:
                    return names
    from transformers.training_args import OptimizerNames

    return tuple(member.value for member in OptimizerNames)
