"""Every analysis entry point on a real results folder (made by `python -m emalib run` or `emalib study` in the
calling test, never by hand): explore's functions, the explore and report notebooks under papermill and in a
Jupyter kernel started as JupyterLab starts it, re-scoring and the judges listing of every run and base
evaluation, the index, and for a study file `emalib status`."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat

REPO = Path(__file__).resolve().parent.parent


def run_folders(study_dir: Path) -> list[Path]:
    """The folders with a finished evaluation: the runs and the base evaluations."""
    return sorted(p.parent for p in study_dir.glob("*/metrics.json"))


def check_explore_functions(study_dir: Path) -> None:
    from emalib.reporting import explore
    from emalib.runs.rejudge import judge_rates_table
    from emalib.runs.rescore import recompute_metrics
    from emalib.studies.index import read_index

    folders = run_folders(study_dir)
    table = explore.runs(study_dir).set_index("run")
    assert set(table.index) == {p.name for p in folders}
    bases = [p.name for p in folders if p.name.startswith("base-")]
    assert bases and all(table.loc[b, "kind"] == "base" for b in bases)
    for folder in folders:
        n = len((folder / "answers.jsonl").read_text().splitlines())
        assert len(explore.answers(study_dir, folder.name)) == n
        assert recompute_metrics(folder)["overall"]["n"] == n
        assert not judge_rates_table(folder).empty
    names = [p.name for p in folders]
    assert explore.compare(study_dir, names[0], names[1])["n_questions"] >= 1
    assert list(explore.per_question(study_dir, names[:2]).columns.get_level_values("run").unique()) == names[:2]
    assert set(explore.signals(study_dir)["run"]) == set(names)
    assert set(read_index(study_dir)["node"]) == set(names)  # the study's index.parquet, or one from the folders


def run_in_jupyter_kernel(notebook: str, study: Path, out: Path) -> nbformat.NotebookNode:
    """Execute notebooks/<notebook> as JupyterLab does: the project's kernel (this environment's python3 kernel)
    started in the notebook's own folder, the parameters cell edited as a person would (no papermill)."""
    from nbclient import NotebookClient

    nb = nbformat.read(REPO / "notebooks" / notebook, as_version=4)
    parameters = next(c for c in nb.cells if c.cell_type == "code")
    lines = parameters.source.splitlines()
    parameters.source = "\n".join(f"study = {str(study)!r}" if line.startswith("study = ") else line
                                  for line in lines)
    NotebookClient(nb, kernel_name="python3", timeout=900,
                   resources={"metadata": {"path": str(REPO / "notebooks")}}).execute()
    nbformat.write(nb, out)
    return nb


def check_notebooks(study_dir: Path, work: Path) -> None:
    """explore and report, each under papermill (from the project root) and in a Jupyter kernel (from notebooks/),
    on a copy of the study (the report writes into it)."""
    import papermill

    study = work / study_dir.name
    shutil.copytree(study_dir, study)
    names = {p.name for p in run_folders(study)}
    for way in ("papermill", "kernel"):
        for notebook in ("explore.ipynb", "report.ipynb"):
            out = work / f"{way}-{notebook}"
            if way == "papermill":
                papermill.execute_notebook(str(REPO / "notebooks" / notebook), str(out),
                                           parameters={"study": str(study)}, cwd=str(REPO), progress_bar=False)
                executed = nbformat.read(out, as_version=4)
            else:
                (study / "report.md").unlink(missing_ok=True)
                executed = run_in_jupyter_kernel(notebook, study, out)
            outputs = json.dumps([c.get("outputs", []) for c in executed.cells if c.cell_type == "code"])
            assert '"output_type": "error"' not in outputs, (way, notebook)
            if notebook == "explore.ipynb":
                assert all(name in outputs for name in names), (way, names)  # every run and base is listed
            else:
                assert (study / "report.md").is_file() and "image/png" in outputs, way


def check_status(study_file: Path, study_dir: Path) -> None:
    """`emalib status` of a finished study file: every node done."""
    completed = subprocess.run([sys.executable, "-m", "emalib", "status", str(study_file)], cwd=REPO,
                               capture_output=True, text=True, timeout=300, check=False)
    assert completed.returncode == 0, completed.stderr[-2000:]
    lines = completed.stdout.strip().splitlines()
    assert lines and all(line.startswith("done") for line in lines), completed.stdout


def check_analysis(study_dir: Path, work: Path, study_file: Path | None = None) -> None:
    check_explore_functions(study_dir)
    check_notebooks(study_dir, work)
    if study_file is not None:
        check_status(study_file, study_dir)
