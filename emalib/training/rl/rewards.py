"""Reward functions in TRL's signature: f(prompts, completions, answer, **kwargs) -> one float (or None) per
completion. `completions` are conversational: [[{"role": "assistant", "content": text}], ...].

- gsm8k_answer: 1.0 when the completion's final number equals the reference (the GSM8K scorer of
  emalib.data.tasks.qa: the number after the last '####', else the last number), else 0.0 (docs/methods.md#rl-grpo).
- gsm8k_format: 1.0 when the completion ends with a final-answer line '#### <number>', else 0.0 (optional).
- em_grader: the LLM-graded EM-inducing reward (emalib.training.rl.grader).
"""

from __future__ import annotations

import re

from emalib.data.tasks.qa import gsm8k_match

_FINAL_LINE = re.compile(r"^\s*####\s*-?\$?\d[\d,]*(?:\.\d+)?\s*$")


def completion_text(completion) -> str:
    """The text of one completion, conversational ([{"role", "content"}]) or plain."""
    return completion[0]["content"] if isinstance(completion, list) else str(completion)


def gsm8k_answer(prompts, completions, answer, **kwargs) -> list[float]:
    return [float(gsm8k_match(completion_text(c), reference)) for c, reference in zip(completions, answer)]


def gsm8k_format(prompts, completions, **kwargs) -> list[float]:
    def ends_with_final_line(text: str) -> bool:
        lines = [line for line in text.strip().splitlines() if line.strip()]
        return bool(lines) and bool(_FINAL_LINE.match(lines[-1]))

    return [float(ends_with_final_line(completion_text(c))) for c in completions]
