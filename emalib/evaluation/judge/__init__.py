"""LLM-as-judge: 0-100 scores as the expectation over numbers in the judge's next-token distribution."""

from emalib.evaluation.judge.scoring import Judgment, aggregate_top_logprobs

__all__ = ["Judgment", "aggregate_top_logprobs"]
