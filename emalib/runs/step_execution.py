"""How `python -m emalib run` wraps each step notebook's papermill execution: where its output goes, and the
removal of a run folder that a failed first step created and left empty of results.

Papermill's log (the cells' output as they run) goes to the run's log.txt, and to stdout only when asked for
(`run -v`); what the kernel process writes to its own stderr (start-up warnings) to log.txt. So the console shows
one line per step (`step_line`) and a failing run's stderr is its one-line error.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path

# Errors a notebook raises about its input (params, data): exit 2 like the same errors before any notebook.
INPUT_ERRORS = ("EmalibError", "ParamsError", "DataError")

# What a run folder holds before its first step has produced anything: the record of the params, the log, the
# manifest, the folder's lock and its owner record, and a failed notebook. A folder made by a run that failed with
# only these is removed.
BOOKKEEPING = ("params.yaml", "log.txt", "manifest.json", ".lock", ".lock.json")


def missing_folders(run_dir: Path) -> list[Path]:
    """The run folder and those of its parents that do not exist yet, innermost first."""
    missing = []
    while not run_dir.exists() and run_dir != run_dir.parent:
        missing.append(run_dir)
        run_dir = run_dir.parent
    return missing


def remove_if_nothing_made(created: list[Path]) -> None:
    """Remove the run folder this invocation created (and the parents it created) when its failed step left
    nothing but bookkeeping; checkpoints, answers or scores are kept, since the step resumes from them."""
    run_dir = created[0]
    if not all(e.is_file() and (e.name in BOOKKEEPING or e.name.endswith(".failed.ipynb")) for e in run_dir.iterdir()):
        return
    shutil.rmtree(run_dir)
    for folder in created[1:]:
        try:
            folder.rmdir()  # only while empty: another run may have started in it meanwhile
        except OSError:
            return


def step_line(run_dir: Path, step: str, event: str, seconds: float | None = None) -> None:
    """What the console shows of a step: one line as it starts and one as it ends, with its time."""
    took = "" if seconds is None else f" in {seconds:.0f} s"
    print(f"[{Path(run_dir).name}] {step}: {event}{took}", file=sys.stdout, flush=True)


@contextmanager
def papermill_log(path: Path, verbose: bool = False):
    """Papermill's log (the cells' output as they run) goes to the run's log.txt, and to stdout too when verbose;
    what the kernel process itself writes to stderr (start-up warnings) to log.txt: a failing run's stderr is its
    one-line error."""
    logger = logging.getLogger("papermill")
    to_file = logging.FileHandler(path)
    to_file.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    handlers, propagate = [to_file], logger.propagate
    if verbose:
        to_stdout = logging.StreamHandler(sys.stdout)
        to_stdout.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        handlers.append(to_stdout)
    for handler in handlers:
        logger.addHandler(handler)
    logger.propagate = False
    try:
        with _stderr_to(path):
            yield
    finally:
        logger.propagate = propagate
        for handler in handlers:
            logger.removeHandler(handler)
            handler.close()


@contextmanager
def _stderr_to(path: Path):
    """File descriptor 2 appends to `path` for the duration: papermill has no option for the kernel process's
    stderr, which the kernel inherits from this process."""
    sys.stderr.flush()
    saved, target = os.dup(2), os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(target, 2)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        os.close(target)


def run_summary(run_dir: Path, study_dir: Path) -> str:
    """The closing lines of `python -m emalib run`: where the results, the report and the figure are, and the one
    command that opens them in the explore notebook."""
    study_dir, run_dir = _shown(study_dir), _shown(run_dir)
    found = {"results": run_dir, "log": run_dir / "log.txt", "report": study_dir / "report.md",
             "table": study_dir / "tables" / f"{study_dir.name}.md",
             "figure": study_dir / "figures" / f"{study_dir.name}.png"}
    lines = [f"{what + ':':9}{path}" for what, path in found.items() if path.exists()]
    lines.append(f"look at them: papermill notebooks/explore.ipynb explore.ipynb -p study {study_dir}"
                 f"  (or open notebooks/explore.ipynb in JupyterLab, study = \"{study_dir}\")")
    return "\n".join(lines)


def _shown(path: Path) -> Path:
    """A path as a person would type it: relative to the current folder when it lies inside it."""
    path = Path(path).resolve()
    try:
        return path.relative_to(Path.cwd())
    except ValueError:
        return path
