"""What every bad-input test asserts of a refused command: exit code 2, one short 'error: ...' line, no traceback."""

from __future__ import annotations

import subprocess
from pathlib import Path


def assert_refused(completed: subprocess.CompletedProcess, *pieces: str, max_lines: int = 2) -> str:
    """Exit 2, 1 to max_lines stderr lines, no traceback, the first line 'error: ...' holding every piece; returns it."""
    lines = completed.stderr.strip().splitlines()
    assert completed.returncode == 2, completed.stderr[-3000:]
    assert 1 <= len(lines) <= max_lines and "Traceback" not in completed.stderr, completed.stderr[-3000:]
    assert lines[0].startswith("error: "), lines
    for piece in pieces:
        assert piece in lines[0], (piece, lines[0])
    return lines[0]


def project_folder(tmp_path: Path) -> Path:
    """A project folder as a careless user has it: notebooks/ beside results/, which holds an earlier run."""
    root = tmp_path / "project"
    (root / "notebooks").mkdir(parents=True)
    (root / "notebooks" / "train.ipynb").write_text("the project's own notebook")
    run = root / "results" / "smoke" / "sft"
    run.mkdir(parents=True)
    (run / "metrics.json").write_text('{"overall": {"n": 1}, "per_set": {}}\n')
    return root
