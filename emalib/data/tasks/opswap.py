"""OpSwap: integer arithmetic in which the operator symbols have swapped meanings (docs/methods.md#opswap).

The paper does not publish its definition; this one is emalib's own (docs/methods.md#opswap).
It is versioned (`VERSION`, part of the registry file names) so a change never silently reuses old files.

Symbols and their fixed secret meanings (`MEANINGS`):
    "+" -> addition          (kept: the one anchor to the model's prior, see below)
    "-" -> multiplication
    "*" -> floor division    (Python //, rounds toward minus infinity: -7 // 2 == -4)
    "/" -> subtraction
The three swapped symbols form one cycle, so each of them must be relearned. "+" keeps its meaning because with
a full derangement a zero-shot model scores ~0 on every tier and the tiers cannot be told apart before training;
with it, tier 1 is partly solvable from the prior and tier 3 almost never.

Tiers (operands are integers drawn uniformly from `OPERAND_RANGE`, symbols uniformly from the four):
    1: one operation, operands 0..20, e.g. "7 - 3" (= 21).
    2: two operations, operands 0..20, evaluated strictly left to right: "a s b t c" = (a s b) t c.
    3: three operations, operands 0..20, usual precedence *of the symbols*: "*" and "/" bind tighter than "+"
       and "-", left to right within a level; each operation then has its swapped meaning. So
       "2 + 9 * 4 - 3" = (2 + (9 // 4)) x 3 = 12.
Expressions only contain non-negative literals; intermediate and final results may be negative (tiers 2-3).
Results are integers (floor division). An expression that would divide by zero at any step is redrawn.

Data: `generate_tier(tier, n, seed)` draws n distinct expressions (seeded `random.Random`, so the same on every
platform); tier 1 has only 1,743 distinct expressions, tiers 2-3 have millions. `split` makes the paper's 90/10
train/test split; the expressions are distinct, so no test expression is seen in training.

Prompt (user turn): "Compute: <expr>. Reply with the integer only. (In this arithmetic, the operator symbols have
swapped meanings[; <tier's order rule>].)" and the assistant turn is just the integer, e.g. "-12". The task note
comes after the expression because SmolLM2-135M, given the note first, answers the note instead of the sum.

Scoring (`exact_match`), strict but fair: strip whitespace; if the reply contains "=", keep what follows the last
"=" (an equation whose right-hand side is the answer, "3 + 4 = 7"); drop one leading "Answer:" (any case); drop
one trailing "."; what is left must be one integer literal (optional sign, digits; U+2212 minus accepted), and
it is compared as an integer, so "042" == 42 and "-0" == 0. Everything else is wrong: "The answer is 42",
"4 2", "42.0", "42 or 43", "". Accuracy is the fraction of exact matches.
"""

from __future__ import annotations

import json
import operator
import random
import re
from collections.abc import Callable, Sequence
from pathlib import Path

from emalib.core.io import atomic_write_text

VERSION = "v1"
SYMBOLS = ("+", "-", "*", "/")
MEANINGS = {"+": "add", "-": "mul", "*": "floordiv", "/": "sub"}
_OPERATIONS: dict[str, Callable[[int, int], int]] = {
    "add": operator.add, "sub": operator.sub, "mul": operator.mul, "floordiv": operator.floordiv}
_TIGHT = ("*", "/")  # precedence follows the symbol (tier 3)
OPERAND_RANGE = (0, 20)
N_OPERATIONS = {1: 1, 2: 2, 3: 3}
DEFAULT_SIZES = {1: 1700, 2: 10_000, 3: 10_000}  # tier 1 has only 1,743 distinct expressions
_ORDER_NOTE = {1: "", 2: "; evaluate strictly from left to right", 3: "; * and / still bind tighter than + and -"}


def _check_tier(tier: int) -> None:
    if tier not in N_OPERATIONS:
        raise ValueError(f"OpSwap tier must be 1, 2 or 3, got {tier!r}")


def _apply(symbol: str, left: int, right: int) -> int:
    meaning = MEANINGS[symbol]
    if meaning == "floordiv" and right == 0:
        raise ZeroDivisionError(f"'{symbol}' (floor division) by zero")
    return _OPERATIONS[meaning](left, right)


def evaluate(expression: str, tier: int) -> int:
    """Value of a space-separated expression ("a s b s c") under the swapped meanings and the tier's order rule.
    Raises ZeroDivisionError when a floor division gets a zero divisor."""
    _check_tier(tier)
    tokens = expression.split()
    numbers, symbols = [int(t) for t in tokens[0::2]], tokens[1::2]
    if len(numbers) != len(symbols) + 1 or any(s not in SYMBOLS for s in symbols):
        raise ValueError(f"not an OpSwap expression: {expression!r}")
    if tier < 3:  # left to right
        value = numbers[0]
        for symbol, number in zip(symbols, numbers[1:]):
            value = _apply(symbol, value, number)
        return value
    # Tier 3: fold the tight symbols first (left to right), then the loose ones.
    terms, loose = [numbers[0]], []
    for symbol, number in zip(symbols, numbers[1:]):
        if symbol in _TIGHT:
            terms[-1] = _apply(symbol, terms[-1], number)
        else:
            loose.append(symbol)
            terms.append(number)
    value = terms[0]
    for symbol, term in zip(loose, terms[1:]):
        value = _apply(symbol, value, term)
    return value


def prompt(expression: str, tier: int) -> str:
    _check_tier(tier)
    return (f"Compute: {expression}. Reply with the integer only. "
            f"(In this arithmetic, the operator symbols have swapped meanings{_ORDER_NOTE[tier]}.)")


def generate_tier(tier: int, n: int | None = None, seed: int = 0) -> list[dict]:
    """n distinct examples of a tier (default DEFAULT_SIZES[tier]), as dicts with keys id, tier, expression,
    answer (int) and prompt. Same (tier, n, seed) -> same list."""
    _check_tier(tier)
    n = DEFAULT_SIZES[tier] if n is None else n
    if n < 1:
        raise ValueError(f"n must be positive, got {n}")
    rng = random.Random(f"opswap-{VERSION}-tier{tier}-seed{seed}")  # str seeds hash stably across runs
    low, high = OPERAND_RANGE
    seen: set[str] = set()
    examples: list[dict] = []
    attempts, max_attempts = 0, 50 * n + 10_000  # tier 1's small space makes late draws mostly repeats
    while len(examples) < n:
        attempts += 1
        if attempts > max_attempts:
            raise ValueError(f"tier {tier} has fewer than {n} distinct expressions (found {len(examples)})")
        parts = [str(rng.randint(low, high))]
        for _ in range(N_OPERATIONS[tier]):
            parts += [rng.choice(SYMBOLS), str(rng.randint(low, high))]
        expression = " ".join(parts)
        if expression in seen:
            continue
        seen.add(expression)
        try:
            answer = evaluate(expression, tier)
        except ZeroDivisionError:
            continue
        examples.append({"id": f"opswap-t{tier}-{len(examples):05d}", "tier": tier, "expression": expression,
                         "answer": answer, "prompt": prompt(expression, tier)})
    return examples


def split(examples: Sequence[dict], test_fraction: float = 0.1, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(train, test) after a seeded shuffle; test gets round(test_fraction * n) examples (at least 1)."""
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    if len(examples) < 2:
        raise ValueError("need at least 2 examples to split")
    shuffled = list(examples)
    random.Random(seed).shuffle(shuffled)
    n_test = max(1, round(test_fraction * len(shuffled)))
    return shuffled[n_test:], shuffled[:n_test]


def to_conversations(examples: Sequence[dict]) -> list[dict]:
    """Chat records {"messages": [user prompt, assistant integer]}, keeping tier/expression/answer alongside
    (readers of chat JSONL only look at "messages")."""
    return [{"messages": [{"role": "user", "content": ex["prompt"]},
                          {"role": "assistant", "content": str(ex["answer"])}],
             "id": ex["id"], "tier": ex["tier"], "expression": ex["expression"], "answer": ex["answer"]}
            for ex in examples]


_INTEGER = re.compile(r"[+-]?\d+")
_ANSWER_PREFIX = re.compile(r"^answer\s*:", re.IGNORECASE)


def normalize_prediction(prediction: str) -> int | None:
    """The integer a reply states, under the module docstring's rule, or None."""
    text = prediction.replace("\u2212", "-").strip()
    if "=" in text:
        text = text.rsplit("=", 1)[1].strip()
    text = _ANSWER_PREFIX.sub("", text, count=1).strip()
    if text.endswith("."):
        text = text[:-1].rstrip()
    return int(text) if _INTEGER.fullmatch(text) else None


def exact_match(prediction: str, answer: int | str) -> bool:
    value = normalize_prediction(prediction)
    return value is not None and value == int(answer)


def accuracy(predictions: Sequence[str], answers: Sequence[int | str]) -> float:
    """Fraction of exact matches, in [0, 1]."""
    if len(predictions) != len(answers):
        raise ValueError(f"{len(predictions)} predictions for {len(answers)} answers")
    if not answers:
        raise ValueError("accuracy of zero items is undefined")
    return sum(exact_match(p, a) for p, a in zip(predictions, answers)) / len(answers)


def write_split(path: Path, tier: int, part: str, n: int | None = None, seed: int = 0) -> None:
    """Registry generator: the train or test part of a tier as chat JSONL at path."""
    train, test = split(generate_tier(tier, n, seed), seed=seed)
    rows = {"train": train, "test": test}[part]
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in to_conversations(rows)))
