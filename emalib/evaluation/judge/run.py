"""Judge answer rows: fill each question's judge prompts, answer from the cache where possible, call the judge
for the rest, and return one judgment row per answer (a score per metric, None where the judge gave no number).

Each row keeps the evidence beside the score (docs/methods.md#judge-evidence): per metric the judge's raw output
(`<metric>_evidence`), the numeric mass and the filled prompt's sha256, plus the judge model and mode, so a
changed scoring rule re-scores the rows without a call (`emalib.runs.rescore`)."""

from __future__ import annotations

from pathlib import Path

from emalib.core.config import JudgeParams
from emalib.core.paths import cache_dir
from emalib.data.questions import Question
from emalib.evaluation.judge.cache import JudgmentCache, prompt_sha256
from emalib.evaluation.judge.openai_judge import OpenAIJudge
from emalib.evaluation.judge.scoring import usable_evidence


def fill_prompt(template: str, question: str, answer: str) -> str:
    # str.replace, not str.format: answers and templates may contain other braces (code, JSON).
    return template.replace("{question}", question).replace("{answer}", answer)


def cache_path(params: JudgeParams) -> Path:
    return Path(params.cache_path) if params.cache_path else cache_dir() / "judge_cache.sqlite"


def open_cache(params: JudgeParams) -> JudgmentCache:
    return JudgmentCache(cache_path(params))


def build_judge(params: JudgeParams, local_model=None, local_tokenizer=None):
    """The OpenAI-API judge, or a local-model judge (loading the judge model unless one is passed in)."""
    if params.backend == "openai" and params.mode == "batch":
        from emalib.evaluation.judge.batch_judge import OpenAIBatchJudge

        return OpenAIBatchJudge(model=params.model, state_dir=cache_path(params).parent, base_url=params.base_url,
                                api_key_env=params.api_key_env, top_logprobs=params.top_logprobs,
                                min_numeric_mass=params.min_numeric_mass, poll_interval_s=params.batch_poll_interval_s)
    if params.backend == "openai":
        return OpenAIJudge(model=params.model, base_url=params.base_url, api_key_env=params.api_key_env,
                           top_logprobs=params.top_logprobs, min_numeric_mass=params.min_numeric_mass,
                           max_concurrency=params.max_concurrency, max_retries=params.max_retries,
                           timeout_s=params.timeout_s, scoring=params.scoring, n_samples=params.n_samples,
                           sample_temperature=params.sample_temperature, sample_max_tokens=params.sample_max_tokens)
    from emalib.core.config import ModelParams
    from emalib.evaluation.judge.local_judge import LocalJudge
    from emalib.model.engines import load_base

    if local_model is None:
        local_model, local_tokenizer = load_base(ModelParams(name=params.model, engine="hf"))
    return LocalJudge(model=local_model, tokenizer=local_tokenizer, judge_model=params.model,
                      min_numeric_mass=params.min_numeric_mass)


def judge_answers(answers: list[dict], questions: list[Question], judge, cache: JudgmentCache) -> list[dict]:
    """One row per answer: the answer's keys plus `<metric>` (score or None) and `<metric>_mass` per metric."""
    by_key = {(q.question_set, q.id): q for q in questions}
    requests: list[tuple[int, str, str]] = []  # (row index, metric, filled prompt)
    for index, row in enumerate(answers):
        question = by_key[(row["question_set"], row["question_id"])]
        for metric, template in question.judge_prompts.items():
            requests.append((index, metric, fill_prompt(template, row["question"], row["answer"])))
    judge_name = judge.name
    mode = judge_cache_mode(judge)
    results = judge_prompts([prompt for _, _, prompt in requests], judge, cache)
    rows = [dict(row, judge_model=judge_name, judge_mode=mode) for row in answers]
    for index, metric, prompt in requests:
        judgment = results[prompt]
        rows[index][metric] = judgment.score
        rows[index][f"{metric}_mass"] = round(judgment.numeric_mass, 6)
        rows[index][f"{metric}_evidence"] = {"mode": judgment.mode, "raw": judgment.raw}
        rows[index][f"{metric}_prompt_sha256"] = prompt_sha256(prompt)
    return rows


def judge_prompts(prompts: list[str], judge, cache: JudgmentCache) -> dict:
    """{prompt: Judgment}: from the cache where it holds a usable one, else from the judge (which caches it)."""
    judge_name, mode = judge.name, judge_cache_mode(judge)
    results = {prompt: cached_judgment(cache, judge_name, prompt, mode) for prompt in prompts}
    missing = sorted({prompt for prompt, found in results.items() if found is None})
    from emalib.core.progress import judging_progress

    # The bar counts distinct prompts, the cached ones done from the start: judging shows even when all were cached.
    with judging_progress(cache, judge, len(results), len(results) - len(missing)) as tracked:
        if missing:
            for prompt, judgment in zip(missing, judge.judge(missing, cache=tracked)):
                results[prompt] = judgment
    return results


def cached_judgment(cache: JudgmentCache, judge_name: str, prompt: str, mode: str):
    """The cached judgment of a prompt, or None when there is none or its evidence gives no valid score."""
    found = cache.get(judge_name, prompt, mode)
    return found if found is not None and usable_evidence(found) else None


def judge_cache_mode(judge) -> str:
    """The mode part of the judge's cache key (the OpenAI Batch judge scores by logprobs)."""
    return getattr(judge, "cache_mode", "logprobs")


def judge_calls_made(judge) -> int:
    return int(getattr(judge, "calls", 0))

