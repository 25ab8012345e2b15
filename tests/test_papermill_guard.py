"""`papermill notebook out.ipynb -f params.yaml`, run as papermill's own command: the params file papermill parses
itself is checked first by emalib's reader (emalib/runs/papermill_guard.py, loaded through the 'papermill.io' entry
point that pyproject.toml declares). A file that is not UTF-8, a billion-laughs file, a deeply nested or oversized
one ends papermill with one line naming the file and exit code 2, before papermill's own YAML parse and before any
output is written; a good file runs as before.

The entry point is read from pyproject.toml into a dist-info folder on the child's PYTHONPATH, so the test does not
depend on when this environment was last installed; test_install.py checks the same through a built wheel."""

from __future__ import annotations

import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest
import tomllib
from cli_checks import assert_refused

from emalib.core.safe_yaml import MAX_CONFIG_BYTES

REPO = Path(__file__).resolve().parent.parent
MEMORY_LIMIT = 1 << 30  # address space of the papermill process: a billion-laughs file once took emalib past 2 GB
LAUGHS = '"a0": &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]\n' + "".join(
    f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]\n" for i in range(1, 10))  # 9**10 strings in 600 bytes

BAD_FILES = {  # name -> (bytes of the -f file, what the one line says after '<file>: ')
    "not-utf8": (b"study: s\nrun: caf\xe9\n", "line 2: not valid UTF-8 (byte 0xe9"),
    "billion-laughs": (LAUGHS.encode(), "line 6 invalid YAML: aliases expand to more than 200,000 nodes"),
    "deep": (b"train: " + b"[" * 5000 + b"]" * 5000 + b"\n", "line 1 invalid YAML: nested more than 64 levels deep"),
    "oversized": (b"study: s\n" + b"#" * MAX_CONFIG_BYTES + b"\n", "-byte limit of a papermill parameters file"),
}


@pytest.fixture(scope="module")
def papermill_env(tmp_path_factory) -> dict[str, str]:
    """This environment, with emalib's 'papermill.io' entry point as pyproject.toml declares it."""
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["entry-points"]["papermill.io"]
    info = tmp_path_factory.mktemp("entry_point") / "emalib-0.1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: emalib\nVersion: 0.1.0\n")
    (info / "entry_points.txt").write_text("[papermill.io]\n" + "".join(f"{k} = {v}\n" for k, v in declared.items()))
    path = os.pathsep.join(filter(None, [str(info.parent), str(REPO), os.environ.get("PYTHONPATH")]))
    return dict(os.environ, PYTHONPATH=path)


def papermill(*args: str | Path, cwd: Path, env: dict, memory_limit: int | None = None) -> subprocess.CompletedProcess:
    """papermill's own command line (the console script beside this interpreter)."""
    def limit_memory():
        resource.setrlimit(resource.RLIMIT_AS, (memory_limit, memory_limit))

    command = shutil.which("papermill", path=str(Path(sys.executable).parent)) or "papermill"
    return subprocess.run([command, *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True, timeout=300,
                          check=False, preexec_fn=limit_memory if memory_limit else None)


@pytest.mark.subprocess
@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_a_params_file_papermill_would_choke_on_is_one_line_naming_it(papermill_env, tmp_path, name):
    content, problem = BAD_FILES[name]
    params = tmp_path / "bad.yaml"
    params.write_bytes(content)
    start = time.perf_counter()
    completed = papermill(REPO / "notebooks" / "train.ipynb", tmp_path / "out.ipynb", "-f", params, "--prepare-only",
                          cwd=tmp_path, env=papermill_env, memory_limit=MEMORY_LIMIT)
    elapsed = time.perf_counter() - start
    # papermill's click handler prints the line; the exit code is emalib's refusal code
    assert_refused(completed, f"error: {params}: ", problem, max_lines=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml"]  # no output notebook, nothing else
    assert elapsed < 120, elapsed  # papermill's start-up on a loaded machine; the refusal itself is milliseconds


@pytest.mark.subprocess
def test_a_good_params_file_is_injected_as_papermill_reads_it(papermill_env, tmp_path):
    params = tmp_path / "good.yaml"
    params.write_text("study: s\nrun: r\ntrain: {max_steps: 1}\nnote: 2024-01-01\n")  # a date stays a string
    out = tmp_path / "out.ipynb"
    completed = papermill(REPO / "notebooks" / "train.ipynb", out, "-f", params, "--prepare-only", cwd=tmp_path,
                          env=papermill_env)
    assert completed.returncode == 0, completed.stderr[-3000:]
    injected = next(cell.source for cell in nbformat.read(out, as_version=4).cells
                    if "injected-parameters" in cell.metadata.get("tags", []))
    assert 'study = "s"' in injected and 'train = {"max_steps": 1}' in injected and 'note = "2024-01-01"' in injected


# The same hook in this process (papermill's registry, as its command line calls it): the other refusals of emalib's
# reader, and the reads it leaves to papermill.

@pytest.mark.parametrize("content, problem", [
    ("seed: 1\nseed: 2\n", "line 2 invalid YAML: duplicate key 'seed' (first on line 1)"),
    ("- study\n- s\n", "expected a mapping of keys at the top level, got list"),
    (None, "papermill parameters file not found"),
], ids=["duplicate-key", "not-a-mapping", "missing"])
def test_the_guarded_read_refuses_what_emalib_refuses_with_exit_code_2(tmp_path, content, problem):
    import click
    from papermill.iorw import papermill_io, read_yaml_file

    import emalib.runs.papermill_guard  # noqa: F401 (papermill's start-up imports it through the entry point)

    params = tmp_path / "p.yaml"
    if content is not None:
        params.write_text(content)
    with pytest.raises(click.ClickException) as raised:
        read_yaml_file(str(params))
    assert raised.value.exit_code == 2 and raised.value.format_message() == f"{params}: {problem}"
    assert papermill_io.read.emalib_guarded


def test_notebook_reads_and_remote_paths_are_left_to_papermill(tmp_path, monkeypatch):
    from papermill.iorw import papermill_io

    from emalib.runs.papermill_guard import guard_params_reads

    seen = []
    read = guard_params_reads(lambda path, extensions=None: seen.append(path) or "x: 1")
    assert guard_params_reads(read) is read  # imported twice: wrapped once
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(b"\xff")
    read(str(bad), [".ipynb", ".json"])  # a notebook read: not a params file
    read("s3://bucket/bad.yaml", [".json", ".yaml", ".yml"])  # remote: papermill's handler reads it
    assert seen == [str(bad), "s3://bucket/bad.yaml"]
    assert papermill_io.read.emalib_guarded
