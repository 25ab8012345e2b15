"""The papermill contract's runner side: find a step's notebook and execute a params file's steps into its run folder.

Each step's notebook executes into a temporary name in the run folder and is renamed to <step>.ipynb only when it
succeeds; a failed execution is kept as <step>.failed.ipynb and never replaces an earlier successful notebook.
"""

from __future__ import annotations

import importlib.resources
import sys
import time
from pathlib import Path

from emalib.core.config import RunParams, load_params
from emalib.core.errors import EmalibError
from emalib.core.names import inside
from emalib.core.write_targets import check_write_targets
from emalib.runs.console_progress import drawn_progress
from emalib.runs.preflight import check_runnable
from emalib.runs.results import (
    make_run_folder,
    prepare_run_dir,
    read_manifest,
    refuse_other_params,
    run_record,
    update_manifest,
)
from emalib.runs.run_lock import run_lock
from emalib.runs.step_execution import missing_folders, papermill_log, remove_if_nothing_made, step_line

# The top-level notebooks/ folder is the one source; a built wheel carries a copy as emalib/notebooks (setup.py).
SOURCE_NOTEBOOK_DIR = Path(__file__).resolve().parents[2] / "notebooks"


def notebook_dirs() -> list[Path]:
    """Where step notebooks are looked for: inside the installed package first, then the source checkout."""
    packaged = Path(str(importlib.resources.files("emalib").joinpath("notebooks")))
    return [packaged, SOURCE_NOTEBOOK_DIR]


def notebook_path(step: str) -> Path:
    folders = notebook_dirs()
    for folder in folders:
        path = folder / f"{step}.ipynb"
        if path.is_file():
            return path
    raise EmalibError(f"{step}.ipynb: notebook for step '{step}' not found in {' or '.join(map(str, folders))}")


def run_notebooks(params_path: str | Path, overrides: list[str] | None = None, kernel: str = "python3",
                  verbose: bool = False) -> RunParams:
    """Validate, then execute the steps holding the run folder's lock (a second run on it is refused). verbose:
    papermill's cell log on stdout as well as in the run's log.txt."""
    from emalib.runs.pipeline import check_inputs

    params = load_params(params_path, overrides)
    check_write_targets(params, str(params_path))  # first: the data checks may already write into the cache
    check_inputs(params)
    check_runnable(params, str(params_path))
    run_dir = inside(params.run_dir, params.results_dir)
    refuse_other_params(run_dir, run_record(params, run_dir))  # before the lock: a refused run writes nothing
    created = missing_folders(run_dir)
    done = _executions(run_dir)  # a damaged manifest fails here, before anything is written
    make_run_folder(run_dir, params.results_dir)  # the lock lives in it
    with run_lock(run_dir):
        return _execute_steps(params, params_path, overrides, kernel, created, done, verbose)


def _execute_steps(params: RunParams, params_path: str | Path, overrides: list[str] | None, kernel: str,
                   created: list[Path], done: dict, verbose: bool = False) -> RunParams:
    import papermill  # after the checks: its import takes seconds
    from papermill.exceptions import PapermillExecutionError

    run_dir = prepare_run_dir(params)
    with papermill_log(run_dir / "log.txt", verbose):
        for step in params.steps:
            final = run_dir / f"{step}.ipynb"
            running = run_dir / f".{step}.running.ipynb"
            if final.is_file() and done.get(step):
                # Finished earlier, with these very params (prepare_run_dir checked them): not redone.
                step_line(run_dir, step, "already done")
                continue
            step_line(run_dir, step, "started")
            started = time.monotonic()
            try:
                # The kernel's bars (answers, judgments, steps) drawn here; with -v its own output shows them.
                with drawn_progress(run_dir, enabled=not verbose):
                    papermill.execute_notebook(
                        str(notebook_path(step)), str(running), kernel_name=kernel, log_output=True,
                        progress_bar={"file": sys.stdout} if verbose else False,
                        parameters={"params_path": str(Path(params_path).resolve()),
                                    "overrides": list(overrides or [])},
                        cwd=str(Path.cwd()))
            except BaseException as err:
                step_line(run_dir, step, "failed", time.monotonic() - started)
                if running.exists():
                    running.replace(run_dir / f"{step}.failed.ipynb")
                if created and isinstance(err, PapermillExecutionError):
                    remove_if_nothing_made(created)
                raise
            running.replace(final)
            step_line(run_dir, step, "done", time.monotonic() - started)
            _count_execution(run_dir, step)
            done = _executions(run_dir)
    return params


def _executions(run_dir: Path) -> dict[str, int]:
    return read_manifest(run_dir).get("step_executions", {})


def _count_execution(run_dir: Path, step: str) -> None:
    """manifest['step_executions'][step] += 1: how often a step's notebook ran to the end in this folder; a step
    with a count and its notebook in place is finished."""
    update_manifest(run_dir, step_executions={step: _executions(run_dir).get(step, 0) + 1})
