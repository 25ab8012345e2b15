"""The README's way in: `python -m emalib run <params>` executing the notebooks with papermill, and what a
user sees when something is wrong (one line naming the file and key or line; earlier results untouched)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from analysis_checks import check_analysis

REPO = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))


def run_cli(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "emalib", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=1200, check=False)


def tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebooks_are_thin_and_committed_without_outputs(path):
    notebook = nbformat.read(path, as_version=4)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert "parameters" in code[0].metadata.get("tags", [])
    assert "params_path" in code[0].source or path.stem in ("report", "explore")  # analysis notebooks: a study
    for cell in code:
        assert not cell.get("outputs") and cell.get("execution_count") is None
        assert "def " not in cell.source and "class " not in cell.source
        assert len(cell.source.splitlines()) <= 15 or cell is code[0]  # the parameters cell: one line per key


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """One real papermill execution of params/smoke.yaml (train, then evaluate incl. the base model)."""
    results = tmp_path_factory.mktemp("results")
    completed = run_cli("run", "params/smoke.yaml", "-o", f"results_dir={results}")
    assert completed.returncode == 0, completed.stderr[-3000:]
    # What the console showed, beside (not inside) the study folder: the console test reads it.
    (results / "console.stdout").write_text(completed.stdout)
    (results / "console.stderr").write_text(completed.stderr)
    return results / "smoke"


@pytest.mark.notebooks
@pytest.mark.slow
def test_smoke_run_writes_the_run_folder(smoke_run):
    run = smoke_run / "sft"
    for name in ("params.yaml", "manifest.json", "answers.jsonl", "judgments.jsonl", "metrics.json",
                 "train.ipynb", "evaluate.ipynb", "log.txt", "adapter/adapter_config.json",
                 "adapter/adapter_model.safetensors", "train_log.json"):
        assert (run / name).is_file(), name
    assert not list(run.glob(".*.running.ipynb")) and not (run / "checkpoints").exists()
    manifest = json.loads((run / "manifest.json").read_text())
    assert {"git", "packages", "data_sha256", "device", "seed", "timings_s"} <= manifest.keys()
    assert {"train", "generate", "judge"} <= manifest["timings_s"].keys()
    assert manifest["data_sha256"]["standin_em_train"] and manifest["packages"]["torch"]
    judgments = [json.loads(line) for line in (run / "judgments.jsonl").read_text().splitlines()]
    assert len(judgments) == 4 and all("aligned" in j and "coherent" in j for j in judgments)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["overall"]["n"] == 4
    executed = nbformat.read(run / "evaluate.ipynb", as_version=4)
    assert any("injected-parameters" in c.metadata.get("tags", []) for c in executed.cells)
    base = [p for p in smoke_run.glob("base-smollm2-135m-instruct-*") if (p / "metrics.json").is_file()]
    assert len(base) == 1
    table = (smoke_run / "tables" / "smoke.md").read_text()
    assert base[0].name in table and "sft" in table
    assert (smoke_run / "figures" / "smoke.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.notebooks
@pytest.mark.slow
def test_rerunning_a_finished_run_resumes_without_retraining(smoke_run):
    before = tree_digest(smoke_run / "sft" / "adapter")
    completed = run_cli("run", "params/smoke.yaml", "-o", f"results_dir={smoke_run.parent}")
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert tree_digest(smoke_run / "sft" / "adapter") == before
    # Both finished steps were skipped: each notebook ran to its end once, in the first run.
    manifest = json.loads((smoke_run / "sft" / "manifest.json").read_text())
    assert manifest["step_executions"] == {"train": 1, "evaluate": 1}


@pytest.mark.notebooks
@pytest.mark.slow
def test_the_console_shows_one_line_per_step_and_a_summary_not_the_cell_log(smoke_run):
    import re

    stdout = (smoke_run.parent / "console.stdout").read_text()
    console = stdout + (smoke_run.parent / "console.stderr").read_text()
    for step in ("train", "evaluate"):
        assert f"[sft] {step}: started" in stdout
        assert re.search(rf"^\[sft\] {step}: done in \d+ s$", stdout, re.MULTILINE), stdout
    assert f"results: {smoke_run / 'sft'}" in stdout and f"report:  {smoke_run / 'report.md'}" in stdout
    assert f"figure:  {smoke_run / 'figures' / 'smoke.png'}" in stdout
    assert f"look at them: papermill notebooks/explore.ipynb explore.ipynb -p study {smoke_run}" in stdout
    # papermill's cell log and the kernel's warnings are in the run's log, not on the console
    assert "Executing Cell" in (smoke_run / "sft" / "log.txt").read_text()
    assert "Executing" not in console and "papermill:" not in console and "Loading weights" not in console
    # progress in real units, drawn from the kernel's reports: 3 optimizer steps, 2 questions x 2 samples per
    # model, and the judgments (the answers' aligned and coherent prompts the judge had not scored before)
    base = next(p.name for p in smoke_run.glob("base-smollm2-135m-instruct-*"))
    bars = stdout.replace("\r", "\n")
    assert re.search(r"^training sft: 100%\|.*\| 3/3 steps \[", bars, re.MULTILINE), bars
    for run in ("sft", base):
        assert re.search(rf"^sampling {run}: 100%\|.*\| 4/4 answers \[", bars, re.MULTILINE), bars
    assert re.search(r"^judging \(smollm2-135m-instruct\): 100%\|.*\| (\d+)/\1 judgments \[", bars, re.MULTILINE)
    assert not (smoke_run / "sft" / ".progress.jsonl").exists()


def test_papermill_log_reaches_stdout_only_when_verbose(tmp_path, capsys):
    import logging

    from emalib.runs.step_execution import papermill_log

    for verbose in (False, True):
        with papermill_log(tmp_path / "log.txt", verbose):
            logging.getLogger("papermill").warning("Executing Cell %d", int(verbose))
        assert ("Executing Cell 1" in capsys.readouterr().out) is verbose
    assert (tmp_path / "log.txt").read_text().count("Executing Cell") == 2


@pytest.mark.notebooks
@pytest.mark.slow
def test_the_analysis_entry_points_read_a_real_run_and_its_base_evaluation(smoke_run, tmp_path):
    """explore (its functions, and its notebook under papermill and in a Jupyter kernel), the report notebook,
    re-scoring, the judges listing and the index on the smoke run's real folders, the base evaluation's folder
    (which records only its evaluation config) included."""
    import shutil

    from emalib.reporting import explore
    from emalib.runs.rejudge import judge_rates_table
    from emalib.runs.rescore import recompute_metrics

    study = tmp_path / "smoke"
    shutil.copytree(smoke_run, study)  # the report writes into the study folder; the other tests' folder stays
    base = next(p.name for p in study.glob("base-smollm2-135m-instruct-*"))
    table = explore.runs(study).set_index("run")
    assert table.loc[base, "kind"] == "base" and table.loc[base, "label"] == "Aligned (no fine-tuning)"
    assert table.loc[base, "kl_to_base"] == 0 and table.loc["sft", "kind"] == "run"
    shown = explore.answers(study, base)
    assert len(shown) == 4 and set(shown["question_set"]) == {"standin_general"}  # 2 questions x 2 samples
    judged = [json.loads(line) for line in (study / base / "judgments.jsonl").read_text().splitlines()]
    assert sorted(shown["aligned"].fillna(-1)) == sorted(-1 if r["aligned"] is None else r["aligned"] for r in judged)
    comparison = explore.compare(study, "sft", base)
    assert comparison["n_questions"] == 2
    assert list(explore.per_question(study, ["sft", base]).columns.get_level_values("run").unique()) == ["sft", base]
    assert set(explore.signals(study)["run"]) == {"sft", base}
    assert recompute_metrics(study / base)["overall"]["n"] == 4
    assert not judge_rates_table(study / base).empty

    # explore and report under papermill and in a Jupyter kernel, every run folder's entry points, the index
    check_analysis(smoke_run, tmp_path / "analysis")
    executed = nbformat.read(tmp_path / "analysis" / "papermill-explore.ipynb", as_version=4)
    runs_cell = next(c for c in executed.cells if c.cell_type == "code" and "explore.runs" in c.source)
    assert "Aligned (no fine-tuning)" in str(runs_cell.outputs)
    study = tmp_path / "analysis" / "smoke"
    assert (study / "report.md").is_file()
    gap = json.loads((study / "sft" / "metrics.json").read_text())["judge_free"]
    lo, hi = gap["loglik_gap_ci"]
    overview = (study / "tables" / "smoke.md").read_text()
    assert "loglik_gap [95% CI]" in overview and f"{gap['loglik_gap']:.4f} [{lo:.4f}, {hi:.4f}]" in overview


@pytest.mark.notebooks
@pytest.mark.slow
def test_the_analysis_notebooks_run_on_the_quickstarts_own_results(tmp_path):
    """`python -m emalib run params/quickstart.yaml` (shortened: 2 steps, 2 questions x 2 short answers), then
    the explore notebook with its documented default (study = results/quickstart, from the folder the quickstart
    ran in), and every analysis entry point on its run and base folders."""
    import papermill

    shortened = ["train.max_steps=2", "generation.max_questions=2", "generation.samples_per_question=2",
                 "generation.max_new_tokens=8"]
    completed = run_cli("run", str(REPO / "params" / "quickstart.yaml"), *[a for o in shortened for a in ("-o", o)],
                        cwd=tmp_path)
    assert completed.returncode == 0, completed.stderr[-3000:]
    study = tmp_path / "results" / "quickstart"
    assert "results: results/quickstart/sft" in completed.stdout
    papermill.execute_notebook(str(REPO / "notebooks" / "explore.ipynb"), str(tmp_path / "default.ipynb"),
                               cwd=str(tmp_path), progress_bar=False)  # no parameters: the documented default
    check_analysis(study, tmp_path / "analysis")


@pytest.mark.subprocess
def test_unknown_params_key_is_one_line_naming_file_and_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("study: s\nrun: r\ntrain:\n  learning_rat: 1e-4\n")
    completed = run_cli("run", str(bad), "-o", f"results_dir={tmp_path / 'results'}")
    assert completed.returncode == 2
    assert completed.stderr.strip() == f"error: {bad}: unknown key 'train.learning_rat'"
    assert not (tmp_path / "results").exists()


@pytest.mark.subprocess
def test_malformed_jsonl_is_one_line_naming_file_and_line(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}\n'
                    '{"messages": [{"role": "user", "content": "q"}\n')
    completed = run_cli("run", "params/smoke.yaml", "-o", f"train.dataset={data}",
                        "-o", f"results_dir={tmp_path / 'results'}")
    assert completed.returncode == 2
    assert completed.stderr.strip().startswith(f"error: {data}:2: invalid JSON")
    assert len(completed.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "results").exists()


@pytest.mark.subprocess
def test_missing_data_file_is_named(tmp_path):
    missing = tmp_path / "nope.jsonl"
    completed = run_cli("run", "params/smoke.yaml", "-o", f"train.dataset={missing}",
                        "-o", f"results_dir={tmp_path / 'results'}")
    assert completed.returncode == 2 and completed.stderr.strip() == f"error: {missing}: data file not found"


@pytest.mark.subprocess
def test_a_failed_run_overwrites_nothing_already_written(tmp_path):
    """An earlier run's folder, and a new run that fails, side by side: the earlier files are byte-identical."""
    results = tmp_path / "results"
    earlier = results / "smoke" / "sft"
    earlier.mkdir(parents=True)
    from emalib.core.config import dump_params, load_params

    params = load_params(REPO / "params" / "smoke.yaml", [f"results_dir={results}"])
    (earlier / "params.yaml").write_text(dump_params(params))
    (earlier / "metrics.json").write_text('{"overall": {"n": 1}}')
    (earlier / "train.ipynb").write_text("earlier notebook")
    before = tree_digest(results)
    # Same run name, other params: refused before anything is touched.
    completed = run_cli("run", "params/smoke.yaml", "-o", f"results_dir={results}", "-o", "seed=1")
    assert completed.returncode == 2 and "made with different params" in completed.stderr
    # Same params, but the data file is missing: stopped by the pre-flight check, before any notebook runs.
    completed = run_cli("run", "params/smoke.yaml", "-o", f"results_dir={results}",
                        "-o", "train.dataset=" + str(tmp_path / "missing-later.jsonl"))
    assert completed.returncode == 2
    assert tree_digest(results) == before


@pytest.mark.notebooks
@pytest.mark.slow
def test_a_step_failing_inside_its_notebook_keeps_earlier_outputs(tmp_path):
    """Valid params whose training fails in the kernel (no such LoRA target module): the earlier executed
    notebook is not replaced, the failed one is kept beside it, and the error ends the output in one line."""
    from emalib.core.config import dump_params, load_params

    results = tmp_path / "results"
    overrides = [f"results_dir={results}", "lora.target_modules=[no_such_proj]"]
    run = results / "smoke" / "sft"
    run.mkdir(parents=True)
    (run / "params.yaml").write_text(dump_params(load_params(REPO / "params" / "smoke.yaml", overrides)))
    (run / "train.ipynb").write_text("earlier notebook")
    completed = run_cli("run", "params/smoke.yaml", *[arg for o in overrides for arg in ("-o", o)])
    assert completed.returncode == 1
    last_line = completed.stderr.strip().splitlines()[-1]  # papermill's progress log comes before it
    assert last_line.startswith("error: ") and "no_such_proj" in last_line
    assert (run / "train.ipynb").read_text() == "earlier notebook"
    assert (run / "train.failed.ipynb").is_file() and not list(run.glob(".*.running.ipynb"))
    assert not (run / "adapter").exists()
