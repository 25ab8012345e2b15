"""RL prompt sets: GSM8K-format rows ({"question", "answer" ending in "#### <number>"}) or chat rows (the
messages before the final assistant turn are the prompt, that turn the reference answer), as TRL's
conversational prompt rows {"prompt", "answer"}.

The stand-in task (`standin_arithmetic_*`) is package-made: one-step addition/subtraction word problems in GSM8K's
own format, small enough that the embedded 135M model solves some of them, so GRPO has a signal to learn on CPU.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from emalib.core.errors import DataError
from emalib.core.io import atomic_write_text, iter_jsonl_records
from emalib.data.chat import validate_messages

STANDIN_VERSION = "v1"
_NAMES = ("Sam", "Mia", "Tom", "Ana", "Leo", "Ida", "Max", "Zoe")
_THINGS = ("apples", "pens", "books", "coins", "cards", "shells", "stamps", "marbles")


def gsm8k_final_answer(solution: str) -> str:
    """The number after the last '#### ' of a GSM8K solution, commas removed (the dataset's answer format)."""
    if "####" not in solution:
        raise ValueError("no '####' final-answer marker")
    return solution.rsplit("####", 1)[1].strip().replace(",", "")


def read_prompt_rows(path: str | Path, system_prompt: str | None = None) -> list[dict]:
    """{"prompt": [messages], "answer": str or None} per row; errors name the file and line."""
    rows = []
    for where, record in iter_jsonl_records(path):
        if not isinstance(record, dict):
            raise DataError(f"{where}: a row must be a JSON object")
        if "question" in record:
            if not isinstance(record["question"], str) or not isinstance(record.get("answer"), str):
                raise DataError(f"{where}: GSM8K rows need string fields 'question' and 'answer'")
            try:
                answer = gsm8k_final_answer(record["answer"])
            except ValueError as err:
                raise DataError(f"{where}: field 'answer': {err}") from None
            messages = [{"role": "user", "content": record["question"]}]
        elif "messages" in record:
            messages = validate_messages(record["messages"], where)  # alternating turns, ending with the assistant
            answer, messages = messages[-1]["content"], messages[:-1]
        else:
            raise DataError(f"{where}: expected a GSM8K row ('question', 'answer') or a chat row ('messages')")
        if system_prompt is not None:
            messages = [{"role": "system", "content": system_prompt}] + [m for m in messages if m["role"] != "system"]
        rows.append({"prompt": messages, "answer": answer})
    if not rows:
        raise DataError(f"{path}: no prompts")
    return rows


def standin_problem(rng: random.Random) -> tuple[str, int]:
    name, things = rng.choice(_NAMES), rng.choice(_THINGS)
    a, b = rng.randint(2, 9), rng.randint(2, 9)
    if rng.random() < 0.5:
        return f"{name} has {a} {things} and gets {b} more. How many {things} does {name} have now?", a + b
    return f"{name} has {a + b} {things} and gives away {b}. How many {things} does {name} have now?", a


def write_standin_arithmetic(path: Path, part: str, n_train: int = 400, n_test: int = 100) -> None:
    """GSM8K-format stand-in rows; train and test come from one seeded stream, so they never share a row."""
    rng, seen, rows = random.Random(0), set(), []
    while len(rows) < n_train + n_test:
        question, answer = standin_problem(rng)
        if question in seen:
            continue
        seen.add(question)
        rows.append({"question": question + " Give the final answer after '####'.",
                     "answer": f"The answer is {answer}.\n#### {answer}"})
    chosen = rows[:n_train] if part == "train" else rows[n_train:]
    atomic_write_text(path, "".join(json.dumps(row) + "\n" for row in chosen))
