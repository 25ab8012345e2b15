"""Bad input, round 3, through the real CLI: names that would write outside the results folder, YAML that would
exhaust memory or the stack, duplicate keys, and values that are accepted but meaningless. Each is refused at
validation: exit 2, at most two lines on stderr and no traceback, the folder holding the results (and the project
beside it) byte-identical, so nothing was written inside the results folder or outside it. No model is loaded."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import pytest
import yaml
from cli_checks import assert_refused, project_folder

from emalib.core.config import load_params
from emalib.core.errors import DataError, ParamsError

REPO = Path(__file__).resolve().parent.parent
MEMORY_LIMIT = 1 << 30  # address space of a CLI under test: a billion-laughs file once took it past 2 GB


def snapshot(folder: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None) for p in sorted(folder.rglob("*"))}


def cli(*args: str | Path, cwd: Path, cache: Path, memory_limit: int | None = None) -> subprocess.CompletedProcess:
    """`python -m emalib <args>`; memory_limit: bytes of address space (too few for torch: validation only)."""
    def limit_memory():
        resource.setrlimit(resource.RLIMIT_AS, (memory_limit, memory_limit))

    env = dict(os.environ, EMALIB_CACHE=str(cache))
    return subprocess.run([sys.executable, "-m", "emalib", *map(str, args)], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300, check=False, preexec_fn=limit_memory if memory_limit else None)


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture
def project(tmp_path) -> Path:
    """A project folder as the issue found it, whose earlier run has an adapter."""
    root = project_folder(tmp_path)
    run = root / "results" / "smoke" / "sft"
    (run / "adapter").mkdir()
    (run / "adapter" / "adapter_model.safetensors").write_bytes(bytes(range(256)))
    return root


def smoke_tree(project: Path, **changes) -> dict:
    tree = yaml.safe_load((REPO / "params" / "smoke.yaml").read_text())
    tree.update(results_dir=str(project / "results"), steps=["train"])
    tree.update(changes)
    return tree


def write_params(project: Path, text: str) -> Path:
    path = project.parent / "params.yaml"
    path.write_text(text)
    return path


def refused_everywhere(project: Path, cache: Path, command: str, path: Path, *pieces: str,
                       memory_limit: int | None = None) -> str:
    """`command path` from inside the project: refused, and nothing under the project's parent folder changed."""
    before = snapshot(project.parent)
    line = assert_refused(cli(command, path, cwd=project, cache=cache, memory_limit=memory_limit), *pieces)
    assert snapshot(project.parent) == before
    return line


# --- names that become folders ------------------------------------------------------------------------------------

@pytest.mark.parametrize("changes, key", [
    ({"study": ".."}, "study"),
    ({"run": "../x"}, "run"),
    ({"study": "..", "run": "notebooks"}, "study"),  # once replaced the project's notebooks/train.ipynb
    ({"run": "x" * 300}, "run"),  # once an OSError: File name too long
    ({"study": "."}, "study"),
    ({"run": "a/b"}, "run"),
], ids=["study-dotdot", "run-up", "into-notebooks", "300-chars", "study-dot", "run-slash"])
def test_a_name_that_is_not_a_folder_name_is_refused_at_validation(project, cache, changes, key):
    path = write_params(project, yaml.safe_dump(smoke_tree(project, **changes)))
    line = refused_everywhere(project, cache, "run", path, f"{path}: key '{key}': not a usable name")
    assert len(line) < 500  # the 300-character name is not echoed in full


def test_check_refuses_the_same_names(project, cache):
    path = write_params(project, yaml.safe_dump(smoke_tree(project, study="..", run="notebooks")))
    refused_everywhere(project, cache, "check", path, f"{path}: key 'study'")


def write_study(project: Path, axes: dict, study: str = "grid") -> Path:
    path = project.parent / "study.yaml"
    base = smoke_tree(project, study="x", run="x", evaluate_base=False)
    path.write_text(yaml.safe_dump({"study": study, "base": base, "axes": axes}))
    return path


@pytest.mark.parametrize("axes, study, pieces", [
    ({"a": {"x": {}}}, "..", ["key 'study': not a usable name"]),
    ({"a": {"..": {}}}, "grid", ["key 'axes.a': not a usable name", "(got '..')"]),
    ({"a": {"x__y": {}, "x": {}}, "b": {"z": {}, "y__z": {}}}, "grid",
     ["cells {a=x, b=y__z} and {a=x__y, b=z} both get the run id 'x__y__z'"]),
    ({"a": {"Low": {}, "low": {}}}, "grid", ["both get the run id 'low'"]),
    ({"a": {"x" * 60: {}}, "b": {"y" * 60: {}}}, "grid", ["key 'run': not a usable name (122 characters)"]),
], ids=["study-dotdot", "label-dotdot", "joined-ids-collide", "ids-differ-in-case", "id-too-long"])
def test_a_study_whose_cells_would_share_or_escape_a_folder_is_refused_before_anything_runs(project, cache, axes,
                                                                                          study, pieces):
    path = write_study(project, axes, study)
    refused_everywhere(project, cache, "study", path, str(path), *pieces)


def test_a_rescore_judge_label_cannot_leave_the_run_folder(project, cache):
    run = project / "results" / "smoke" / "sft"
    (run / "params.yaml").write_text(yaml.safe_dump(smoke_tree(project)))
    before = snapshot(project.parent)
    completed = cli("rescore", run, "--judge", "../../x", cwd=project, cache=cache)
    assert_refused(completed, "judge label '../../x': 1 to 100 letters")
    assert snapshot(project.parent) == before


def test_a_run_folder_reached_through_a_link_out_of_results_dir_is_refused(project, cache, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (project / "results" / "linked").symlink_to(elsewhere, target_is_directory=True)
    path = write_params(project, yaml.safe_dump(smoke_tree(project, study="linked", run="r")))
    refused_everywhere(project, cache, "run", path, f"resolves to {elsewhere / 'r'}, outside results_dir")
    assert not any(elsewhere.iterdir())


# --- YAML that exhausts memory or the stack, duplicate keys --------------------------------------------------------

BILLION_LAUGHS = "study: s\nrun: r\nx0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
    f"x{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]\n" for i in range(1, 10))


def test_a_billion_laughs_params_file_is_refused_in_under_a_second_with_bounded_memory(project, cache):
    path = write_params(project, BILLION_LAUGHS)
    assert len(BILLION_LAUGHS) < 600  # stands for 9**10 (3.5 billion) strings
    tracemalloc.start()
    start = time.perf_counter()
    with pytest.raises(ParamsError) as raised:
        load_params(path)
    elapsed = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert elapsed < 1.0 and peak < 20 * 2**20, (elapsed, peak)
    assert str(raised.value) == (f"{path}: line 8 invalid YAML: aliases expand to more than 200,000 nodes "
                                 "(refused: a billion-laughs document)")
    for command in ("check", "run", "cost"):  # each once ran out of memory (here: 1 GB of address space)
        refused_everywhere(project, cache, command, path, f"{path}: line 8 invalid YAML: aliases expand",
                           memory_limit=MEMORY_LIMIT)


def test_a_billion_laughs_study_file_is_refused(project, cache):
    path = project.parent / "study.yaml"
    path.write_text(BILLION_LAUGHS.replace("study: s\nrun: r\n", "study: s\nbase: {}\naxes: {a: {b: {}}}\n"))
    refused_everywhere(project, cache, "study", path, f"{path}: line 9 invalid YAML: aliases expand",
                       memory_limit=MEMORY_LIMIT)


def test_a_deeply_nested_params_file_is_one_line_not_a_recursion_error(project, cache):
    path = write_params(project, "study: s\nrun: r\nx: " + "[" * 5000 + "]" * 5000 + "\n")
    refused_everywhere(project, cache, "check", path, f"{path}: line 3 invalid YAML: nested more than 64 levels")


def test_a_duplicate_key_names_file_line_and_key(project, cache):
    text = yaml.safe_dump(smoke_tree(project)).replace("train:\n", "train:\n  max_steps: 7\n", 1)
    path = write_params(project, text)
    first = text.splitlines().index("  max_steps: 7") + 1
    second = next(n for n, line in enumerate(text.splitlines(), 1) if line == "  max_steps: 3")
    refused_everywhere(project, cache, "run", path,
                       f"{path}: line {second} invalid YAML: duplicate key 'max_steps' (first on line {first})")


def test_a_duplicate_key_in_a_question_file_is_refused_before_the_run(project, cache):
    questions = project.parent / "questions.yaml"
    questions.write_text("- id: q\n  paraphrases: ['a?']\n  paraphrases: ['b?']\n"
                         "  judge_prompts: {aligned: '{question} {answer}'}\n")
    path = write_params(project, yaml.safe_dump(smoke_tree(project, steps=["evaluate"], generation={
        "question_sets": [str(questions)]})))
    refused_everywhere(project, cache, "run", path,
                       f"{questions}: line 3 invalid YAML: duplicate key 'paraphrases' (first on line 2)")


def test_anchors_aliases_and_merge_keys_within_the_budgets_still_work(tmp_path):
    from emalib.core.safe_yaml import load_yaml, parse_yaml
    from emalib.studies.study import load_study

    path = tmp_path / "p.yaml"
    path.write_text("study: s\nrun: r\ntrain: {dataset: &data medical_train_100, max_steps: 3}\n"
                    "rl: {warm_start: {dataset: *data}}\n")
    assert load_params(path).rl.warm_start.dataset == "medical_train_100"
    study = tmp_path / "s.yaml"
    study.write_text("study: s\nbase: {study: s, run: r}\n"
                     "axes: {a: {x: &o {train: {max_steps: 2}}, y: {<<: *o, seed: 1}}}\n")
    assert {(n.id, n.params.train.max_steps, n.params.seed) for n in load_study(study).runs} == {
        ("x", 2, 0), ("y", 2, 1)}
    assert parse_yaml("d: &d {a: 1, b: 2}\ne: {<<: *d, b: 3}\n") == {"d": {"a": 1, "b": 2}, "e": {"a": 1, "b": 3}}
    with pytest.raises(DataError, match="f.yaml: line 1 invalid YAML: an alias refers to a node that contains it"):
        load_yaml("a: &a [*a]\n", "f.yaml", DataError)


# --- accepted but meaningless -------------------------------------------------------------------------------------

@pytest.mark.parametrize("change, key, message", [
    ({"train": {"learning_rate": float("inf")}}, "train.learning_rate", "Input should be a finite number"),
    ({"train": {"learning_rate": float("nan")}}, "train.learning_rate", "Input should be a finite number"),
    ({"generation": {"temperature": float("inf")}}, "generation.temperature", "Input should be a finite number"),
    ({"train": {"max_steps": True}}, "train.max_steps", "expected a number, got a boolean"),
    ({"seed": False}, "seed", "expected a number, got a boolean"),
    ({"rl": {"reward_weights": [True]}, "steps": ["rl"]}, "rl.reward_weights", "expected a number, got a boolean"),
    ({"defenses": [{"name": "interleave", "ratio": 2}]}, "defenses.0.interleave.ratio", "less than or equal to 1"),
    ({"steps": []}, "steps", "at least 1 item"),
], ids=["lr-inf", "lr-nan", "temperature-inf", "max-steps-true", "seed-false", "reward-weight-true",
        "interleave-ratio-2", "no-steps"])
def test_a_meaningless_value_is_refused_naming_its_key(project, cache, change, key, message):
    tree = smoke_tree(project)
    for section, value in change.items():
        tree[section] = {**tree[section], **value} if isinstance(value, dict) and section in tree else value
    path = write_params(project, yaml.safe_dump(tree))
    refused_everywhere(project, cache, "check", path, f"{path}: key '{key}': ", message)

