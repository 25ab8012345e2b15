"""Atomic file writes: write to a temporary name in the same folder, then rename over the target.

A run that is killed mid-write leaves the previous file intact (or no file), never a half-written one.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as tmp:
            tmp.write(data)
            tmp.flush()
            os.fsync(tmp.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def atomic_write_jsonl(path: str | Path, rows: Iterable[dict[str, Any]]) -> Path:
    return atomic_write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def _not_utf8(raw: bytes, err: UnicodeDecodeError, offset_in: str) -> str:
    return f"not valid UTF-8 (byte 0x{raw[err.start]:02x} at byte offset {err.start} of the {offset_in})"


def cannot_read(path: str | Path, err: OSError) -> str:
    """'<file>: cannot be read (<the system's reason>)'."""
    return f"{path}: cannot be read ({err.strerror or type(err).__name__})"


def read_text_utf8(path: str | Path, error: type[Exception] | None = None) -> str:
    """A data file's text; bytes that are not UTF-8 raise `error` (default DataError) naming the file and line
    instead of a UnicodeDecodeError traceback."""
    from emalib.core.errors import DataError

    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as err:  # unreadable (permissions), a folder, ...
        raise (error or DataError)(cannot_read(path, err)) from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise (error or DataError)(f"{path}: line {line}: {_not_utf8(raw, err, 'file')}") from None


def read_json_object(path: str | Path, required: tuple[str, ...] = ()) -> dict[str, Any]:
    """A JSON file holding one object (metrics, manifests); a damaged one is one DataError line naming the file."""
    from emalib.core.errors import DataError

    path = Path(path)
    try:
        data = json.loads(read_text_utf8(path))
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: line {err.lineno}: invalid JSON ({err.msg})") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object, got {type(data).__name__}")
    missing = [key for key in required if key not in data]
    if missing:
        raise DataError(f"{path}: missing key '{missing[0]}'")
    return data


def iter_jsonl_records(path: str | Path) -> Iterator[tuple[str, Any]]:
    """('<file>:<line>', parsed record) for each non-empty line of a user's JSONL file; a missing file, bytes
    that are not UTF-8, invalid JSON or an empty file raise DataError naming the file (and line), so every
    reader reports alike."""
    from emalib.core.errors import DataError

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: data file not found")
    seen = False
    # Bytes, decoded line by line: a decoding error then knows its line (text mode only knows the buffer).
    try:
        handle = open(path, "rb")  # noqa: SIM115 (closed by the with below)
    except OSError as err:
        raise DataError(cannot_read(path, err)) from None
    with handle:
        for number, raw_line in enumerate(handle, start=1):
            try:
                line = raw_line.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataError(f"{path}:{number}: {_not_utf8(raw_line, err, 'line')}") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{number}: invalid JSON ({err.msg} at column {err.colno})") from None
            seen = True
            yield f"{path}:{number}", record
    if not seen:
        raise DataError(f"{path}: no records")


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Plain JSONL reader for files emalib wrote itself (user data goes through emalib.data.chat)."""
    path = Path(path)
    rows = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    from emalib.core.errors import DataError
                    raise DataError(f"{path}:{number}: invalid JSON: {err.msg}") from None
    return rows


def save_figure(figure, folder: str | Path, name: str, dpi: int = 200) -> dict[str, Path]:
    """<name>.png and <name>.pdf (fonts embedded as TrueType, so the PDF's text stays text); each rendered in memory
    and written atomically, so runs of a study reporting at once never see half a file."""
    import io
    import logging

    import matplotlib
    import matplotlib.pyplot as plt

    logging.getLogger("fontTools").setLevel(logging.WARNING)  # its font subsetting logs every table at INFO
    paths = {}
    with matplotlib.rc_context({"pdf.fonttype": 42}):
        for kind in ("png", "pdf"):
            buffer = io.BytesIO()
            figure.savefig(buffer, format=kind, dpi=dpi, bbox_inches="tight")
            paths[kind] = atomic_write_bytes(Path(folder) / f"{name}.{kind}", buffer.getvalue())
    plt.close(figure)
    return paths
