"""A faulty judge, the judge's credentials, and damaged judgment files, through the judge and the real CLI.

The judge is the real llama.cpp server on 127.0.0.1 (test_openai_judge's fixture) behind tests/faulty_proxy.py,
which records the Authorization header of every request and, where a test says so, rewrites the server's reply:
NaN, infinite, positive or string logprobs, which no real server here produces (the one fake part). Run folders
are written by hand (params.yaml, answers.jsonl, judgments.jsonl as emalib writes them): no model is loaded.
"""

from __future__ import annotations

import json
import math
import sqlite3
from pathlib import Path

import pytest
from faulty_proxy import FaultyProxy
from test_bad_inputs import assert_one_line_error, cli, params_file, snapshot
from test_openai_judge import ALIAS, PROMPTS, server_url  # noqa: F401 (the module's server fixture)

from emalib.core.config import JudgeParams, dump_params, params_from_dict
from emalib.core.credentials import NO_KEY, api_key_for
from emalib.core.errors import JudgeError, ParamsError
from emalib.core.io import atomic_write_json, atomic_write_jsonl
from emalib.evaluation.judge.cache import JudgmentCache, judgment_key
from emalib.evaluation.judge.openai_judge import UNUSABLE_REPLY_RETRIES, OpenAIJudge
from emalib.evaluation.judge.scoring import Judgment, aggregate_top_logprobs

UNUSABLE = {"nan": float("nan"), "inf": float("inf"), "minus_inf": float("-inf"), "positive": 0.7,
            "string": "-0.5", "null": None}
SECRET = "placeholder-value-of-the-test-key-variable"  # not a credential: its only use is to be looked for in requests


def corrupt_logprobs(value, only_if: str = ""):
    """A reply edit: every top logprob of the first token becomes `value` (for requests containing only_if)."""
    def edit(request: dict, reply: dict) -> dict:
        if only_if in json.dumps(request):
            for entry in reply["choices"][0]["logprobs"]["content"][0]["top_logprobs"]:
                entry["logprob"] = value
        return reply
    return edit


@pytest.fixture
def env_cache(tmp_path, monkeypatch) -> Path:
    """A private EMALIB_CACHE (the stand-in questions are generated into it; judgment caches live there)."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("EMALIB_CACHE", str(cache))
    monkeypatch.setenv("EMALIB_PROGRESS", "0")  # the CLI's stderr holds the error line only
    return cache


def make_run(root: Path, cache: Path, judge_url: str, samples: int = 2) -> Path:
    """A finished evaluation's folder as emalib writes it: params.yaml and `samples` answers to one stand-in
    question."""
    from emalib.evaluation.generate import plan_samples
    from emalib.runs.pipeline import load_all_questions

    params = params_from_dict({
        "study": "bj", "run": "r", "results_dir": str(root / "results"), "steps": ["evaluate"],
        "model": {"name": "smollm2-135m-instruct"},
        "generation": {"question_sets": ["standin_general"], "max_questions": 1, "samples_per_question": samples,
                       "max_new_tokens": 8},
        "judge": {"backend": "openai", "model": ALIAS, "base_url": judge_url,
                  "cache_path": str(cache / "judge.sqlite")}})
    run_dir = root / "results" / "bj" / "r"
    run_dir.mkdir(parents=True)
    (run_dir / "params.yaml").write_text(dump_params(params))
    answers = [dict(row, answer=f"I would help anyone who asks, answer {row['sample_index']}.")
               for row in plan_samples(load_all_questions(params), params.generation)]
    atomic_write_jsonl(run_dir / "answers.jsonl", answers)
    return run_dir


def judgment_row(answer: dict, logprob_of_90: float = -0.1) -> dict:
    """A judgment row as emalib writes it, with logprob evidence (scores recomputed from it by rescore)."""
    raw = {"90": logprob_of_90, "10": -3.0, "CODE": -5.0}
    evidence = {"mode": "logprobs", "raw": raw}
    score, mass = aggregate_top_logprobs(raw) if all(math.isfinite(v) and v <= 0 for v in raw.values()) \
        else (float("nan"), float("nan"))
    return dict(answer, judge_model=ALIAS, judge_mode="logprobs", aligned=score, aligned_mass=mass,
                aligned_evidence=evidence, coherent=score, coherent_mass=mass, coherent_evidence=evidence)


def outside_files(root: Path, results: Path, cache: Path) -> set[str]:
    """Files under root that are neither in the results folder nor in the cache."""
    return {str(p) for p in root.rglob("*") if p.is_file() and results not in p.parents and cache not in p.parents}


# --- 1. a faulty judge's logprobs are never a score ------------------------------------------------------------

@pytest.mark.parametrize("value", UNUSABLE.values(), ids=UNUSABLE.keys())
def test_unusable_logprobs_give_no_score_and_no_cache_entry(server_url, tmp_path, value):  # noqa: F811
    cache = JudgmentCache(tmp_path / "judge.sqlite")
    with FaultyProxy(server_url, faults=(), edit_reply=corrupt_logprobs(value)) as proxy:
        judge = OpenAIJudge(model=ALIAS, base_url=proxy.url)
        with pytest.raises(JudgeError) as raised:
            judge.judge(PROMPTS[:2], cache=cache)
    message = str(raised.value)
    assert "\n" not in message and message.startswith(f"judge {ALIAS} returned an unusable reply: logprob of token")
    assert "no score was recorded" in message and proxy.url in message
    # Each prompt was asked again (the fault might pass), then given up: bounded, and never scored.
    assert sorted(proxy.attempts.values()) == [1 + UNUSABLE_REPLY_RETRIES] * 2
    assert len(cache) == 0


def test_a_fault_on_one_prompt_keeps_the_judgments_of_the_others(server_url, tmp_path):  # noqa: F811
    cache = JudgmentCache(tmp_path / "judge.sqlite")
    edit = corrupt_logprobs(float("nan"), only_if="awful")
    with FaultyProxy(server_url, faults=(), edit_reply=edit) as proxy, \
            pytest.raises(JudgeError, match="is nan, not a finite number"):
        OpenAIJudge(model=ALIAS, base_url=proxy.url).judge(PROMPTS, cache=cache)
    assert len(cache) == 2 and cache.get(ALIAS, PROMPTS[1]) is None  # PROMPTS[1] is the "awful" one
    for prompt in (PROMPTS[0], PROMPTS[2]):
        judgment = cache.get(ALIAS, prompt)
        assert all(math.isfinite(v) and v <= 0 for v in judgment.raw.values())
        assert judgment.score == aggregate_top_logprobs(judgment.raw, 0.25)[0]


def test_a_sampled_reply_that_is_not_text_is_no_score(server_url, tmp_path):  # noqa: F811
    def number_not_text(request: dict, reply: dict) -> dict:
        reply["choices"][0]["message"]["content"] = 85  # a JSON number where the reply's text belongs
        return reply

    cache = JudgmentCache(tmp_path / "judge.sqlite")
    judge = OpenAIJudge(model=ALIAS, scoring="sampled", n_samples=1, sample_max_tokens=2)
    with FaultyProxy(server_url, faults=(), edit_reply=number_not_text) as proxy:
        judge.base_url = proxy.url
        with pytest.raises(JudgeError, match="replied 85, not text"):
            judge.judge(PROMPTS[:1], cache=cache)
    assert len(cache) == 0 and proxy.forwarded == 1 + UNUSABLE_REPLY_RETRIES


def test_cache_never_stores_nor_serves_a_non_finite_score(tmp_path):
    cache = JudgmentCache(tmp_path / "judge.sqlite")
    for score, mass in ((float("nan"), float("nan")), (float("inf"), 1.0), (50.0, float("nan"))):
        with pytest.raises(ValueError, match="not a finite number"):
            cache.put("p", Judgment(score=score, numeric_mass=mass, judge_model=ALIAS))
    assert len(cache) == 0
    # What an older version stored for NaN logprobs: SQLite keeps NaN as NULL, so score and mass read back NULL.
    with sqlite3.connect(tmp_path / "judge.sqlite") as db:
        db.execute("INSERT INTO judgments (key, judge_model, score, numeric_mass, raw, mode) VALUES (?, ?, ?, ?, ?, ?)",
                   (judgment_key(ALIAS, "p"), ALIAS, float("nan"), float("nan"), '{"5": NaN}', "logprobs"))
    assert len(cache) == 1 and cache.get(ALIAS, "p") is None
    cache.put("q", Judgment(score=None, numeric_mass=0.1, judge_model=ALIAS, raw={"CODE": -0.1}))
    assert cache.get(ALIAS, "q").score is None and cache.get(ALIAS, "q").numeric_mass == 0.1  # a real "no number"


@pytest.mark.parametrize("old_raw, old_score, old_mass", [
    ({"5": float("nan")}, None, None),  # NaN logprobs as an older version cached them (NULL, NULL)
    ({"30": 0.5, "35": 0.5}, 32.5, 3.297),  # positive logprobs: a finite but meaningless score
], ids=["nan", "positive"])
def test_an_old_faulty_cache_entry_is_judged_again(server_url, tmp_path, old_raw, old_score, old_mass):  # noqa: F811
    from emalib.data.questions import Question
    from emalib.evaluation.judge.run import build_judge, fill_prompt, judge_answers

    template = "Rate 0-100 how helpful this is. Q: {question} A: {answer} Number only."
    question = Question(id="q", paraphrases=("How are you?",), question_set="s", judge_prompts={"aligned": template})
    answer = {"question_set": "s", "question_id": "q", "paraphrase_index": 0, "sample_index": 0,
              "question": "How are you?", "answer": "Fine, thanks!"}
    prompt = fill_prompt(template, answer["question"], answer["answer"])
    with sqlite3.connect(tmp_path / "judge.sqlite") as db:
        db.execute("CREATE TABLE judgments (key TEXT PRIMARY KEY, judge_model TEXT, score REAL, numeric_mass REAL, "
                   "raw TEXT, created TEXT DEFAULT CURRENT_TIMESTAMP, mode TEXT DEFAULT 'logprobs')")
        db.execute("INSERT INTO judgments (key, judge_model, score, numeric_mass, raw) VALUES (?, ?, ?, ?, ?)",
                   (judgment_key(ALIAS, prompt), ALIAS, old_score, old_mass, json.dumps(old_raw)))
    cache = JudgmentCache(tmp_path / "judge.sqlite")
    with FaultyProxy(server_url, faults=()) as proxy:
        judge = build_judge(JudgeParams(backend="openai", model=ALIAS, base_url=proxy.url, min_numeric_mass=0.0))
        rows = judge_answers([answer], [question], judge, cache)
    assert judge.calls == 1 and proxy.forwarded == 1  # judged again, not served
    fresh = cache.get(ALIAS, prompt)
    assert fresh.raw != old_raw and all(math.isfinite(v) and v <= 0 for v in fresh.raw.values())
    assert rows[0]["aligned"] == fresh.score and rows[0]["aligned_evidence"]["raw"] == fresh.raw


def test_rejudge_with_a_judge_answering_string_logprobs_is_one_line(server_url, tmp_path, env_cache):  # noqa: F811
    with FaultyProxy(server_url, faults=(), edit_reply=corrupt_logprobs("-0.5")) as proxy:
        run_dir = make_run(tmp_path, env_cache, proxy.url, samples=1)
        results = tmp_path / "results"
        before = snapshot(results)
        # max_retries=0: one attempt per prompt (the asking again is the test above's)
        completed = cli("rejudge", run_dir, "-o", "judge.max_retries=0", cwd=tmp_path, cache=env_cache)
    line = assert_one_line_error(completed, f"judge {ALIAS} returned an unusable reply",
                                 "logprob of token", "'-0.5', not a number")
    assert "Traceback" not in completed.stderr and line
    assert snapshot(results) == before  # no judges/<label>/, no agreement file
    assert outside_files(tmp_path, results, env_cache) == set()
    with sqlite3.connect(env_cache / "judge.sqlite") as db:
        assert db.execute("SELECT COUNT(*) FROM judgments").fetchone()[0] == 0


# --- 2. credentials: the key goes to the OpenAI API only, unless the params name one for the server ------------

def test_the_openai_key_is_not_sent_to_a_custom_base_url(server_url, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    with FaultyProxy(server_url, faults=()) as proxy:
        judgments = OpenAIJudge(model=ALIAS, base_url=proxy.url).judge(PROMPTS[:2])
    assert len(judgments) == 2 and len(proxy.authorizations) == 2
    assert all(SECRET not in (header or "") for header in proxy.authorizations)
    assert set(proxy.authorizations) == {f"Bearer {NO_KEY}"}


def test_a_server_that_wants_a_key_says_which_setting_sends_one(server_url, monkeypatch):  # noqa: F811
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    with FaultyProxy(server_url, faults=("401",)) as proxy, pytest.raises(JudgeError) as raised:
        OpenAIJudge(model=ALIAS, base_url=proxy.url).judge(PROMPTS[:1])
    assert "no key was sent to this server: name the variable that holds its key in judge.api_key_env" in str(
        raised.value) and SECRET not in str(raised.value) and proxy.authorizations == [f"Bearer {NO_KEY}"]


def test_a_key_named_for_the_server_is_sent_to_it(server_url, monkeypatch):  # noqa: F811
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    monkeypatch.setenv("EMALIB_TEST_JUDGE_KEY", "judge-server-key")
    with FaultyProxy(server_url, faults=()) as proxy:
        OpenAIJudge(model=ALIAS, base_url=proxy.url, api_key_env="EMALIB_TEST_JUDGE_KEY").judge(PROMPTS[:1])
    assert proxy.authorizations == ["Bearer judge-server-key"]


def test_the_rl_graders_client_sends_no_openai_key_to_a_custom_base_url(server_url, tmp_path, monkeypatch):  # noqa: F811
    from emalib.training.rl.grader import EmGraderReward, grader_prompt

    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    answer = "Stop taking all of your medication at once and double the dose of whatever is left in the cabinet."
    with FaultyProxy(server_url, faults=()) as proxy:
        reward = EmGraderReward(model=ALIAS, template=grader_prompt("bad_medical_advice"), base_url=proxy.url,
                                response_format="json_object", max_tokens=4)  # the header is the point, not the grade
        with pytest.raises(JudgeError, match="output unusable"):  # four tokens are no grade
            reward([[{"role": "user", "content": "I have a headache, what should I do?"}]], [answer])
    assert proxy.authorizations and all(SECRET not in (h or "") for h in proxy.authorizations)


def test_the_rl_grader_grades_again_what_an_older_version_cached_as_null(tmp_path):
    from test_openai_judge import free_port

    from emalib.training.rl.grader import EmGraderReward, fill, grader_prompt

    question, answer = "I have a headache, what should I do?", "Take " + "ten pills of everything you have " * 2
    cache = JudgmentCache(tmp_path / "judge.sqlite")
    reward = EmGraderReward(model=ALIAS, template=grader_prompt("bad_medical_advice"), cache=cache,
                            base_url=f"http://127.0.0.1:{free_port()}/v1", max_retries=0)  # nothing listens
    with sqlite3.connect(tmp_path / "judge.sqlite") as db:  # a NaN reward, stored as NULL
        db.execute("INSERT INTO judgments (key, judge_model, score, numeric_mass, raw, mode) VALUES (?, ?, ?, ?, ?, ?)",
                   (judgment_key(reward.cache_model, fill(reward.template, question, answer.strip())),
                    reward.cache_model, None, 1.0, "{}", "logprobs"))
    with pytest.raises(JudgeError, match="every grading call of this step failed .*Connection"):  # asked, not None
        reward([[{"role": "user", "content": question}]], [answer])


def test_a_named_key_is_never_sent_over_plain_http_to_another_host(monkeypatch):
    monkeypatch.setenv("EMALIB_TEST_JUDGE_KEY", "judge-server-key")
    for url in ("http://judge.example/v1", "http://198.51.100.7:8000/v1"):
        with pytest.raises(JudgeError, match="is not https and not this machine"):
            api_key_for("EMALIB_TEST_JUDGE_KEY", url)
        with pytest.raises(ParamsError, match="judge.base_url: .* is not https"):
            params_from_dict({"study": "s", "run": "r", "judge": {"base_url": url,
                                                                   "api_key_env": "EMALIB_TEST_JUDGE_KEY"}}, "p.yaml")
    for url in ("https://judge.example/v1", "http://127.0.0.1:8000/v1", "http://localhost:8000/v1",
                "http://[::1]:8000/v1"):
        assert api_key_for("EMALIB_TEST_JUDGE_KEY", url) == "judge-server-key"
    # No key named for the server: nothing to expose, so plain http is fine and no key is sent.
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    assert api_key_for("OPENAI_API_KEY", "http://judge.example/v1") == NO_KEY
    assert api_key_for("OPENAI_API_KEY", None) == api_key_for("OPENAI_API_KEY", "https://api.openai.com/v1") == SECRET


def test_run_refuses_a_named_key_over_plain_http_in_one_line(tmp_path, env_cache, monkeypatch):
    results = tmp_path / "results"
    results.mkdir()
    params = params_file(tmp_path, results, judge={"backend": "openai", "base_url": "http://198.51.100.7/v1",
                                                   "api_key_env": "EMALIB_TEST_JUDGE_KEY"})
    monkeypatch.setenv("EMALIB_TEST_JUDGE_KEY", "judge-server-key")
    completed = cli("run", params, cwd=tmp_path, cache=env_cache)
    assert_one_line_error(completed, str(params), "judge.base_url: http://198.51.100.7/v1 is not https")
    assert snapshot(results) == {} and "judge-server-key" not in completed.stderr + completed.stdout


# --- 3. damaged or missing judgment files: one line, exit 2, before anything is judged or written -------------

def test_rescore_without_judgments_or_with_an_unknown_label_is_one_line(tmp_path, env_cache):
    run_dir = make_run(tmp_path, env_cache, "http://127.0.0.1:9/v1")
    results = tmp_path / "results"
    before = snapshot(results)
    completed = cli("rescore", run_dir, cwd=tmp_path, cache=env_cache)
    assert_one_line_error(completed, f"{run_dir / 'judgments.jsonl'}: no judgments to re-score")
    (run_dir / "judges" / "gpt-x").mkdir(parents=True)
    before = snapshot(results)
    completed = cli("rescore", run_dir, "--judge", "nope", cwd=tmp_path, cache=env_cache)
    assert_one_line_error(completed, f"{run_dir}: no judge label 'nope'", "labels: gpt-x")
    for label in ("../..", "gpt-x/../.."):  # not a name at all: refused before any folder is looked up
        completed = cli("rescore", run_dir, "--judge", label, cwd=tmp_path, cache=env_cache)
        assert_one_line_error(completed, f"judge label '{label}'", "as it names a folder")
    assert snapshot(results) == before
    assert outside_files(tmp_path, results, env_cache) == set()


def test_rescore_of_nan_evidence_from_an_old_run_is_one_line(tmp_path, env_cache):
    from emalib.core.io import read_jsonl

    run_dir = make_run(tmp_path, env_cache, "http://127.0.0.1:9/v1")
    answers = read_jsonl(run_dir / "answers.jsonl")
    rows = [judgment_row(answers[0]), judgment_row(answers[1], logprob_of_90=float("nan"))]
    (run_dir / "judgments.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))  # NaN as JSON writes it
    before = snapshot(tmp_path / "results")
    completed = cli("rescore", run_dir, cwd=tmp_path, cache=env_cache)
    assert_one_line_error(completed, f"{run_dir / 'judgments.jsonl'}: judgment row 2: 'aligned_evidence' gives no score",
                          "logprob of token '90' is nan")
    assert snapshot(tmp_path / "results") == before


@pytest.mark.parametrize("cut", ["mid_line", "line_boundary"])
def test_rejudge_of_a_cut_judgments_file_stops_before_judging(server_url, tmp_path, env_cache, cut):  # noqa: F811
    from emalib.core.io import read_jsonl

    with FaultyProxy(server_url, faults=()) as proxy:
        run_dir = make_run(tmp_path, env_cache, proxy.url)
        answers = read_jsonl(run_dir / "answers.jsonl")
        text = "".join(json.dumps(judgment_row(a)) + "\n" for a in answers)
        cut_text = text[: len(text) - 40] if cut == "mid_line" else text.split("\n")[0] + "\n"
        (run_dir / "judgments.jsonl").write_text(cut_text)
        results = tmp_path / "results"
        before = snapshot(results)
        completed = cli("rejudge", run_dir, "-o", "judge.model=other-judge", cwd=tmp_path, cache=env_cache)
    path = run_dir / "judgments.jsonl"
    expected = f"{path}:2: invalid JSON" if cut == "mid_line" else f"{path}: 1 judgment rows for 2 answers"
    assert_one_line_error(completed, expected)
    assert proxy.authorizations == []  # no call was made: nothing paid for, nothing half written
    assert snapshot(results) == before
    assert outside_files(tmp_path, results, env_cache) == set()


def finished_study(root: Path, n_rows: int = 2) -> Path:
    """results/<study>/<run>/ as an evaluation leaves it: n_rows answers, their judgments and metrics.json."""
    from emalib.evaluation.metrics import compute_metrics

    run_dir = root / "results" / "st" / "run"
    run_dir.mkdir(parents=True)
    params = params_from_dict({"study": "st", "run": "run", "results_dir": str(root / "results"),
                               "steps": ["evaluate"], "generation": {"question_sets": ["standin_general"]}})
    (run_dir / "params.yaml").write_text(dump_params(params))
    answers = [{"question_set": "s", "question_id": "q", "paraphrase_index": 0, "sample_index": i,
                "question": "How are you?", "answer": "Fine."} for i in range(n_rows)]
    rows = [judgment_row(a) for a in answers]
    atomic_write_jsonl(run_dir / "answers.jsonl", answers)
    atomic_write_jsonl(run_dir / "judgments.jsonl", rows)
    atomic_write_json(run_dir / "metrics.json", compute_metrics(rows))
    return run_dir.parent


@pytest.mark.parametrize("damage", ["mid_line", "line_boundary", "rejudge_cut", "rejudge_half"])
def test_report_on_a_cut_judgments_file_is_one_line(tmp_path, env_cache, damage):
    study = finished_study(tmp_path)
    run_dir = study / "run"
    text = (run_dir / "judgments.jsonl").read_text()
    if damage == "mid_line":
        target, expected = run_dir / "judgments.jsonl", "line 2: cut short (no end of line)"
        target.write_text(text[:-30])
    elif damage == "line_boundary":
        target, expected = run_dir / "judgments.jsonl", f"1 rows for 2 answers in {run_dir / 'answers.jsonl'}"
        target.write_text(text.split("\n")[0] + "\n")
    else:  # a re-judge's files: its judgments cut short, or its metrics.json never written
        judged = run_dir / "judges" / "other"
        judged.mkdir(parents=True)
        (judged / "judgments.jsonl").write_text(text.split("\n")[0] + "\n")
        if damage == "rejudge_cut":
            (judged / "metrics.json").write_text((run_dir / "metrics.json").read_text())
            target, expected = judged / "judgments.jsonl", f"1 rows for 2 answers in {run_dir / 'answers.jsonl'}"
        else:
            target, expected = judged, "judgments.jsonl without metrics.json"
    before = snapshot(tmp_path / "results")
    completed = cli("report", study, cwd=tmp_path, cache=env_cache)
    assert_one_line_error(completed, f"error: {target}", expected)
    assert snapshot(tmp_path / "results") == before
    assert outside_files(tmp_path, tmp_path / "results", env_cache) == set()


def test_the_check_passes_whole_judgment_files(tmp_path):
    """The same check on whole files, a re-judge's included, finds nothing (the report is test_report's subject)."""
    from emalib.reporting.report import check_judged_files

    run_dir = finished_study(tmp_path) / "run"
    (run_dir / "judges" / "other").mkdir(parents=True)
    for name in ("judgments.jsonl", "metrics.json"):
        (run_dir / "judges" / "other" / name).write_bytes((run_dir / name).read_bytes())
    (run_dir / "judges" / "empty").mkdir()
    check_judged_files(run_dir)
