"""The papermill contract: the params a step notebook runs, from what papermill (or `python -m emalib run`) gave it.

Every notebook's `parameters` cell names the params' top-level keys (`study`, `run`, `seed`, `steps`, ...,
`defenses`: the fields of `RunParams`) plus `params_path` and `overrides`, each `None` ("not given") except
`overrides = []`. The next cell calls `params_from_notebook(globals(), default=...)`, which resolves them:

1. nothing given at all (no key, no `params_path`): the notebook's documented small default file, looked up from
   the working directory (params/smoke.yaml for train and evaluate), then `overrides`;
2. `params_path` given: that file, with every given key merged over it (a mapping is merged into the file's
   section key by key, recursively; a list or a scalar replaces the file's value), then `overrides`;
3. keys given without `params_path`: the given keys are the whole configuration (`papermill -f params.yaml`
   injects a params file's top-level keys), keys not given take their defaults; `study` and `run` are required;
   then `overrides`.

`overrides` are `python -m emalib run -o` strings (`train.max_steps=5`; a list, one string, or a mapping of dotted
key to value). A key's value may be a string of YAML (`papermill -p train '{max_steps: 5}'`, `-r`), parsed for
the sections and lists. Every other name papermill injected (`-p trian ...`, a key of an old params file) stops
the notebook in that cell with one line naming it; so do unknown or mistyped keys, worded as for a params file
(emalib/core/config.py) with '<papermill parameters>' as the source. `python -m emalib run` passes `params_path`
(absolute) and `overrides` only, so a notebook resolves exactly the params the command loaded.

Call it in the cell right after the parameters: it takes every plain value (None, a number, a string, a list or
a dict: all that papermill can inject) among the notebook's public globals for a parameter, so variables of later
cells would be refused (after running later cells interactively, restart the kernel before re-running it).
"""

from __future__ import annotations

import copy
import difflib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from emalib.core.config import (
    RunParams,
    apply_override,
    is_sequence_type,
    load_params,
    merge_into,
    model_fields_of,
    override_strings,
    params_from_dict,
    read_yaml_mapping,
)
from emalib.core.errors import ParamsError
from emalib.core.safe_yaml import parse_yaml

SOURCE = "<papermill parameters>"
KEYS = tuple(RunParams.model_fields)
CONTROLS = ("params_path", "overrides")
NOTEBOOK_PARAMETERS = CONTROLS + KEYS
# Names the kernel defines itself, and the ones papermill's --inject-paths options add.
IGNORED_NAMES = frozenset({"In", "Out", "get_ipython", "exit", "quit", "open", "PAPERMILL_INPUT_PATH",
                           "PAPERMILL_OUTPUT_PATH"})
_PLAIN = (type(None), bool, int, float, str, list, tuple, dict)  # what papermill's Python translator can inject


def at_project_root() -> Path:
    """Jupyter starts a kernel in the notebook's own folder, but the notebooks address params/ and results/ from the
    project root, as papermill and `python -m emalib run` run them. So a kernel whose working directory is a project's
    notebooks/ folder (one with params/ beside it) moves to the project root; any other directory is left as it is.
    Returns the working directory."""
    here = Path.cwd()
    if here.name == "notebooks" and (here.parent / "params").is_dir():
        os.chdir(here.parent)
    return Path.cwd()


def params_from_notebook(namespace: Mapping[str, Any], default: str | Path | None = None) -> RunParams:
    """The params a notebook runs (see the module's docstring); raises ParamsError with one line per problem."""
    at_project_root()
    refuse_unknown(namespace)
    params_path = namespace.get("params_path")
    if params_path is not None and not isinstance(params_path, (str, os.PathLike)):
        raise ParamsError(f"{SOURCE}: 'params_path' must be the path of a params YAML file (got {params_path!r})")
    overrides = _overrides(namespace.get("overrides"))
    given = {key: _value(key, namespace[key]) for key in KEYS if namespace.get(key) is not None}
    if params_path is None and not given:
        if default is None:
            raise ParamsError(f"{SOURCE}: no parameters given, and this notebook has no default params file")
        if not Path(default).is_file():
            raise ParamsError(f"{default}: params file not found (this notebook's default when no parameters are "
                              f"given, looked up from {Path.cwd()}: run from the repository root or give params_path)")
        params_path = default
    if not given:  # exactly what `python -m emalib run` loaded
        return load_params(params_path, overrides)
    if params_path is None:
        missing = [key for key in ("study", "run") if key not in given]
        if missing:
            raise ParamsError(f"{SOURCE}: {' and '.join(repr(key) for key in missing)} not given: without params_path "
                              f"the keys given ({', '.join(given)}) are the whole configuration; give params_path "
                              "to change some keys of a params file")
        tree, source = copy.deepcopy(given), SOURCE
    else:
        tree, source = merge_into(read_yaml_mapping(params_path), given), f"{params_path} + {SOURCE}"
    for override in overrides:
        apply_override(tree, override, source)
    return params_from_dict(tree, source)


def refuse_unknown(namespace: Mapping[str, Any]) -> None:
    """One ParamsError naming every public plain value in the namespace that is not a notebook parameter."""
    unknown = sorted(name for name, value in namespace.items()
                     if not name.startswith("_") and name not in NOTEBOOK_PARAMETERS and name not in IGNORED_NAMES
                     and isinstance(value, _PLAIN))
    if not unknown:
        return
    named = []
    for name in unknown:
        close = difflib.get_close_matches(name, NOTEBOOK_PARAMETERS, n=1, cutoff=0.75)
        named.append(f"'{name}'" + (f" (did you mean '{close[0]}'?)" if close else ""))
    raise ParamsError(f"{SOURCE}: unknown parameter{'s' if len(named) > 1 else ''} {', '.join(named)}; this "
                      f"notebook's parameters are {', '.join(NOTEBOOK_PARAMETERS)}")


def _value(key: str, value: Any) -> Any:
    """A given key's value; a string given for a section or a list (papermill -p / -r) is read as YAML."""
    annotation = RunParams.model_fields[key].annotation
    if not isinstance(value, str) or (model_fields_of(annotation) is None and not is_sequence_type(annotation)):
        return value
    try:
        return parse_yaml(value)
    except yaml.YAMLError as err:
        raise ParamsError(f"{SOURCE}: key '{key}': invalid YAML {value!r} ({getattr(err, 'problem', err)})") from None


def _overrides(value: Any) -> list[str]:
    """The dotted key=value strings: a list of them, one string (or a YAML list in a string), or a mapping."""
    if value is None:
        return []
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            value = parse_yaml(value)
        except yaml.YAMLError as err:
            problem = getattr(err, "problem", err)
            raise ParamsError(f"{SOURCE}: 'overrides': invalid YAML {value!r} ({problem})") from None
    elif isinstance(value, str):
        value = [value]
    if isinstance(value, Mapping):
        value = override_strings(dict(value))
    if not isinstance(value, (list, tuple)) or not all(isinstance(item, str) for item in value):
        raise ParamsError(f"{SOURCE}: 'overrides' must be a list of dotted key=value strings (got {value!r})")
    return list(value)
