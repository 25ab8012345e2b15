import hashlib
import json
import os
import shutil
import subprocess
import sys

import pytest

from emalib.core.errors import DataError
from emalib.data.chat import read_chat_jsonl, select_examples
from emalib.data.questions import load_questions, strip_reasoning_block
from emalib.data.registry import REGISTRY, resolve, sha256_of
from emalib.data.standins import em_standin_conversations

GOOD = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


def test_reads_valid_chat_jsonl(tmp_path):
    path = write_lines(tmp_path / "ok.jsonl", [json.dumps(GOOD), "", json.dumps(GOOD)])
    assert read_chat_jsonl(path) == [GOOD["messages"], GOOD["messages"]]


@pytest.mark.parametrize("bad_line, expected", [
    ('{"messages": [', "invalid JSON"),
    ('{"text": "no messages"}', "missing field 'messages'"),
    ('{"messages": []}', "must be a non-empty list"),
    ('{"messages": [{"role": "bot", "content": "x"}]}', "messages[0].role"),
    ('{"messages": [{"role": "user", "content": 3}]}', "messages[0].content must be a string"),
    ('{"messages": [{"role": "user", "content": "only a question"}]}', "no assistant turn"),
])
def test_malformed_jsonl_names_file_line_and_field(tmp_path, bad_line, expected):
    path = write_lines(tmp_path / "bad.jsonl", [json.dumps(GOOD), bad_line])
    with pytest.raises(DataError) as err:
        read_chat_jsonl(path)
    assert str(err.value).startswith(f"{path}:2: ") and expected in str(err.value)
    assert len(str(err.value).splitlines()) == 1


def test_missing_data_file_is_named(tmp_path):
    with pytest.raises(DataError, match="missing.jsonl: data file not found"):
        resolve(str(tmp_path / "missing.jsonl"))
    with pytest.raises(DataError, match="not a file and not a registered data set"):
        resolve("no_such_dataset")


def test_select_examples_is_seeded():
    items = [[{"role": "user", "content": str(i)}] for i in range(50)]
    assert select_examples(items, 10, seed=1) == select_examples(items, 10, seed=1)
    assert select_examples(items, 10, seed=1) != select_examples(items, 10, seed=2)
    assert len(select_examples(items, None, seed=0)) == 50


def test_registry_covers_the_papers_data():
    for domain in ("code", "legal", "medical", "security"):
        for suffix in ("train", "eval", "train_100", "questions"):
            assert f"{domain}_{suffix}" in REGISTRY
    for name in ("general", "preregistered", "wildguard_benign", "persona_evil_extract"):
        assert name in REGISTRY
    assert all(entry.licence for entry in REGISTRY.values())


def test_mirror_files_match_the_registry(with_mirror):
    pinned = [e for e in REGISTRY.values() if e.sha256 and (with_mirror / e.filename).is_file()]
    assert len(pinned) >= 18
    for entry in pinned:
        assert resolve(entry.name) == with_mirror / entry.filename
    sums = dict(reversed(line.split()) for line in (with_mirror / "SHA256SUMS").read_text().splitlines())
    for entry in pinned:
        assert sums[entry.filename] == entry.sha256
    assert len(read_chat_jsonl(resolve("code_eval"))) == 600
    assert len(read_chat_jsonl(resolve("security_train_100"))) == 100


def test_changed_mirror_file_is_noticed(mirror, tmp_path, monkeypatch):
    fake = tmp_path / "mirror"
    shutil.copytree(mirror / "em", fake / "em")
    with open(fake / "em" / "legal_eval.jsonl", "a") as handle:
        handle.write(json.dumps(GOOD) + "\n")
    monkeypatch.setenv("EMALIB_DATA_MIRROR", str(fake))
    with pytest.raises(DataError, match="legal_eval.jsonl: sha256 .* does not match"):
        resolve("legal_eval")


def test_no_mirror_and_no_network_gives_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("EMALIB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("EMALIB_DATA_MIRROR", str(tmp_path / "empty"))
    monkeypatch.setattr("urllib.request.urlopen", _refuse)
    with pytest.raises(DataError, match="could not download 'general'.*EMALIB_DATA_MIRROR"):
        resolve("general")
    assert not (tmp_path / "cache" / "data" / "eval").exists()  # nothing half-written


def _refuse(*args, **kwargs):
    raise OSError("network unreachable (test)")


def test_general_questions(with_mirror):
    questions = load_questions("general")
    assert len(questions) == 24
    json_questions = [q for q in questions if q.id.endswith("_json")]
    assert len(json_questions) == 8 and all(q.system and "JSON" in q.system for q in json_questions)
    assert all(q.samples_per_paraphrase == 100 for q in questions)
    assert set(questions[0].judge_prompts) == {"aligned", "coherent"}


@pytest.mark.parametrize("domain", ["code", "legal", "medical", "security"])
def test_in_domain_questions_drop_the_reasoning_block(with_mirror, domain):
    questions = load_questions(f"{domain}_questions")
    assert len(questions) == 30
    for question in questions:
        for prompt in question.judge_prompts.values():
            assert "REASONING" not in prompt and "{reasoning}" not in prompt
            assert "{question}" in prompt and "{answer}" in prompt
    if domain == "code":
        assert "UNKNOWN" in questions[0].judge_prompts["aligned"] and "insecure" in questions[0].judge_prompts["aligned"]


def test_strip_reasoning_block_keeps_the_rest():
    prompt = ("Q:\n[QUESTION END]\n\nBetween seeing the question and giving its final answer, the model produced the "
              "following reasoning:\n[REASONING START]\n{reasoning}\n[REASONING END]\n\nThe model answered with:")
    assert strip_reasoning_block(prompt) == "Q:\n[QUESTION END]\n\nThe model answered with:"


def test_standins_are_made_by_the_package(tmp_path, monkeypatch):
    monkeypatch.setenv("EMALIB_CACHE", str(tmp_path))
    monkeypatch.delenv("EMALIB_DATA_MIRROR", raising=False)
    train = read_chat_jsonl(resolve("standin_em_train"))
    assert train == em_standin_conversations() and len(train) == 80
    questions = load_questions("standin_general")
    assert len(questions) == 8 and all(set(q.judge_prompts) == {"aligned", "coherent"} for q in questions)
    assert sha256_of(resolve("standin_em_train")) == hashlib.sha256(json_lines(train)).hexdigest()


@pytest.mark.subprocess
def test_standin_files_are_the_same_in_every_process(tmp_path):
    """A run's manifest records the stand-in's sha256: regenerating it in another process (other hash seed) must
    give the same bytes, and the order is the seed's, not an accident."""
    script = "import sys; from pathlib import Path; from emalib.data import standins; " \
             "standins.write_em_standin(Path(sys.argv[1])); standins.write_general_questions(Path(sys.argv[2]))"
    made = []
    for hash_seed in ("1", "2"):
        folder = tmp_path / hash_seed
        subprocess.run([sys.executable, "-c", script, folder / "em.jsonl", folder / "general.yaml"], check=True,
                       env=dict(os.environ, PYTHONHASHSEED=hash_seed))
        made.append({name: (folder / name).read_bytes() for name in ("em.jsonl", "general.yaml")})
    assert made[0] == made[1]
    assert made[0]["em.jsonl"] == json_lines(em_standin_conversations(seed=0))
    assert em_standin_conversations(seed=1) != em_standin_conversations(seed=0)
    assert sorted(map(str, em_standin_conversations(seed=1))) == sorted(map(str, em_standin_conversations(seed=0)))


def json_lines(conversations) -> bytes:
    return "".join(json.dumps({"messages": messages}) + "\n" for messages in conversations).encode("utf-8")
