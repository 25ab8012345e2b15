"""`python -m emalib`: run a params file's notebooks with papermill, check params, or report a study.

    python -m emalib run params/quickstart.yaml [-o train.max_steps=5 ...]
    python -m emalib check params/paper/*.yaml
    python -m emalib report results/quickstart

`run` validates the params and every data file first, so a typo or a malformed file fails before anything is
written. Each step's notebook executes into a temporary name in the run folder and is renamed to
<step>.ipynb only when it succeeds; a failed execution is kept as <step>.failed.ipynb and never replaces an
earlier successful notebook.
"""

from __future__ import annotations

import argparse
import importlib.resources
import logging
import sys
from pathlib import Path

from emalib.config import RunParams, load_params
from emalib.errors import EmalibError

# The top-level notebooks/ folder is the one source; a built wheel carries a copy as emalib/notebooks (setup.py).
SOURCE_NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"


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


def run_notebooks(params_path: str | Path, overrides: list[str] | None = None, kernel: str = "python3") -> RunParams:
    import papermill

    from emalib.pipeline import check_inputs
    from emalib.results import prepare_run_dir

    params = load_params(params_path, overrides)
    check_inputs(params)
    run_dir = prepare_run_dir(params)
    handler = logging.FileHandler(run_dir / "log.txt")
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    logging.getLogger("papermill").addHandler(handler)
    try:
        for step in params.steps:
            final = run_dir / f"{step}.ipynb"
            running = run_dir / f".{step}.running.ipynb"
            try:
                papermill.execute_notebook(
                    str(notebook_path(step)), str(running), kernel_name=kernel, log_output=True,
                    parameters={"params_path": str(Path(params_path).resolve()), "overrides": list(overrides or [])},
                    cwd=str(Path.cwd()))
            except BaseException:
                if running.exists():
                    running.replace(run_dir / f"{step}.failed.ipynb")
                raise
            running.replace(final)
    finally:
        logging.getLogger("papermill").removeHandler(handler)
        handler.close()
    return params


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="emalib", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="execute the notebooks of a params file with papermill")
    run.add_argument("params")
    run.add_argument("-o", "--override", action="append", default=[], help="dotted key=value, e.g. train.max_steps=5")
    run.add_argument("--kernel", default="python3")
    check = commands.add_parser("check", help="validate params files and their data")
    check.add_argument("params", nargs="+")
    check.add_argument("--data", action="store_true", help="also resolve and validate the data files")
    report = commands.add_parser("report", help="tables and figures from results/<study>")
    report.add_argument("study_dir")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "run":
            params = run_notebooks(args.params, args.override, args.kernel)
            print(f"done: {params.run_dir}")
        elif args.command == "check":
            from emalib.pipeline import check_inputs

            for path in args.params:
                params = load_params(path)
                if args.data:
                    check_inputs(params)
                print(f"ok: {path}")
        elif args.command == "report":
            from emalib.report import report_study

            for kind, path in report_study(args.study_dir).items():
                print(f"{kind}: {path}")
    except EmalibError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except Exception as err:
        from papermill.exceptions import PapermillExecutionError

        if not isinstance(err, PapermillExecutionError):
            raise
        # The notebook's own exception, in one line; the failed notebook is kept next to the run's outputs.
        print(f"error: {err.ename}: {err.evalue}", file=sys.stderr)
        return 1
    return 0
