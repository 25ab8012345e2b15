"""A non-editable install carries the step notebooks: the wheel holds them as emalib/notebooks, and the CLI of an
installed copy finds them there, outside the source tree."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SOURCE_NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
PROJECT_FILES = ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md")


def run(*args: str | Path, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    completed = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True,
                               timeout=900, check=False)
    assert completed.returncode == 0, completed.stdout[-2000:] + completed.stderr[-3000:]
    return completed


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel built from a copy of the project (so the working tree gets no build/ or egg-info)."""
    source = tmp_path_factory.mktemp("source")
    for name in PROJECT_FILES:
        shutil.copy2(REPO / name, source / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".ipynb_checkpoints")
    shutil.copytree(REPO / "emalib", source / "emalib", ignore=ignore)
    shutil.copytree(REPO / "notebooks", source / "notebooks", ignore=ignore)
    dist = tmp_path_factory.mktemp("dist")
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet", "-w", dist, ".",
        cwd=source)
    (built,) = dist.glob("emalib-*.whl")
    return built


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> dict[str, str]:
    """The wheel installed into its own folder; the environment that imports emalib from there (dependencies
    still come from this interpreter's site-packages)."""
    site = tmp_path_factory.mktemp("site")
    run(sys.executable, "-m", "pip", "install", "--no-deps", "--quiet", "--target", site, wheel, cwd=site)
    return dict(os.environ, PYTHONPATH=str(site))


@pytest.mark.slow
def test_wheel_holds_every_notebook_unchanged(wheel):
    with zipfile.ZipFile(wheel) as archive:
        packaged = {Path(name).name: archive.read(name) for name in archive.namelist()
                    if name.startswith("emalib/notebooks/")}
        record = archive.read(next(n for n in archive.namelist() if n.endswith(".dist-info/RECORD"))).decode()
    assert SOURCE_NOTEBOOKS
    assert packaged == {path.name: path.read_bytes() for path in SOURCE_NOTEBOOKS}
    assert all(f"emalib/notebooks/{path.name}," in record for path in SOURCE_NOTEBOOKS)


@pytest.mark.slow
def test_installed_cli_finds_the_packaged_notebooks(installed, tmp_path):
    site = Path(installed["PYTHONPATH"])
    probe = "import emalib, emalib.cli as cli; print(emalib.__file__); print(cli.notebook_path('train'))"
    module_file, train_notebook = run(sys.executable, "-c", probe, cwd=tmp_path, env=installed).stdout.split()
    assert Path(module_file).is_relative_to(site)  # the installed copy, not the source tree
    assert Path(train_notebook) == site / "emalib" / "notebooks" / "train.ipynb"


@pytest.mark.slow
@pytest.mark.notebooks
def test_installed_cli_runs_the_quickstart_outside_the_source_tree(installed, tmp_path):
    shutil.copy2(REPO / "params" / "quickstart.yaml", tmp_path / "quickstart.yaml")
    results = tmp_path / "results"
    overrides = ["train.max_steps=1", "generation.max_questions=1", "generation.samples_per_question=1",
                 "generation.max_new_tokens=8", f"results_dir={results}"]
    run(sys.executable, "-m", "emalib", "run", "quickstart.yaml", *[a for o in overrides for a in ("-o", o)],
        cwd=tmp_path, env=installed)
    import nbformat

    executed = nbformat.read(results / "quickstart" / "sft" / "quickstart.ipynb", as_version=4)
    assert Path(executed.metadata.papermill.input_path).is_relative_to(Path(installed["PYTHONPATH"]))
    assert (results / "quickstart" / "sft" / "metrics.json").is_file()


@pytest.mark.slow
def test_installed_papermill_checks_a_params_file_through_the_entry_point(installed, tmp_path):
    """The wheel's 'papermill.io' entry point: papermill's own command line, started with the installed copy on its
    path, refuses a -f file that is not UTF-8 in one line (emalib/runs/papermill_guard.py) instead of a traceback."""
    from cli_checks import assert_refused

    params = tmp_path / "bad.yaml"
    params.write_bytes(b"study: s\nrun: caf\xe9\n")
    completed = subprocess.run([sys.executable, "-m", "papermill", str(REPO / "notebooks" / "train.ipynb"),
                                str(tmp_path / "out.ipynb"), "-f", str(params), "--prepare-only"], cwd=tmp_path,
                               env=installed, capture_output=True, text=True, timeout=300, check=False)
    assert_refused(completed, f"error: {params}: line 2: not valid UTF-8", max_lines=1)
    assert not (tmp_path / "out.ipynb").exists()
