"""A papermill I/O handler (entry point `papermill.io`: `local`) that checks a YAML parameters file before papermill
parses it.

`papermill notebook.ipynb out.ipynb -f params.yaml` reads and parses the file in papermill's own command, before any
cell of emalib's runs: a non-UTF-8 file ended in a UnicodeDecodeError traceback and a few hundred bytes of nested
YAML aliases ("billion laughs") in an exhausted memory. Papermill reads every local path through its `local` I/O
handler and lets installed packages register their own; this one reads as papermill's does, and a `.yaml` / `.yml`
file it reads must be UTF-8 and pass emalib's guarded loader (alias budget, nesting depth, duplicate keys). Under
papermill's command line a refusal is one line and exit code 2, as with `python -m emalib`; called from Python it
is a ParamsError. Notebooks and every other path pass through unchanged.
"""

from __future__ import annotations

import sys

import yaml
from papermill.iorw import LocalHandler, chdir

from emalib.core.errors import ParamsError
from emalib.core.safe_yaml import parse_yaml, yaml_problem

YAML_SUFFIXES = (".yaml", ".yml")


class GuardedLocalHandler(LocalHandler):
    def read(self, path):
        return self._read_yaml_text(path) if str(path).endswith(YAML_SUFFIXES) else super().read(path)

    def _read_yaml_text(self, path) -> str:
        try:
            with chdir(self._cwd), open(path, "rb") as file:
                raw = file.read()
            text = raw.decode("utf-8")
            parse_yaml(text)  # refusals only: papermill parses the text itself
        except UnicodeDecodeError as err:
            _refuse(f"{path}: not UTF-8 (byte 0x{raw[err.start]:02x} at offset {err.start}); save it as UTF-8")
        except yaml.YAMLError as err:
            _refuse(f"{path}: {yaml_problem(err)}")
        except OSError as err:
            _refuse(f"{path}: cannot be read ({err.strerror or type(err).__name__})")
        return text


def _refuse(message: str) -> None:
    import click

    if click.get_current_context(silent=True) is not None:  # papermill's command: one line, exit 2, no traceback
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2)
    raise ParamsError(message)


guarded_local_handler = GuardedLocalHandler()
