"""The files and folders that params name and a run writes: each must resolve inside `results_dir` or the cache
(EMALIB_CACHE), checked when the params are validated, before anything is written.

A write target is
- `judge.cache_path`, the judgment cache (sqlite; the batch judge keeps its request files beside it),
- a defense's artifact (`vector_path`, `matrices`, `scores_path`: the block's `artifact_field`) when the step that
  writes it is listed in `steps`.
An artifact whose step is not listed is only read, and an input is read from anywhere: a released persona vector
outside the results folder is used by leaving `persona_vector` out of `steps`. Paths are resolved (symbolic links
followed) against the working directory, as the run itself will open them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from emalib.core.paths import cache_dir

RunParams = Any  # emalib.core.config.RunParams, which calls this module while it validates (no import: a cycle)


def write_targets(params: RunParams) -> list[tuple[str, str]]:
    """(dotted key, path) for every path in the params that a run of them writes."""
    targets = [("judge.cache_path", params.judge.cache_path)] if params.judge.cache_path else []
    for spec in params.defenses:
        field = spec.artifact_field
        if field and spec.prepared_by in params.steps and getattr(spec, field):
            targets.append((f"defenses.{spec.name}.{field}", getattr(spec, field)))
    return targets


def _below(path: Path, root: Path) -> bool:
    """Strictly below: a step also writes beside its target (`<matrices>.tmp`, `<scores>.partial`)."""
    return root in path.parents


def write_target_problem(params: RunParams) -> str | None:
    """'<key>: <path> resolves to ..., outside ...' for the first write target outside both roots; else None."""
    targets = write_targets(params)
    if not targets:
        return None
    results, cache = Path(params.results_dir).resolve(), cache_dir().resolve()
    for key, path in targets:
        resolved = Path(path).resolve()
        if not (_below(resolved, results) or _below(resolved, cache)):
            return (f"{key}: {path} resolves to {resolved}, outside results_dir ({results}) and the cache "
                    f"({cache}); a path a run writes must lie in one of them")
    return None
