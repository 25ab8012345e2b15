"""What every bad-input test asserts of a refused command: exit code 2, one short 'error: ...' line, no traceback."""

from __future__ import annotations

import subprocess


def assert_refused(completed: subprocess.CompletedProcess, *pieces: str, max_lines: int = 2) -> str:
    """Exit 2, 1 to max_lines stderr lines, no traceback, the first line 'error: ...' holding every piece; returns it."""
    lines = completed.stderr.strip().splitlines()
    assert completed.returncode == 2, completed.stderr[-3000:]
    assert 1 <= len(lines) <= max_lines and "Traceback" not in completed.stderr, completed.stderr[-3000:]
    assert lines[0].startswith("error: "), lines
    for piece in pieces:
        assert piece in lines[0], (piece, lines[0])
    return lines[0]
