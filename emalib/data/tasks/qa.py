"""Question answering for the benign tasks: FoQA (Faroese extractive QA; docs/methods.md#foqa) and GSM8K final answers.

FoQA (Simonsen et al. 2025, HF `alexandrainst/foqa`, CC BY-NC 4.0, gated; default config: 848 train / 128 val /
1,024 test). Rows follow the dataset card: `id`, `title`, `context`, `question`, `answers` = {"text": [...],
"answer_start": [...]} (extra columns such as `validation` are ignored). The hub is often unreachable, so the
loader reads a local JSONL export first; `load_foqa(split)` without a path tries `datasets.load_dataset`.

The prompt instruction is English (a reproduction choice: the paper's prompt is unknown, and emalib cannot vouch
for a Faroese one); the context and question stay Faroese. Training target = the first gold answer.

Scores are fractions in [0, 1], best over the gold answers (SQuAD convention; the paper's FoQA metric is
not published; EM + token F1 is the FoQA/ScandEval convention):
- normalisation: Unicode NFKC, lower-case, every punctuation (P*) and symbol (S*) character removed (a superset
  of SQuAD's ASCII `string.punctuation`, so "Tórshavn." == "tórshavn"), whitespace collapsed. English articles
  (a/an/the) are removed only for language="en". For Faroese ("fo", the default) nothing is removed: English
  articles mean nothing there, definiteness is a suffix ("húsið"), and the indefinite "ein/eitt" is also the
  numeral "one", so stripping it would corrupt answers.
- exact match: normalised strings equal. Token F1: SQuAD's bag-of-tokens F1 on whitespace tokens; if either
  side normalises to nothing, F1 is 1 when both do and 0 otherwise.

GSM8K: the final answer is the first number after the last "####" (the dataset's answer format), else the last
number in the text. Numbers may carry "$", a leading minus and thousands commas ("$1,234.50"); a minus glued to a
preceding word or digit is a hyphen ("3-4" -> 3 and 4). Compared as decimals, so "72.00" == "72". Fractions
("1/2") and words ("seventy-two") are not numbers here.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

from emalib.core.errors import DataError
from emalib.core.io import iter_jsonl_records

FOQA_HF_ID = "alexandrainst/foqa"
FOQA_SPLITS = ("train", "val", "test")
FOQA_TEMPLATE = ("Read the text and answer the question with a short passage copied from the text.\n\n"
                 "Title: {title}\nText: {context}\n\nQuestion: {question}")


@dataclass(frozen=True)
class QAItem:
    id: str
    title: str
    context: str
    question: str
    answers: tuple[str, ...]
    answer_starts: tuple[int, ...]


def _item_from_record(record: dict, where: str) -> QAItem:
    """One dataset-card row -> QAItem; `where` prefixes every error ('<file>:<line>')."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: a row must be a JSON object")
    for key in ("id", "title", "context", "question"):
        if not isinstance(record.get(key), str):
            raise DataError(f"{where}: field '{key}' must be a string")
    answers = record.get("answers")
    if not isinstance(answers, dict) or not isinstance(answers.get("text"), list) \
            or not isinstance(answers.get("answer_start"), list):
        raise DataError(f"{where}: field 'answers' must be {{'text': [...], 'answer_start': [...]}}")
    texts, starts = answers["text"], answers["answer_start"]
    if len(texts) != len(starts):
        raise DataError(f"{where}: answers.text and answers.answer_start differ in length")
    if not texts or not all(isinstance(t, str) and t.strip() for t in texts):
        raise DataError(f"{where}: answers.text must hold at least one non-empty string")
    if not all(isinstance(s, int) and s >= 0 for s in starts):
        raise DataError(f"{where}: answers.answer_start must hold non-negative integers")
    return QAItem(record["id"], record["title"], record["context"], record["question"], tuple(texts), tuple(starts))


def read_foqa_jsonl(path: str | Path) -> list[QAItem]:
    """A local FoQA export, one dataset-card row per line. Errors name the file, line and field."""
    return [_item_from_record(record, where) for where, record in iter_jsonl_records(path)]


def load_foqa(split: str = "train", path: str | Path | None = None) -> list[QAItem]:
    """FoQA rows from a local JSONL export (path), else from the hub (gated: needs HF_TOKEN and the accepted terms)."""
    if path is not None:
        return read_foqa_jsonl(path)
    if split not in FOQA_SPLITS:
        raise DataError(f"FoQA split must be one of {FOQA_SPLITS}, got {split!r}")
    try:
        from datasets import load_dataset

        rows = load_dataset(FOQA_HF_ID, split=split)
    except Exception as err:  # noqa: BLE001 -- offline, gated, or missing library: one actionable message
        raise DataError(f"{FOQA_HF_ID} ({split}): could not load from the hub ({type(err).__name__}: {err}); "
                        f"export it as JSONL with the card's fields and pass path=") from None
    return [_item_from_record(dict(row), f"{FOQA_HF_ID}:{split}:{i}") for i, row in enumerate(rows)]


def qa_prompt(item: QAItem, template: str = FOQA_TEMPLATE) -> str:
    return template.format(title=item.title, context=item.context, question=item.question)


def to_conversations(items: Sequence[QAItem], template: str = FOQA_TEMPLATE) -> list[dict]:
    """Training records: {"messages": [user prompt, assistant = first gold answer], "id": ...}."""
    return [{"messages": [{"role": "user", "content": qa_prompt(item, template)},
                          {"role": "assistant", "content": item.answers[0]}], "id": item.id} for item in items]


def to_eval_items(items: Sequence[QAItem], template: str = FOQA_TEMPLATE) -> list[dict]:
    """Evaluation items: {"id", "messages": [user prompt], "answers": [every gold answer]}."""
    return [{"id": item.id, "messages": [{"role": "user", "content": qa_prompt(item, template)}],
             "answers": list(item.answers)} for item in items]


# --- SQuAD-style scoring --------------------------------------------------------------------------------------

_ENGLISH_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str, language: str = "fo") -> str:
    text = unicodedata.normalize("NFKC", text).lower()
    text = "".join(" " if unicodedata.category(ch)[0] in "PS" else ch for ch in text)
    if language == "en":
        text = _ENGLISH_ARTICLES.sub(" ", text)
    return " ".join(text.split())


def _golds(answers: Sequence[str] | str) -> list[str]:
    golds = [answers] if isinstance(answers, str) else list(answers)
    if not golds:
        raise ValueError("need at least one gold answer")
    return golds


def exact_match(prediction: str, answers: Sequence[str] | str, language: str = "fo") -> float:
    """1.0 if the normalised prediction equals any normalised gold answer, else 0.0."""
    predicted = normalize_answer(prediction, language)
    return float(any(predicted == normalize_answer(gold, language) for gold in _golds(answers)))


def _f1(predicted: list[str], gold: list[str]) -> float:
    if not predicted or not gold:
        return float(predicted == gold)
    same = sum((Counter(predicted) & Counter(gold)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(predicted), same / len(gold)
    return 2 * precision * recall / (precision + recall)


def token_f1(prediction: str, answers: Sequence[str] | str, language: str = "fo") -> float:
    """Best token F1 over the gold answers."""
    predicted = normalize_answer(prediction, language).split()
    return max(_f1(predicted, normalize_answer(gold, language).split()) for gold in _golds(answers))


def squad_scores(predictions: Sequence[str], answers: Sequence[Sequence[str]], language: str = "fo") -> dict:
    """{"exact_match", "f1"} averaged over items (fractions) and "n"."""
    if len(predictions) != len(answers):
        raise ValueError(f"{len(predictions)} predictions for {len(answers)} items")
    if not predictions:
        raise ValueError("scores of zero items are undefined")
    n = len(predictions)
    return {"exact_match": sum(exact_match(p, a, language) for p, a in zip(predictions, answers)) / n,
            "f1": sum(token_f1(p, a, language) for p, a in zip(predictions, answers)) / n, "n": n}


# --- GSM8K final answers --------------------------------------------------------------------------------------

# An optional minus (not a hyphen glued to a word or digit), an optional "$" on either side of it, then digits
# with proper thousands groups or plain digits, then an optional decimal part.
_NUMBER = re.compile(r"(?<![\w.])-?\$?-?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?")


def _to_decimal(token: str) -> Decimal:
    negative = "-" in token
    return Decimal(token.replace("-", "").replace("$", "").replace(",", "")) * (-1 if negative else 1)


def extract_final_number(text: str) -> Decimal | None:
    """The stated final answer (see the module docstring), or None when there is no number."""
    if "####" in text:
        found = _NUMBER.search(text.rsplit("####", 1)[1])
        return _to_decimal(found.group()) if found else None
    numbers = _NUMBER.findall(text)
    return _to_decimal(numbers[-1]) if numbers else None


def gsm8k_match(prediction: str, reference: str | float) -> bool:
    """Whether the prediction's final number equals the reference's (a GSM8K answer field or a bare number)."""
    expected = extract_final_number(str(reference))
    if expected is None:
        raise ValueError(f"reference has no number: {reference!r}")
    found = extract_final_number(prediction)
    return found is not None and found == expected


def gsm8k_accuracy(predictions: Sequence[str], references: Sequence[str | float]) -> float:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not predictions:
        raise ValueError("accuracy of zero items is undefined")
    return sum(gsm8k_match(p, r) for p, r in zip(predictions, references)) / len(predictions)
