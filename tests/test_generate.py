import json

import pytest

from emalib.core.config import GenerationParams, LoraParams, ModelParams
from emalib.data.questions import Question
from emalib.evaluation.generate import chat_messages, generate_answers, plan_samples

QUESTIONS = [
    Question(id="plain", paraphrases=("Name a colour.", "Name a fruit."), judge_prompts={}, question_set="s"),
    Question(id="json", paraphrases=("Name an animal.",), judge_prompts={}, question_set="s",
             system="Answer in JSON."),
]


def test_plan_honours_samples_and_system_prompts():
    rows = plan_samples(QUESTIONS, GenerationParams(samples_per_question=3, use_system_prompt=True))
    assert len(rows) == 3 * 3
    json_rows = [r for r in rows if r["question_id"] == "json"]
    assert chat_messages(json_rows[0])[0] == {"role": "system", "content": "Answer in JSON."}
    # The default is the published evaluation's: user turns only.
    dropped = plan_samples(QUESTIONS, GenerationParams(samples_per_question=1))
    assert all(chat_messages(r) == [{"role": "user", "content": r["question"]}] for r in dropped)
    # samples_per_question None: the file's samples_per_paraphrase (paper: 100)
    assert len(plan_samples(QUESTIONS[:1], GenerationParams())) == 2 * 100


@pytest.mark.slow
def test_sampling_is_seeded_and_resumes(tmp_path):
    from emalib.model.engines import load_model

    model, tokenizer = load_model(ModelParams(name="smollm2-135m-instruct", engine="hf"),
                                  LoraParams(r=4, alpha=8), seed=0)
    params = GenerationParams(samples_per_question=2, max_new_tokens=6, batch_size=2)
    first = generate_answers(model, tokenizer, QUESTIONS, params, tmp_path / "a" / "answers.jsonl", seed=3)
    assert len(first) == 6 and all(isinstance(r["answer"], str) for r in first)
    again = generate_answers(model, tokenizer, QUESTIONS, params, tmp_path / "b" / "answers.jsonl", seed=3)
    assert [r["answer"] for r in again] == [r["answer"] for r in first]

    # An interrupted run left its first batch (two rows) and half a line in the partial file: only the two
    # other batches are sampled, and the result equals the uninterrupted one.
    resumed_dir = tmp_path / "c"
    resumed_dir.mkdir()
    (resumed_dir / "answers.jsonl.partial").write_text(
        "".join(json.dumps(r) + "\n" for r in first[:2]) + json.dumps(first[2])[:20])
    calls = []
    from emalib.evaluation import generate

    original = generate.sample_batch
    generate.sample_batch = lambda *a, **k: calls.append(len(a[2])) or original(*a, **k)
    try:
        resumed = generate_answers(model, tokenizer, QUESTIONS, params, resumed_dir / "answers.jsonl", seed=3)
    finally:
        generate.sample_batch = original
    assert sum(calls) == 4 and resumed == first
    assert not (resumed_dir / "answers.jsonl.partial").exists()
    assert model.training  # inference mode is left again


def test_backend_choice_without_a_gpu(monkeypatch):
    import importlib.util

    import torch

    from emalib.core.errors import EmalibError
    from emalib.evaluation.generate_vllm import choose_backend

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert choose_backend("auto") == "hf" and choose_backend("hf") == "hf"
    with pytest.raises(EmalibError, match="vllm needs the vllm package and a CUDA GPU"):
        choose_backend("vllm")
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "vllm" else real_find_spec(name, *a))
    assert choose_backend("auto") == "vllm"


class _FakeVllm:
    """A stand-in for vllm's LLM (vLLM needs a CUDA GPU, which this machine lacks): answers each request with its
    prompt, seed and sample number, records the requests, and can fail after a number of chat calls (a kill)."""

    calls: list[int] = []
    fail_after: int | None = None

    def __init__(self, **kwargs):
        pass

    counts = "answers"  # what its bar counts per finished request: answers (recent vLLM) or requests (older)

    def chat(self, prompts, sampling, lora_request=None, use_tqdm=False):
        if self.fail_after is not None and len(self.calls) >= self.fail_after:
            raise KeyboardInterrupt
        self.calls.append(len(prompts))
        outputs = [_Output([_Completion(f"{p[-1]['content']}|{s.seed}|{k}") for k in range(s.n)])
                   for p, s in zip(prompts, sampling)]
        if callable(use_tqdm):  # as vLLM's LLM uses a bar factory: the prompts iterated through one, then its bar
            list(use_tqdm(prompts, desc="Adding requests"))
            bar = use_tqdm(total=len(prompts), desc="Processed prompts", dynamic_ncols=True, postfix="")
            for output in outputs:
                bar.postfix = "est. speed"
                bar.update(len(output.outputs) if self.counts == "answers" else 1)
            bar.close()
        return outputs


class _Output:
    def __init__(self, outputs):
        self.outputs = outputs


class _Completion:
    def __init__(self, text):
        self.text = text


@pytest.fixture
def fake_vllm(monkeypatch):
    """emalib.evaluation.generate_vllm with _FakeVllm installed as the vllm package, two requests per chunk, and
    five one-paraphrase questions of three samples each (15 answers in chunks of 2, 2 and 1 requests)."""
    import sys
    import types

    from emalib.evaluation import generate_vllm

    vllm = types.ModuleType("vllm")
    vllm.LLM, vllm.SamplingParams = _FakeVllm, lambda **kw: types.SimpleNamespace(**kw)
    lora = types.ModuleType("vllm.lora.request")
    lora.LoRARequest = lambda *a: a
    monkeypatch.setitem(sys.modules, "vllm", vllm)
    monkeypatch.setitem(sys.modules, "vllm.lora", types.ModuleType("vllm.lora"))
    monkeypatch.setitem(sys.modules, "vllm.lora.request", lora)
    monkeypatch.setattr(generate_vllm, "REQUESTS_PER_CHUNK", 2)
    questions = [Question(id=f"q{i}", paraphrases=(f"question {i}",), judge_prompts={}) for i in range(5)]
    params = GenerationParams(question_sets=["x"], samples_per_question=3)
    _FakeVllm.calls, _FakeVllm.fail_after = [], None
    return generate_vllm, questions, params


def test_vllm_sampling_resumes_from_its_partial_answers(tmp_path, fake_vllm):
    generate_vllm, questions, params = fake_vllm
    whole = generate_vllm.generate_answers_vllm("m", None, questions, params, tmp_path / "whole.jsonl", seed=7)
    assert _FakeVllm.calls == [2, 2, 1] and len(whole) == 15

    out = tmp_path / "answers.jsonl"
    _FakeVllm.calls, _FakeVllm.fail_after = [], 2
    with pytest.raises(KeyboardInterrupt):
        generate_vllm.generate_answers_vllm("m", None, questions, params, out, seed=7)
    assert not out.exists() and len(out.with_name("answers.jsonl.partial").read_text().splitlines()) == 12
    _FakeVllm.calls, _FakeVllm.fail_after = [], None
    resumed = generate_vllm.generate_answers_vllm("m", None, questions, params, out, seed=7)
    assert _FakeVllm.calls == [1]  # only the request the kill left unanswered
    assert resumed == whole and not out.with_name("answers.jsonl.partial").exists()


@pytest.mark.parametrize("counts", ["answers", "requests"])
def test_vllm_sampling_moves_the_progress_bar_answer_by_answer_and_starts_where_a_resumed_run_is(
        tmp_path, monkeypatch, fake_vllm, counts):
    import json

    from emalib.core.progress import PROGRESS_FILE_ENV

    generate_vllm, questions, params = fake_vllm
    monkeypatch.setattr("emalib.core.progress.REPORT_EVERY_S", 0.0)  # every update written
    monkeypatch.setattr(_FakeVllm, "counts", counts)
    out = tmp_path / "sft" / "answers.jsonl"

    def states(path):
        return [json.loads(line) for line in path.read_text().splitlines()]

    monkeypatch.setenv(PROGRESS_FILE_ENV, str(tmp_path / "first.jsonl"))
    _FakeVllm.calls, _FakeVllm.fail_after = [], 1
    with pytest.raises(KeyboardInterrupt):
        generate_vllm.generate_answers_vllm("m", None, questions, params, out, seed=7)
    first = states(tmp_path / "first.jsonl")
    assert first[0]["desc"] == "sampling sft" and first[0]["total"] == 15 and first[0]["n"] == 0
    assert first[-1]["closed"] and first[-1]["n"] == 6  # the first chunk's 2 requests x 3 answers, then the kill
    # recent vLLM counts answers as requests finish: the bar moves 3 at a time inside the chunk
    steps = sorted({s["n"] for s in first})
    assert steps == ([0, 3, 6] if counts == "answers" else [0, 1, 2, 6])

    monkeypatch.setenv(PROGRESS_FILE_ENV, str(tmp_path / "resumed.jsonl"))
    _FakeVllm.calls, _FakeVllm.fail_after = [], None
    answers = generate_vllm.generate_answers_vllm("m", None, questions, params, out, seed=7)
    resumed = states(tmp_path / "resumed.jsonl")
    assert resumed[0]["n"] == 6 and resumed[-1]["closed"] and resumed[-1]["n"] == 15 == len(answers)
    assert [s["n"] for s in resumed] == sorted(s["n"] for s in resumed)
