"""Bad input through the CLI: one line on stderr naming the file (and the line or key), exit code 2, and a results
folder that was there before is left byte-identical. Every case fails in the checks that run before any notebook,
so no model is loaded."""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
import yaml
from cli_checks import assert_refused

from emalib.core.config import load_params
from emalib.core.errors import DataError, ParamsError
from emalib.data.chat import read_chat_jsonl

REPO = Path(__file__).resolve().parent.parent
USER, ASSISTANT, SYSTEM = ({"role": role, "content": f"a {role} turn"} for role in ("user", "assistant", "system"))
GOOD_LINE = json.dumps({"messages": [USER, ASSISTANT]})


# --- helpers ----------------------------------------------------------------------------------------------------

def snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every file's bytes and every folder (None) under `folder`: equal snapshots mean nothing was written."""
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None) for p in sorted(folder.rglob("*"))}


def cli(*args: str | Path, cwd: Path, cache: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, EMALIB_CACHE=str(cache))
    return subprocess.run([sys.executable, "-m", "emalib", *map(str, args)], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300, check=False)


def assert_one_line_error(completed: subprocess.CompletedProcess, *expected: str) -> str:
    """Exit code 2 and a single 'error: ...' line on stderr that contains every `expected` piece."""
    return assert_refused(completed, *expected, max_lines=1)


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """A private EMALIB_CACHE: the stand-in data are generated into it, nothing else is needed."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture
def results(tmp_path) -> Path:
    """An earlier run's folder, written before the bad command runs."""
    folder = tmp_path / "results"
    run = folder / "smoke" / "sft"
    run.mkdir(parents=True)
    (run / "metrics.json").write_text('{"overall": {"n": 1}, "per_set": {}}\n')
    (run / "train.ipynb").write_text("earlier notebook")
    (run / "adapter").mkdir()
    (run / "adapter" / "adapter_model.safetensors").write_bytes(bytes(range(256)))
    return folder


def params_file(tmp_path: Path, results: Path, **changes) -> Path:
    """params/smoke.yaml with results_dir in tmp and the given top-level keys replaced."""
    tree = yaml.safe_load((REPO / "params" / "smoke.yaml").read_text())
    tree.update(results_dir=str(results), **changes)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return path


def run_fails(tmp_path: Path, results: Path, cache: Path, *args: str, **changes) -> str:
    """`python -m emalib run` on the params with `changes`: one-line error, exit 2, results untouched."""
    before = snapshot(results)
    params = params_file(tmp_path, results, **changes)
    completed = cli("run", params, *args, cwd=tmp_path, cache=cache)
    line = assert_one_line_error(completed)
    assert snapshot(results) == before
    return line


# --- a. data files that are not UTF-8 -----------------------------------------------------------------------------

@pytest.mark.subprocess
def test_training_jsonl_that_is_not_utf8_names_file_and_line(tmp_path, results, cache):
    data = tmp_path / "train.jsonl"
    latin1_line = b'{"messages": [{"role": "user", "content": "caf\xe9"}]}\n'
    data.write_bytes(GOOD_LINE.encode() + b"\n" + latin1_line)
    line = run_fails(tmp_path, results, cache, "-o", f"train.dataset={data}")
    offset = latin1_line.index(b"\xe9")
    assert line == f"error: {data}:2: not valid UTF-8 (byte 0xe9 at byte offset {offset} of the line)"


@pytest.mark.subprocess
def test_question_set_that_is_not_utf8_names_file_and_line(tmp_path, results, cache):
    questions = tmp_path / "questions.yaml"
    raw = b"- id: q\n  paraphrases: [\"na\xefve?\"]\n"
    questions.write_bytes(raw)
    line = run_fails(tmp_path, results, cache, "-o", f"generation.question_sets=[{questions}]")
    offset = raw.index(b"\xef")
    assert line == f"error: {questions}: line 2: not valid UTF-8 (byte 0xef at byte offset {offset} of the file)"


@pytest.mark.subprocess
def test_a_persona_trait_file_that_is_not_utf8_stops_the_run_before_any_notebook(tmp_path, results, cache):
    """The persona_vector step's inputs are parsed in the checks before anything runs, not inside the notebook."""
    trait = tmp_path / "evil.json"
    trait.write_bytes(b'{"instruction": [\n "caf\xe9"]}\n')
    line = run_fails(tmp_path, results, cache, steps=["persona_vector", "train"],
                     defenses=[{"name": "persona_steering", "layer": 10, "vector_path": str(results / "v.pt"),
                                "extraction": {"trait": str(trait), "filter_pairs": False}}])
    assert line.startswith(f"error: {trait}: line 2: not valid UTF-8 (byte 0xe9")


def test_trait_file_that_is_not_utf8_is_a_data_error(tmp_path):
    from emalib.evaluation.persona import load_trait

    trait = tmp_path / "evil.json"
    raw = b'{\n  "questions": ["\x80"]\n}\n'
    trait.write_bytes(raw)
    with pytest.raises(DataError) as err:
        load_trait(str(trait))
    offset = raw.index(b"\x80")
    assert str(err.value) == f"{trait}: line 2: not valid UTF-8 (byte 0x80 at byte offset {offset} of the file)"


# --- b. report on a folder with no finished runs -----------------------------------------------------------------

@pytest.mark.subprocess
def test_report_on_a_study_without_finished_runs_writes_nothing(tmp_path, cache):
    study = tmp_path / "results" / "smoke"
    (study / "sft").mkdir(parents=True)
    (study / "sft" / "params.yaml").write_text("study: smoke\n")
    before = snapshot(study)
    completed = cli("report", study, cwd=tmp_path, cache=cache)
    assert_one_line_error(completed, f"{study}: no finished runs (no */metrics.json)")
    assert snapshot(study) == before


@pytest.mark.subprocess
def test_report_on_a_missing_folder_names_it(tmp_path, cache):
    missing = tmp_path / "results" / "nope"
    completed = cli("report", missing, cwd=tmp_path, cache=cache)
    assert_one_line_error(completed, f"{missing}: no such study folder")
    assert not missing.exists()


@pytest.mark.subprocess
def test_report_on_a_damaged_metrics_file_names_it(tmp_path, results, cache):
    study = results / "smoke"
    (study / "other").mkdir()
    (study / "other" / "metrics.json").write_text('{"overall": {"n": 1},\n')
    before = snapshot(results)
    completed = cli("report", study, cwd=tmp_path, cache=cache)
    assert_one_line_error(completed, f"{study / 'other' / 'metrics.json'}: line 2: invalid JSON")
    assert snapshot(results) == before


# --- c. chat turns out of order -----------------------------------------------------------------------------------

ALTERNATE = " (turns alternate user/assistant after an optional system turn)"


@pytest.mark.parametrize("messages, expected", [
    ([USER, USER, ASSISTANT], "messages[1]: expected role 'assistant', got 'user'" + ALTERNATE),
    ([ASSISTANT, USER, ASSISTANT], "messages[0]: expected role 'user', got 'assistant'" + ALTERNATE),
    ([SYSTEM, ASSISTANT], "messages[1]: expected role 'user', got 'assistant'" + ALTERNATE),
    ([USER, ASSISTANT, ASSISTANT], "messages[2]: expected role 'user', got 'assistant'" + ALTERNATE),
    ([USER, ASSISTANT, USER], "messages[2]: the conversation must end with an assistant turn"),
])
@pytest.mark.subprocess
def test_training_turns_out_of_order_name_file_line_and_turn(tmp_path, results, cache, messages, expected):
    data = tmp_path / "train.jsonl"
    data.write_text(GOOD_LINE + "\n" + json.dumps({"messages": messages}) + "\n")
    line = run_fails(tmp_path, results, cache, "-o", f"train.dataset={data}")
    assert line == f"error: {data}:2: {expected}"


def test_alternating_turns_with_an_optional_system_turn_are_read(tmp_path):
    conversations = [[USER, ASSISTANT], [SYSTEM, USER, ASSISTANT], [USER, ASSISTANT, USER, ASSISTANT]]
    data = tmp_path / "ok.jsonl"
    data.write_text("".join(json.dumps({"messages": m}) + "\n" for m in conversations))
    assert read_chat_jsonl(data) == conversations


def test_every_chat_file_of_the_mirror_still_loads(with_mirror):
    chat_files = sorted(p for folder in ("em", "safe", "grpo") for p in (with_mirror / folder).glob("*.jsonl"))
    assert len(chat_files) >= 11
    for path in chat_files:
        assert read_chat_jsonl(path), path


# --- d. overrides of list entries (defenses) ---------------------------------------------------------------------

def kl_params(tmp_path: Path, results: Path | None = None) -> Path:
    return params_file(tmp_path, results or tmp_path / "results", defenses=[{"name": "kl", "weight": 0.1}])


def test_a_defense_field_is_overridden_by_name_or_by_index(tmp_path):
    path = kl_params(tmp_path)
    assert load_params(path, ["defenses.kl.weight=0.5"]).defenses[0].weight == 0.5
    assert load_params(path, ["defenses.0.weight=0.25"]).defenses[0].weight == 0.25
    both = load_params(path, ["defenses.0.weight=0.3", "defenses.kl.direction=reverse"]).defenses[0]
    assert (both.weight, both.direction) == (0.3, "reverse")
    assert load_params(path, {"defenses.kl.tokens": "assistant"}).defenses[0].tokens == "assistant"


def test_list_entries_of_other_lists_are_overridden_by_index(tmp_path):
    params = load_params(kl_params(tmp_path), ["generation.question_sets.0=general", "train.learning_rate=1e-5"])
    assert params.generation.question_sets == ("general",) and params.train.learning_rate == 1e-5
    persona = REPO / "params" / "defenses" / "persona_steering_smoke.yaml"
    assert load_params(persona, ["defenses.persona_steering.extraction.max_questions=3"]) \
        .defenses[0].extraction.max_questions == 3


@pytest.mark.parametrize("override, expected", [
    ("defenses.kl.wieght=1", "unknown key 'defenses.kl.wieght' (did you mean 'weight'?)"),
    ("defenses.0.wieght=1", "unknown key 'defenses.0.wieght' (did you mean 'weight'?)"),
    ("defenses.ldifs.weight=1", "override 'defenses.ldifs.weight': 'defenses' has no entry named 'ldifs' (entries: kl)"),
    ("defenses.3.weight=1", "override 'defenses.3.weight': 'defenses' has no index 3 (length 1)"),
    ("train.max_steps.x=1", "override 'train.max_steps.x': 'train.max_steps' is not a section"),
])
@pytest.mark.subprocess
def test_a_bad_override_is_one_line_naming_params_file_and_key(tmp_path, results, cache, override, expected):
    before = snapshot(results)
    params = kl_params(tmp_path, results)
    completed = cli("run", params, "-o", override, cwd=tmp_path, cache=cache)
    assert_one_line_error(completed, f"error: {params}: {expected}")
    assert snapshot(results) == before


def test_an_override_into_an_absent_defense_list_is_refused(tmp_path):
    with pytest.raises(ParamsError, match=r"'defenses' has no entry named 'kl' \(entries: none\)"):
        load_params(params_file(tmp_path, tmp_path / "results"), ["defenses.kl.weight=0.5"])


STEP_NOTEBOOKS = sorted(p for p in (REPO / "notebooks").glob("*.ipynb") if p.stem not in ("report", "explore"))


def test_the_override_example_printed_in_the_report_notebook_works():
    from emalib.reporting.report import load_report_params

    source = next(c.source for c in nbformat.read(REPO / "notebooks" / "report.ipynb", as_version=4).cells
              if c.cell_type == "code")
    examples = ast.literal_eval(re.search(r"e\.g\. (\[.*\])", source).group(1))
    params = load_report_params(examples)
    for example in examples:
        dotted, value = example.split("=", 1)
        assert str(_lookup(params, dotted.split("."))) == value, example


@pytest.mark.parametrize("path", STEP_NOTEBOOKS, ids=lambda p: p.name)
def test_the_override_examples_printed_in_the_notebooks_work(path):
    """The parameters cell says e.g. ["defenses.safelora.tau=0.5"]: each example applies to its params_path."""
    code = [c.source for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code"]
    source = code[0]  # the parameters cell; the next one names the notebook's default params file
    params_path = re.search(r'default="([^"]+)"', code[1]).group(1)
    examples = ast.literal_eval(re.search(r"e\.g\. (\[.*\])", source).group(1))
    assert examples
    params = load_params(REPO / params_path, examples)
    for example in examples:
        dotted, value = example.split("=", 1)
        assert str(_lookup(params, dotted.split("."))) == value, example


def _lookup(node, keys: list[str]):
    """Follow a dotted override key in the loaded params (lists by index or entry name)."""
    for key in keys:
        if isinstance(node, tuple):
            node = node[int(key)] if key.isdigit() else next(entry for entry in node if entry.name == key)
        else:
            node = getattr(node, key)
    return node
