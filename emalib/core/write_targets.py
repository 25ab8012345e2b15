"""The files and folders that params name and a run writes: each must resolve strictly below `results_dir` or the
cache (EMALIB_CACHE), checked before a run writes anything.

A write target is
- `judge.cache_path`, the judgment cache (sqlite; the batch judge keeps its request files beside it),
- a defense's artifact (`vector_path`, `matrices`, `scores_path`: the block's `artifact_field`) when the step that
  writes it is listed in `steps`.
An artifact whose step is not listed is only read, and an input is read from anywhere: a released persona vector
outside the results folder is used by leaving `persona_vector` out of `steps`. Paths are resolved (symbolic links
followed) against the working directory, as the run itself will open them.

The check is made where a run starts (`check`, `run`, a study's expansion, every step's run folder, a re-judge's
cache), not when params are validated: reading a finished run's recorded params (the report, rescore) must not
depend on this machine's EMALIB_CACHE or working directory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from emalib.core.errors import ParamsError
from emalib.core.paths import cache_dir


def write_targets(params: Any) -> list[tuple[str, str]]:
    """(dotted key, path) for every path in `params` (a RunParams) that a run of them writes."""
    targets = [("judge.cache_path", params.judge.cache_path)] if params.judge.cache_path else []
    for spec in params.defenses:
        field = spec.artifact_field
        if field and spec.prepared_by in params.steps and getattr(spec, field):
            targets.append((f"defenses.{spec.name}.{field}", getattr(spec, field)))
    return targets


def _below(path: Path, root: Path) -> bool:
    """Strictly below: a step also writes beside its target (`<matrices>.tmp`, `<scores>.partial`)."""
    return root in path.parents


def check_targets(targets: list[tuple[str, str]], results_dir: str | Path, source: str) -> None:
    """ParamsError '<source>: <key>: <path> resolves to ..., outside ...' for the first target below neither
    results_dir nor the cache."""
    if not targets:
        return
    results, cache = Path(results_dir).resolve(), cache_dir().resolve()
    for key, path in targets:
        resolved = Path(path).resolve()
        if not (_below(resolved, results) or _below(resolved, cache)):
            raise ParamsError(f"{source}: {key}: {path} resolves to {resolved}, outside results_dir ({results}) and "
                              f"the cache ({cache}); a path a run writes must lie in one of them")


def check_write_targets(params: Any, source: str) -> None:
    """Refuse, in one line naming the key, params whose run would write outside results_dir and the cache."""
    check_targets(write_targets(params), params.results_dir, source)
