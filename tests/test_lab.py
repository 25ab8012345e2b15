"""JupyterLab, as `make lab` starts it: a real server on 127.0.0.1 that serves the project's notebooks with the
project's kernel (this environment's Python), and the notebooks' move from notebooks/ to the project root."""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _get(url: str, token: str) -> dict:
    request = urllib.request.Request(url, headers={"Authorization": f"token {token}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


@pytest.mark.lab
def test_jupyter_lab_serves_the_notebooks_with_the_projects_kernel(tmp_path):
    version = subprocess.run([sys.executable, "-m", "jupyter", "lab", "--version"], capture_output=True, text=True,
                             timeout=120, check=True).stdout.strip()
    print(f"JupyterLab {version}")
    assert int(version.split(".")[0]) >= 4
    port, token = _free_port(), secrets.token_hex(16)
    env = dict(os.environ, JUPYTER_RUNTIME_DIR=str(tmp_path / "runtime"), JUPYTER_CONFIG_DIR=str(tmp_path / "cfg"))
    # The Makefile's command, with a port, a token and no browser.
    server = subprocess.Popen([sys.executable, "-m", "jupyter", "lab", "--ServerApp.root_dir=.",
                               "--ServerApp.default_url=/lab/tree/notebooks",
                               "--no-browser", "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}",
                               f"--IdentityProvider.token={token}", *(["--allow-root"] if os.geteuid() == 0 else [])],
                              cwd=REPO, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.time() + 120
        while True:
            assert server.poll() is None, server.stderr.read()[-3000:]
            try:
                _get(f"{base}/api/status", token)
                break
            except OSError:
                assert time.time() < deadline, "JupyterLab did not start within 120 s"
                time.sleep(0.5)
        specs = _get(f"{base}/api/kernelspecs", token)
        python = specs["kernelspecs"][specs["default"]]["spec"]
        assert python["language"] == "python"
        kernel_python = Path(python["argv"][0])
        if kernel_python.name.startswith("python") and kernel_python.is_absolute():
            assert kernel_python.resolve() == Path(sys.executable).resolve()
        listing = {item["name"] for item in _get(f"{base}/api/contents/notebooks", token)["content"]}
        assert {"quickstart.ipynb", "report.ipynb", "explore.ipynb"} <= listing
        page = urllib.request.Request(f"{base}/lab", headers={"Authorization": f"token {token}"})
        with urllib.request.urlopen(page, timeout=10) as response:  # the Lab application itself answers
            assert response.status == 200 and b"JupyterLab" in response.read()
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()


def test_a_kernel_started_in_the_notebooks_folder_moves_to_the_project_root(tmp_path, monkeypatch):
    from emalib.runs.notebook_params import at_project_root

    monkeypatch.chdir(REPO / "notebooks")
    assert at_project_root() == REPO and Path.cwd() == REPO
    elsewhere = tmp_path / "notebooks"  # a notebooks/ folder that is not a project's: left alone
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert at_project_root() == elsewhere


@pytest.mark.parametrize("name", ["report", "explore"])
def test_analysis_notebooks_are_thin_and_committed_without_outputs(name):
    import nbformat

    notebook = nbformat.read(REPO / "notebooks" / f"{name}.ipynb", as_version=4)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code[0].metadata.get("tags") == ["parameters"] and "study = " in code[0].source
    for cell in code:
        assert not cell.get("outputs") and cell.get("execution_count") is None
        assert "def " not in cell.source and "class " not in cell.source
    assert "at_project_root()" in code[1].source
