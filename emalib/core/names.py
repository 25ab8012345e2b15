"""Names that become folders (study, run, study axis labels, judge labels), and the check that a folder the
package writes lies inside the root it belongs to.

A name is 1 to 100 letters, digits, '-', '_' or '.', and not '.' or '..' alone: `study: ..` with `run: notebooks`
once wrote a run into the project's own notebooks/ folder, and a 300-character name ended in an OSError. The
length bound leaves room for a study id that joins several labels.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated

from pydantic import AfterValidator

MAX_NAME_LENGTH = 100
_NAME = re.compile(rf"[A-Za-z0-9_.-]{{1,{MAX_NAME_LENGTH}}}")
NAME_RULE = (f"1 to {MAX_NAME_LENGTH} letters, digits, '-', '_' or '.' (not '.' or '..' alone), as it names a "
             "folder")


def is_safe_name(value: str) -> bool:
    return bool(_NAME.fullmatch(value)) and value not in (".", "..")


def check_name(value: str) -> str:
    """The name, or ValueError saying what a name may be (pydantic reports it under the key)."""
    if not is_safe_name(value):
        raise ValueError(f"not a usable name ({len(value)} characters): {NAME_RULE}")
    return value


SafeName = Annotated[str, AfterValidator(check_name)]


def inside(path: str | Path, root: str | Path, what: str = "results_dir") -> Path:
    """`path`, after checking that it resolves (symbolic links followed) to `root` or below; else ParamsError.
    Every folder a run or study writes in is checked so before the first write."""
    from emalib.core.errors import ParamsError

    resolved, base = Path(path).resolve(), Path(root).resolve()
    if resolved != base and base not in resolved.parents:
        raise ParamsError(f"{path}: resolves to {resolved}, outside {what} {base}; refusing to write there")
    return Path(path)
