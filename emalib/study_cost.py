"""What a study will cost in judge calls and dollars, counted from its runs and their question files.

The calls are exact (every answer is judged once per judge prompt of its question); the dollars assume about
1,000 input tokens and 1 output token per call (a judge prompt of ~350 tokens around an answer of up to 600) at
the judge model's list price, half that with the Batch API. GPU time is not estimated here (docs and README give
the paper-scale figures, which this project has not measured).
"""

from __future__ import annotations

from emalib.config import RunParams
from emalib.errors import EmalibError

TOKENS_PER_CALL = 1000
# $ per million input / output tokens, OpenAI list prices of the models the paper and Betley et al. used.
PRICES = {"gpt-4o-mini-2024-07-18": (0.15, 0.60), "gpt-4o-2024-08-06": (2.50, 10.00)}


def judge_calls(params: RunParams) -> int:
    """Judge calls of one evaluation: per question set (trigger probes included), answers (samples x paraphrases)
    x judge prompts, x judge.n_samples for sampled scores (one request per sample)."""
    from emalib.data.questions import load_questions
    from emalib.data.triggers import with_trigger_probes

    total = 0
    for name in with_trigger_probes(params.generation.question_sets, params.generation.trigger_probes):
        questions = load_questions(name)[: params.generation.max_questions]
        for question in questions:
            samples = params.generation.samples_per_question or question.samples_per_paraphrase
            total += samples * len(question.paraphrases) * len(question.judge_prompts)
    return total * (params.judge.n_samples if params.judge.scoring == "sampled" else 1)


def estimate(study) -> dict:
    """{runs, nodes, evaluations, judge_calls, dollars_online, dollars_batch}; calls are None when a question
    file cannot be read here (no data mirror, no network)."""
    evaluating = [n for n in study.nodes.values() if {"evaluate", "evaluate_base"} & set(n.params.steps)]
    summary = {"runs": len(study.runs), "nodes": len(study.nodes), "evaluations": len(evaluating)}
    try:
        calls = sum(judge_calls(n.params) for n in evaluating if n.params.judge.backend == "openai")
    except EmalibError:
        return {**summary, "judge_calls": None, "dollars_online": None, "dollars_batch": None}
    models = {n.params.judge.model for n in evaluating if n.params.judge.backend == "openai"}
    price_in, price_out = max((PRICES.get(m, (float("nan"),) * 2) for m in models), default=(0.0, 0.0))
    dollars = calls * (TOKENS_PER_CALL * price_in + price_out) / 1e6
    return {**summary, "judge_calls": calls, "dollars_online": round(dollars, 2), "dollars_batch": round(dollars / 2, 2)}
