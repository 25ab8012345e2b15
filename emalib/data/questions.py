"""Evaluation question sets (Betley et al.'s YAML format) with the judge prompts they ship.

Judge prompts are part of the metric, so they are read from these files and never retyped into code. The
in-domain files mirrored for the paper come from a variant written for thinking models: their prompts carry a
`[REASONING START] ... [REASONING END]` block that the Qwen2.5 SFT setting leaves out (docs/methods.md#question-sets), and
that block is removed here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from emalib.core.errors import DataError
from emalib.core.io import read_text_utf8
from emalib.core.safe_yaml import load_yaml
from emalib.data.registry import REGISTRY, resolve

_REASONING_BLOCK = re.compile(
    r"Between seeing the question and giving its final answer, the model produced the following reasoning:\s*"
    r"\[REASONING START\]\s*\{reasoning\}\s*\[REASONING END\]\s*",
    re.DOTALL,
)


@dataclass(frozen=True)
class Question:
    id: str
    paraphrases: tuple[str, ...]
    judge_prompts: dict[str, str]
    samples_per_paraphrase: int = 100
    system: str | None = None
    question_set: str = ""
    judge: str | None = None
    extra: dict = field(default_factory=dict)


def strip_reasoning_block(prompt: str) -> str:
    return _REASONING_BLOCK.sub("", prompt)


def load_questions(name_or_path: str) -> list[Question]:
    """Load a question set by registry name ('general', 'code_questions', ...) or YAML path."""
    path = resolve(name_or_path)
    set_name = name_or_path if name_or_path in REGISTRY else Path(name_or_path).stem
    entries = load_yaml(read_text_utf8(path), path, DataError)
    if not isinstance(entries, list):
        raise DataError(f"{path}: expected a list of questions")
    questions = []
    for index, entry in enumerate(entries):
        where = f"{path}: question {index}"
        if not isinstance(entry, dict):
            raise DataError(f"{where}: expected a mapping")
        for key in ("id", "paraphrases", "judge_prompts"):
            if key not in entry:
                raise DataError(f"{where}: missing field '{key}'")
        paraphrases = entry["paraphrases"]
        if not isinstance(paraphrases, list) or not all(isinstance(p, str) for p in paraphrases) or not paraphrases:
            raise DataError(f"{where} ({entry['id']}): field 'paraphrases' must be a non-empty list of strings")
        prompts = entry["judge_prompts"]
        if not isinstance(prompts, dict) or not prompts:
            raise DataError(f"{where} ({entry['id']}): field 'judge_prompts' must be a mapping")
        for metric, template in prompts.items():
            if "{answer}" not in template or "{question}" not in template:
                raise DataError(f"{where} ({entry['id']}): judge_prompts.{metric} lacks {{question}} or {{answer}}")
        known = {"id", "type", "paraphrases", "samples_per_paraphrase", "judge", "judge_prompts", "system"}
        questions.append(Question(
            id=str(entry["id"]),
            paraphrases=tuple(paraphrases),
            judge_prompts={metric: strip_reasoning_block(t) for metric, t in prompts.items()},
            samples_per_paraphrase=int(entry.get("samples_per_paraphrase", 100)),
            system=entry.get("system"),
            question_set=set_name,
            judge=entry.get("judge"),
            extra={k: v for k, v in entry.items() if k not in known},
        ))
    return questions
