"""The papermill contract (emalib/runs/notebook_params.py): a notebook executed directly with papermill (-f params.yaml,
-p, -y, -r) runs exactly the configuration given, or fails in the cell after the parameters with one line; with no
parameters it runs its documented small default. `python -m emalib run` (params_path + overrides) is unchanged.

Cheap observables stand in for training: the resolution cell prints the run folder, and each case gives an input
that the notebook's first step refuses with a one-line error naming it, before any model loads."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nbformat
import pytest
import yaml

from emalib.core.config import dump_params, load_params, params_from_dict
from emalib.core.errors import ParamsError
from emalib.runs.notebook_params import NOTEBOOK_PARAMETERS, SOURCE, params_from_notebook

REPO = Path(__file__).resolve().parent.parent
# The step notebooks (python -m emalib run executes them); report and explore are analysis notebooks with their own
# parameters (tests/test_report.py).
NOTEBOOKS = sorted(p for p in (REPO / "notebooks").glob("*.ipynb") if p.stem not in ("report", "explore"))
SMOKE = REPO / "params" / "smoke.yaml"
CODE_KL = REPO / "params" / "paper" / "code_kl.yaml"


@dataclass(frozen=True)
class Case:
    """A notebook's documented default, and a configuration its first step refuses in one line naming an input."""

    default: str
    given: dict[str, Any]  # merged into the base configuration below; {tmp} is the test's tmp folder
    error: str  # ename: evalue, with {tmp}


MISSING_TRAIN = {"train": {"dataset": "{tmp}/missing-train.jsonl", "max_steps": 1}}
CASES = {
    "train": Case("params/smoke.yaml", MISSING_TRAIN, "DataError: {tmp}/missing-train.jsonl: data file not found"),
    "quickstart": Case("params/quickstart.yaml", {**MISSING_TRAIN, "steps": ["quickstart"]},
                       "DataError: {tmp}/missing-train.jsonl: data file not found"),
    "evaluate": Case("params/smoke.yaml", {"generation": {"question_sets": ["{tmp}/missing-questions.yaml"]}},
                     "DataError: {tmp}/missing-questions.yaml: data file not found"),
    "evaluate_base": Case("params/smoke.yaml", {"generation": {"question_sets": ["{tmp}/missing-questions.yaml"]}},
                          "DataError: {tmp}/missing-questions.yaml: data file not found"),
    "interleave_selection": Case(
        "params/defenses/interleave_plusplus_smoke.yaml",
        {**MISSING_TRAIN, "steps": ["interleave_selection", "train"],
         "defenses": [{"name": "interleave_plusplus", "adapters": {"em": "{tmp}/adapter"}, "use_all_adapters": True}]},
        "DataError: {tmp}/missing-train.jsonl: data file not found"),
    "rl": Case("params/rl/standin_cpu.yaml", {"steps": ["rl"], "rl": {"prompts": "{tmp}/missing-prompts.jsonl"}},
               "DataError: {tmp}/missing-prompts.jsonl: data file not found"),
    "persona_vector": Case(
        "params/defenses/persona_steering_smoke.yaml",
        {"steps": ["persona_vector", "train"],
         "defenses": [{"name": "persona_steering", "vector_path": "{tmp}/results/not-a-vector.pt"}]},
        "EmalibError: {tmp}/results/not-a-vector.pt: cannot be read as a torch file (UnpicklingError)"),
    "caft_directions": Case(
        "params/defenses/caft_smoke.yaml",
        {"defenses": [{"name": "caft", "adapter": "{tmp}/adapter", "prompts": "{tmp}/missing-prompts.jsonl",
                       "layers": [1], "select": "all"}]},
        "DataError: {tmp}/missing-prompts.jsonl: data file not found"),
    "safelora_matrices": Case(
        "params/defenses/safelora_smoke.yaml",
        {"steps": ["safelora_matrices", "train"],
         "defenses": [{"name": "safelora", "aligned": "{tmp}/aligned", "base": "{tmp}/base", "matrices": "{tmp}/results/V"}]},
        "EmalibError: {tmp}/results/V/alignment.json: matrices of aligned='other', base='other-base'; this run has "
        "aligned='{tmp}/aligned', base='{tmp}/base'"),
}


def fill(value: Any, tmp: Path) -> Any:
    if isinstance(value, str):
        return value.replace("{tmp}", str(tmp))
    if isinstance(value, dict):
        return {key: fill(item, tmp) for key, item in value.items()}
    if isinstance(value, list):
        return [fill(item, tmp) for item in value]
    return value


def given_config(name: str, tmp: Path) -> dict[str, Any]:
    """A whole configuration, as `papermill -f` injects it: the case's inputs on the embedded model."""
    (tmp / "results" / "V").mkdir(parents=True, exist_ok=True)  # in results_dir: the preparatory steps write there
    (tmp / "results" / "not-a-vector.pt").write_text("not a torch file")
    (tmp / "results" / "V" / "alignment.json").write_text(json.dumps({"aligned": "other", "base": "other-base"}))
    return fill({"study": "contract", "run": name, "seed": 7, "results_dir": "{tmp}/results",
                 "model": {"name": "smollm2-135m-instruct"}, "lora": {"r": 4, "alpha": 8}, **CASES[name].given}, tmp)


def code_cells(notebook) -> list:
    return [cell for cell in notebook.cells if cell.cell_type == "code"]


def assigned_names(source: str) -> list[str]:
    return [target.id for node in ast.parse(source).body if isinstance(node, ast.Assign)
            for target in node.targets if isinstance(target, ast.Name)]


def parameters_cell_problems(notebook) -> list[str]:
    """What the first code cell lacks or has beyond the papermill parameters (every params key and the two
    controls), or that it lists them in another order; empty when it lists exactly them."""
    names = assigned_names(code_cells(notebook)[0].source)
    problems = [f"the parameters cell lacks '{name}'" for name in NOTEBOOK_PARAMETERS if name not in names]
    problems += [f"the parameters cell sets '{name}', which is no parameter" for name in names
                 if name not in NOTEBOOK_PARAMETERS]
    if not problems and names != list(NOTEBOOK_PARAMETERS):
        problems.append("the parameters cell lists the parameters in another order")
    return problems


# ---------------------------------------------------------------------------------------------------------------
# The resolution rule, on namespaces as the kernel holds them after papermill's injected cell.


def test_no_parameters_is_the_default_file(monkeypatch):
    monkeypatch.chdir(REPO)
    namespace = {name: None for name in NOTEBOOK_PARAMETERS} | {"overrides": []}
    assert params_from_notebook(namespace, default="params/smoke.yaml") == load_params("params/smoke.yaml")
    with_overrides = namespace | {"overrides": ["train.max_steps=1"]}
    assert params_from_notebook(with_overrides, default="params/smoke.yaml").train.max_steps == 1


def test_what_the_cli_passes_resolves_as_the_cli_does():
    overrides = ["train.max_steps=1", "results_dir=/tmp/elsewhere"]
    namespace = {"params_path": str(SMOKE), "overrides": overrides}
    assert params_from_notebook(namespace, default="params/other.yaml") == load_params(SMOKE, overrides)


def test_given_keys_without_params_path_are_the_whole_configuration():
    """`papermill -f params/paper/code_kl.yaml` injects the file's top-level keys: they are the config."""
    tree = yaml.safe_load(CODE_KL.read_text())
    namespace = {name: None for name in NOTEBOOK_PARAMETERS} | {"overrides": []} | tree
    assert params_from_notebook(namespace, default=str(SMOKE)) == load_params(CODE_KL)
    # Keys not given take the params' defaults, not the notebook's default file.
    params = params_from_notebook({"study": "s", "run": "r", "train": {"max_steps": 2}}, default=str(SMOKE))
    assert params == params_from_dict({"study": "s", "run": "r", "train": {"max_steps": 2}})


def test_given_keys_are_merged_over_params_path_then_overrides():
    namespace = {"params_path": str(SMOKE), "train": {"max_steps": 1, "save_steps": 1}, "seed": 0,
                 "defenses": [{"name": "kl", "weight": 0.5}], "generation": {"question_sets": ["general"]},
                 "overrides": ["train.max_steps=2", "defenses.kl.weight=0.25"]}
    params = params_from_notebook(namespace)
    smoke = load_params(SMOKE)
    assert params.train == smoke.train.model_copy(update={"max_steps": 2, "save_steps": 1})  # section merged
    assert params.generation.question_sets == ("general",) and params.generation.max_questions == 2
    assert [(d.name, d.weight) for d in params.defenses] == [("kl", 0.25)]  # a list replaces, overrides last
    assert (params.study, params.run, params.seed) == ("smoke", "sft", 0)


def test_strings_from_p_and_r_are_read_as_yaml_for_sections_and_lists():
    namespace = {"params_path": str(SMOKE), "train": "{max_steps: 5, dataset: standin_em_train}",
                 "steps": "[train]", "defenses": "[{name: kl}]", "seed": "3", "evaluate_base": "false",
                 "overrides": "[lora.r=4, lora.alpha=8]"}
    params = params_from_notebook(namespace)
    assert params.train.max_steps == 5 and params.steps == ("train",) and params.defenses[0].name == "kl"
    assert (params.seed, params.evaluate_base, params.lora.r, params.lora.alpha) == (3, False, 4, 8)
    assert params_from_notebook({"params_path": str(SMOKE), "overrides": "train.max_steps=4"}).train.max_steps == 4
    mapping = {"params_path": str(SMOKE), "overrides": {"train.max_steps": 6, "generation.question_sets": ["general"]}}
    assert params_from_notebook(mapping).generation.question_sets == ("general",)


@pytest.mark.parametrize(("namespace", "message"), [
    ({"trian": {"max_steps": 1}},
     f"{SOURCE}: unknown parameter 'trian' (did you mean 'train'?); this notebook's parameters are "
     + ", ".join(NOTEBOOK_PARAMETERS)),
    ({"params_path": str(SMOKE), "lr": 1e-4, "evaluate_bas": True},
     f"{SOURCE}: unknown parameters 'evaluate_bas' (did you mean 'evaluate_base'?), 'lr'; this notebook's "
     "parameters are "
     + ", ".join(NOTEBOOK_PARAMETERS)),
    ({"train": {"max_steps": 1}},
     (f"{SOURCE}: 'study' and 'run' not given: without params_path the keys given (train) are the whole "
      "configuration; give params_path to change some keys of a params file")),
    ({"study": "s", "run": "r", "train": {"learning_rat": 1e-4}}, f"{SOURCE}: unknown key 'train.learning_rat'"),
    ({"params_path": str(SMOKE), "lora": {"r": 0}},
     f"{SMOKE} + {SOURCE}: key 'lora.r': Input should be greater than or equal to 1 (got 0)"),
    ({"params_path": str(SMOKE), "overrides": ["train.max_step=1"]},
     f"{SMOKE}: unknown key 'train.max_step' (did you mean 'max_steps'?)"),
    ({"params_path": str(SMOKE), "seed": 1, "overrides": ["trian.max_steps=1"]},
     f"{SMOKE} + {SOURCE}: unknown key 'trian' (did you mean 'train'?)"),
    ({"params_path": 3}, f"{SOURCE}: 'params_path' must be the path of a params YAML file (got 3)"),
    ({"params_path": str(SMOKE), "overrides": [1]},
     f"{SOURCE}: 'overrides' must be a list of dotted key=value strings (got [1])"),
    ({"params_path": "nowhere/params.yaml"}, "nowhere/params.yaml: params file not found"),
    ({"params_path": str(SMOKE), "train": "{max_steps: [1"}, None),
])
def test_problems_are_one_line_naming_the_parameter(namespace, message):
    with pytest.raises(ParamsError) as raised:
        params_from_notebook(namespace, default=str(SMOKE))
    assert "\n" not in str(raised.value)
    if message is not None:
        assert str(raised.value) == message
    else:
        assert str(raised.value).startswith(f"{SOURCE}: key 'train': invalid YAML")


def test_what_the_kernel_defines_itself_is_not_a_parameter():
    import os

    from emalib.core.config import RunParams

    namespace = {"__name__": "__main__", "_i1": "x", "_": "", "In": ["", "a = 1"], "Out": {}, "exit": object(),
                 "get_ipython": print, "open": open, "os": os, "params_from_notebook": params_from_notebook,
                 "RunParams": RunParams, "PAPERMILL_INPUT_PATH": "in.ipynb", "PAPERMILL_OUTPUT_PATH": "out.ipynb",
                 "params": load_params(SMOKE),  # an earlier result: not something papermill can inject
                 "params_path": str(SMOKE)}
    assert params_from_notebook(namespace) == load_params(SMOKE)


def test_a_missing_default_is_named_with_the_folder_it_was_looked_up_from(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ParamsError) as raised:
        params_from_notebook({"params_path": None, "overrides": []}, default="params/smoke.yaml")
    assert str(raised.value).startswith(f"params/smoke.yaml: params file not found (this notebook's default when "
                                        f"no parameters are given, looked up from {tmp_path}")
    assert "\n" not in str(raised.value)


# ---------------------------------------------------------------------------------------------------------------
# The notebooks: the parameters cell shows the real keys; the next cell resolves them; the default is documented.


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_parameters_cell_lists_the_real_keys_and_the_next_cell_resolves_them(path):
    from papermill.translators import PythonTranslator

    assert path.stem in CASES, f"{path.name}: add its default and a cheap failing configuration to CASES"
    cells = code_cells(nbformat.read(path, as_version=4))
    parameters, resolution = cells[0], cells[1]
    assert parameters.metadata.get("tags") == ["parameters"]
    assert parameters_cell_problems(nbformat.read(path, as_version=4)) == []
    namespace: dict[str, Any] = {}
    exec(parameters.source, namespace)  # noqa: S102 (the repository's own notebook)
    assert {name: namespace[name] for name in NOTEBOOK_PARAMETERS} == \
        {name: [] if name == "overrides" else None for name in NOTEBOOK_PARAMETERS}
    # papermill sees every one of them, so it warns about no real key ("Passed unknown parameter").
    assert [p.name for p in PythonTranslator.inspect(parameters)] == list(NOTEBOOK_PARAMETERS)
    default = CASES[path.stem].default
    assert f"No parameters at all: the small default {default}." in parameters.source
    assert (REPO / default).is_file()
    assert f'params = params_from_notebook(globals(), default="{default}")' in resolution.source
    assert "print(params.run_dir)" in resolution.source
    for cell in cells[1:]:  # a later cell reusing a key's name would be read as given on a re-run
        assert not set(assigned_names(cell.source)) & set(NOTEBOOK_PARAMETERS), cell.source
    for cell in cells:
        assert not cell.get("outputs") and cell.get("execution_count") is None


# ---------------------------------------------------------------------------------------------------------------
# papermill's own command line (-f, -p, -y, -r), prepared without a kernel: the injected cell, executed after the
# parameters cell, resolves to the configuration given.


def papermill_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "papermill", *args], capture_output=True, text=True, timeout=600,
                          check=False, cwd=cwd)


def prepared_namespace(notebook: Path, tmp_path: Path, *args: str) -> dict[str, Any]:
    out = tmp_path / "prepared.ipynb"
    completed = papermill_cli(str(notebook), str(out), "--prepare-only", *args)
    assert completed.returncode == 0, completed.stderr[-2000:]
    cells = code_cells(nbformat.read(out, as_version=4))
    assert cells[1].metadata.get("tags") == ["injected-parameters"]
    namespace: dict[str, Any] = {}
    for cell in cells[:2]:
        exec(cell.source, namespace)  # noqa: S102
    return namespace


@pytest.mark.subprocess
def test_papermill_cli_file_yaml_and_parameters_resolve_to_what_was_given(tmp_path):
    notebook = REPO / "notebooks" / "train.ipynb"
    # -f: a whole params file.
    namespace = prepared_namespace(notebook, tmp_path, "-f", str(CODE_KL))
    assert params_from_notebook(namespace, default=str(SMOKE)) == load_params(CODE_KL)
    # -f, then -y / -p / -r on top (papermill's own precedence: a later source replaces a whole key).
    namespace = prepared_namespace(notebook, tmp_path, "-f", str(CODE_KL), "-y", "train: {max_steps: 2}",
                                   "-p", "run", "code_kl_short", "-r", "seed", "5", "-p", "defenses", "[{name: kl}]")
    expected = yaml.safe_load(CODE_KL.read_text()) | {"train": {"max_steps": 2}, "run": "code_kl_short", "seed": 5,
                                                      "defenses": [{"name": "kl"}]}
    assert params_from_notebook(namespace) == params_from_dict(expected)
    # -p params_path: the keys given are merged over that file; overrides apply last.
    namespace = prepared_namespace(notebook, tmp_path, "-p", "params_path", str(SMOKE),
                                   "-p", "train", "{max_steps: 1}", "-y", "overrides: [lora.r=4]")
    assert params_from_notebook(namespace) == load_params(SMOKE, ["train.max_steps=1", "lora.r=4"])
    # The way `python -m emalib run` passes its params.
    namespace = prepared_namespace(notebook, tmp_path, "-y", json.dumps({"params_path": str(SMOKE),
                                                                         "overrides": ["train.max_steps=1"]}))
    assert params_from_notebook(namespace) == load_params(SMOKE, ["train.max_steps=1"])


# ---------------------------------------------------------------------------------------------------------------
# Real executions of every notebook.


def execute(name: str, out: Path, parameters: dict[str, Any] | None, cwd: Path = REPO):
    """Execute a notebook with papermill's API (what -f / -p / -y produce is a parameters dict); returns the
    PapermillExecutionError (None when it succeeded) and the output notebook."""
    import papermill
    from papermill.exceptions import PapermillExecutionError

    try:
        papermill.execute_notebook(str(REPO / "notebooks" / f"{name}.ipynb"), str(out), parameters=parameters,
                                   kernel_name="python3", progress_bar=False, cwd=str(cwd))
        error = None
    except PapermillExecutionError as err:
        error = err
    return error, nbformat.read(out, as_version=4)


def resolution_cell(notebook):
    return next(cell for cell in code_cells(notebook) if "params_from_notebook(" in cell.source)


def failed_in_resolution_cell(notebook) -> bool:
    """The resolution cell raised, and no cell after it ran."""
    cells = code_cells(notebook)
    index = cells.index(resolution_cell(notebook))
    return cells[index].metadata.papermill.exception and \
        all(cell.get("execution_count") is None for cell in cells[index + 1:])


def printed(cell) -> str:
    return "".join(output.get("text", "") for output in cell.outputs if output.output_type == "stream")


@pytest.mark.notebooks
@pytest.mark.parametrize("name", sorted(CASES))
def test_an_unknown_parameter_fails_at_once_naming_it(name, tmp_path):
    results = tmp_path / "results"
    parameters = {"trian": {"max_steps": 1}, "results_dir": str(results)}
    error, notebook = execute(name, tmp_path / "out.ipynb", parameters)
    assert error is not None and error.ename == "ParamsError"
    assert error.evalue.startswith(f"{SOURCE}: unknown parameter 'trian' (did you mean 'train'?); ")
    assert "\n" not in error.evalue
    assert failed_in_resolution_cell(notebook)
    assert not results.exists()


@pytest.mark.notebooks
@pytest.mark.parametrize("name", sorted(CASES))
def test_the_configuration_given_is_what_runs(name, tmp_path):
    """A whole configuration (what `papermill -f params.yaml` injects): its run folder is printed, and its own
    inputs are what the notebook's first step reads (an input it refuses, named in a one-line error)."""
    config = given_config(name, tmp_path)
    error, notebook = execute(name, tmp_path / "out.ipynb", config)
    assert error is not None and f"{error.ename}: {error.evalue}" == fill(CASES[name].error, tmp_path)
    run_dir = tmp_path / "results" / "contract" / name
    assert printed(resolution_cell(notebook)).strip() == str(run_dir)
    assert not resolution_cell(notebook).metadata.papermill.exception
    if (run_dir / "params.yaml").is_file():  # written by the steps that create their folder before reading inputs
        assert (run_dir / "params.yaml").read_text() == dump_params(params_from_dict(config))


@pytest.mark.notebooks
@pytest.mark.parametrize("name", sorted(CASES))
def test_no_parameters_runs_the_documented_default(name, tmp_path):
    """From a folder without the default file, the notebook names the file it would have run."""
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    error, notebook = execute(name, tmp_path / "out.ipynb", None, cwd=cwd)
    assert error is not None and error.ename == "ParamsError"
    assert error.evalue.startswith(f"{CASES[name].default}: params file not found (this notebook's default when "
                                   f"no parameters are given, looked up from {cwd}")
    assert "\n" not in error.evalue and failed_in_resolution_cell(notebook)
    assert not any(cwd.iterdir())


@pytest.mark.notebooks
def test_papermill_cli_runs_the_given_configuration_or_fails_in_one_line(tmp_path):
    notebook = str(REPO / "notebooks" / "evaluate.ipynb")
    results = tmp_path / "results"
    missing = tmp_path / "missing-questions.yaml"
    # -p params_path and -p / -y / -r keys: merged over the file.
    completed = papermill_cli(notebook, str(tmp_path / "out.ipynb"), "-p", "params_path", str(SMOKE),
                              "-y", f"results_dir: {results}", "-p", "generation", f"{{question_sets: [{missing}]}}",
                              "-r", "run", "given", cwd=REPO)
    assert completed.returncode != 0
    assert f"DataError: {missing}: data file not found" in completed.stderr
    executed = nbformat.read(tmp_path / "out.ipynb", as_version=4)
    assert printed(resolution_cell(executed)).strip() == str(results / "smoke" / "given")
    # A typo: refused in the cell after the parameters, nothing written.
    completed = papermill_cli(notebook, str(tmp_path / "typo.ipynb"), "-f", str(SMOKE),
                              "-y", f"results_dir: {results / 'typo'}", "-p", "genration", "{max_questions: 1}",
                              cwd=REPO)
    assert completed.returncode != 0
    line = next(line for line in completed.stderr.splitlines() if line.startswith("ParamsError: "))
    assert re.fullmatch(r"ParamsError: <papermill parameters>: unknown parameter 'genration' \(did you mean "
                        r"'generation'\?\); this notebook's parameters are .*", line)
    assert not (results / "typo").exists()


@pytest.mark.notebooks
@pytest.mark.slow
def test_papermill_f_trains_where_the_file_says_and_the_cli_agrees(tiny_model_dir, tmp_path):
    """A tiny model trained for one step by `papermill -f`; `python -m emalib run` of the same file then finds
    the same run folder made with the same params (it refuses a folder made with other params) and reuses it."""
    config = {"study": "contract", "run": "tiny", "steps": ["train"], "results_dir": str(tmp_path / "results"),
              "model": {"name": str(tiny_model_dir)}, "lora": {"r": 4, "alpha": 8},
              "train": {"dataset": "standin_em_train", "optim": "adamw_torch", "max_steps": 1,
                        "max_seq_length": 64, "per_device_batch_size": 2, "grad_accum_steps": 1, "max_examples": 8}}
    params_file = tmp_path / "tiny.yaml"
    params_file.write_text(yaml.safe_dump(config))
    completed = papermill_cli(str(REPO / "notebooks" / "train.ipynb"), str(tmp_path / "train.ipynb"),
                              "-f", str(params_file), cwd=REPO)
    assert completed.returncode == 0, completed.stderr[-3000:]
    run_dir = tmp_path / "results" / "contract" / "tiny"
    assert (run_dir / "adapter" / "adapter_config.json").is_file()
    assert json.loads((run_dir / "train_log.json").read_text())["global_step"] == 1
    assert (run_dir / "params.yaml").read_text() == dump_params(load_params(params_file))
    completed = subprocess.run([sys.executable, "-m", "emalib", "run", str(params_file)], cwd=REPO,
                               capture_output=True, text=True, timeout=600, check=False)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "training already done" in (run_dir / "log.txt").read_text()


def test_a_parameters_cell_that_lacks_a_params_key_or_adds_a_name_fails_the_contract():
    notebook = nbformat.read(REPO / "notebooks" / "quickstart.ipynb", as_version=4)
    cell = code_cells(notebook)[0]
    assert parameters_cell_problems(notebook) == []
    lines = cell.source.splitlines()
    cell.source = "\n".join(line for line in lines if not line.startswith("train = "))
    assert parameters_cell_problems(notebook) == ["the parameters cell lacks 'train'"]
    cell.source = "\n".join([*lines, "lr = None"])
    assert parameters_cell_problems(notebook) == ["the parameters cell sets 'lr', which is no parameter"]
    cell.source = "\n".join([lines[-1], *lines[:-1]])
    assert parameters_cell_problems(notebook) == ["the parameters cell lists the parameters in another order"]
