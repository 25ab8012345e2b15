"""The `-f` params files that papermill's command line parses itself, checked first as emalib checks a params file.

`papermill notebook.ipynb out.ipynb -f params.yaml` parses the file in papermill/cli.py (`yaml.load` of
`papermill_io.read(path, ['.json', '.yaml', '.yml'])`) before any notebook cell runs, so a file that is not UTF-8 ended
in papermill's traceback and a few hundred bytes of nested YAML aliases exhausted the memory. Papermill has no hook
for parsing parameters, and its builtin 'local' I/O handler cannot be replaced (`get_handler` keeps the first one
registered). What it does offer: it imports every 'papermill.io' entry point while it starts. emalib's entry point
(pyproject.toml) is LOCAL_FILES in this module, so importing this module is the hook: it wraps the read of the
`papermill_io` registry so that a params read of a local file first passes `read_yaml_mapping`, the reader of
every emalib params file (size limit, UTF-8, the alias, nesting and duplicate-key refusals of emalib.core.safe_yaml,
a mapping at the top). A file it refuses ends papermill with one line 'error: <file>: <problem>' and exit code 2, as
`python -m emalib` would; a file it accepts goes on to papermill unchanged. Notebook reads, remote paths and `-y`/`-b`
strings are left to papermill.
"""

from __future__ import annotations

import functools


class _PapermillLocalFiles:
    """What papermill registers for this entry point: a handler for paths that begin with the entry point's name
    (papermill routes by prefix), which are local files like any other, so papermill's own local handler serves them.
    Defined before papermill is imported: papermill may import this module while it imports itself."""

    def __getattr__(self, name: str):
        from papermill.iorw import papermill_io

        return getattr(papermill_io.get_handler("local"), name)  # as papermill finds its local handler itself


LOCAL_FILES = _PapermillLocalFiles()
PARAMS_EXTENSION = ".yaml"  # papermill asks for ['.json', '.yaml', '.yml'] when it reads a -f file, never for a notebook


def _refused(message: str) -> Exception:
    """click's exception for a command-line error, shown as 'error: <message>' (one line) with exit code 2."""
    import click

    class Refused(click.ClickException):
        exit_code = 2

        def show(self, file=None) -> None:
            click.echo(f"error: {self.format_message()}", err=True)

    return Refused(message)


def check_params_file(path: str) -> None:
    """Raise the one-line refusal for a local params file emalib would refuse; return for one it reads."""
    from emalib.core.config import read_yaml_mapping
    from emalib.core.errors import ParamsError

    try:
        read_yaml_mapping(path, "papermill parameters file")
    except ParamsError as err:
        raise _refused(str(err)) from None


def guard_params_reads(read):
    """`read` (PapermillIO.read), checking every local params file before papermill parses it."""
    if getattr(read, "emalib_guarded", False):
        return read

    @functools.wraps(read)
    def read_checked(path, extensions=None):
        if isinstance(path, str) and PARAMS_EXTENSION in (extensions or ()) and "://" not in path and path != "-":
            check_params_file(path)
        return read(path) if extensions is None else read(path, extensions)

    read_checked.emalib_guarded = True
    return read_checked


def _install() -> None:
    from papermill.iorw import papermill_io  # present even while papermill.iorw is still being imported

    papermill_io.read = guard_params_reads(papermill_io.read)


_install()
