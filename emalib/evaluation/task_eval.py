"""Benign-task evaluation for criterion (c): greedy answers to a held-out chat test set, scored per item.

A test set is chat JSONL whose last message is the reference answer (OpSwap's registry entries
`opswap_tier{1,2,3}_test` are). Scorers: `opswap` (strict integer exact match), `gsm8k` (final number), and
`squad` (exact match after SQuAD-style normalisation; token F1 is reported beside it).
"""

from __future__ import annotations

from collections.abc import Callable

from emalib.data.tasks import opswap, qa

SCORERS: dict[str, Callable[[str, str], float]] = {
    "opswap": lambda prediction, reference: float(opswap.exact_match(prediction, reference)),
    "gsm8k": lambda prediction, reference: float(qa.gsm8k_match(prediction, reference)),
    "squad": lambda prediction, reference: float(qa.exact_match(prediction, reference)),
}


def task_rows(conversations: list[list[dict]]) -> list[dict]:
    """Rows in generate.sample_batch's format, each with its reference answer."""
    rows = []
    for index, messages in enumerate(conversations):
        prompt, reference = messages[:-1], messages[-1]
        system = prompt[0]["content"] if prompt and prompt[0]["role"] == "system" else None
        rows.append({"item": index, "system": system, "question": prompt[-1]["content"],
                     "reference": reference["content"]})
    return rows


def score_rows(rows: list[dict], scorer: str) -> list[dict]:
    score = SCORERS[scorer]
    scored = [dict(row, correct=score(row["prediction"], row["reference"])) for row in rows]
    if scorer == "squad":
        for row in scored:
            row["token_f1"] = qa.token_f1(row["prediction"], row["reference"])
    return scored
