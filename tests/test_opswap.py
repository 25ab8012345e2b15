import json

import pytest

from emalib.data.chat import read_chat_jsonl
from emalib.data.registry import REGISTRY, resolve
from emalib.data.tasks import opswap

# --- the definition -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("expression, tier, expected", [
    ("7 + 3", 1, 10),             # "+" keeps its meaning
    ("7 - 3", 1, 21),             # "-" multiplies
    ("7 * 3", 1, 2),              # "*" floor-divides
    ("7 / 3", 1, 4),              # "/" subtracts
    ("3 / 7", 1, -4),
    ("2 + 9 * 4", 2, 2),          # left to right: (2 + 9) // 4 = 2
    ("3 / 5 * 2", 2, -1),         # (3 - 5) // 2 = -1: floor division rounds toward minus infinity
    ("2 + 9 * 4 - 3", 3, 12),     # precedence of the symbols: (2 + (9 // 4)) x 3
    ("2 - 3 / 4 * 2", 3, -2),     # tight symbols first, left to right: (3 - 4) // 2 = -1; then 2 x -1
    ("20 - 20 - 20 - 20", 3, 160000),
])
def test_evaluate_hand_computed(expression, tier, expected):
    assert opswap.evaluate(expression, tier) == expected


def test_division_by_zero_and_bad_input():
    with pytest.raises(ZeroDivisionError):
        opswap.evaluate("5 * 0", 1)
    with pytest.raises(ZeroDivisionError):
        opswap.evaluate("4 + 2 * 0", 3)
    with pytest.raises(ValueError, match="tier"):
        opswap.generate_tier(4, 10)
    with pytest.raises(ValueError, match="not an OpSwap expression"):
        opswap.evaluate("1 ^ 2", 1)


def test_generated_examples_are_consistent_and_distinct():
    for tier in (1, 2, 3):
        examples = opswap.generate_tier(tier, 300, seed=0)
        assert len({ex["expression"] for ex in examples}) == 300
        for ex in examples:
            assert ex["answer"] == opswap.evaluate(ex["expression"], tier)
            assert len(ex["expression"].split()) == 2 * tier + 1
            assert ex["prompt"].startswith(f"Compute: {ex['expression']}.") and "swapped meanings" in ex["prompt"]
            assert all(0 <= int(number) <= 20 for number in ex["expression"].split()[0::2])


def test_generation_is_reproducible_and_seed_dependent():
    assert opswap.generate_tier(2, 200, seed=1) == opswap.generate_tier(2, 200, seed=1)
    assert opswap.generate_tier(2, 200, seed=1) != opswap.generate_tier(2, 200, seed=2)
    # The first n examples do not depend on how many are asked for.
    assert opswap.generate_tier(3, 500, seed=0)[:100] == opswap.generate_tier(3, 100, seed=0)


def test_tier_one_is_small_and_says_so():
    assert len(opswap.generate_tier(1, 1743)) == 1743  # 21 x 21 x 4 minus the 21 divisions by zero
    with pytest.raises(ValueError, match="fewer than 1744 distinct"):
        opswap.generate_tier(1, 1744)


def test_split_is_ninety_ten_disjoint_and_seeded():
    examples = opswap.generate_tier(2, 1000, seed=0)
    train, test = opswap.split(examples, seed=0)
    assert (len(train), len(test)) == (900, 100)
    assert not {ex["expression"] for ex in train} & {ex["expression"] for ex in test}
    assert opswap.split(examples, seed=0) == (train, test)
    assert opswap.split(examples, seed=1)[1] != test


def test_conversations_are_chat_records(tmp_path):
    records = opswap.to_conversations(opswap.generate_tier(3, 5, seed=0))
    for record, ex in zip(records, opswap.generate_tier(3, 5, seed=0)):
        user, assistant = record["messages"]
        assert (user["role"], assistant["role"]) == ("user", "assistant")
        assert assistant["content"] == str(ex["answer"]) and record["answer"] == ex["answer"]
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert len(read_chat_jsonl(path)) == 5


def test_registry_generates_the_tiers(tmp_path, monkeypatch):
    monkeypatch.setenv("EMALIB_CACHE", str(tmp_path))
    for tier in (1, 2, 3):
        assert {f"opswap_tier{tier}_train", f"opswap_tier{tier}_test"} <= set(REGISTRY)
    train = read_chat_jsonl(resolve("opswap_tier1_train"))
    test_path = resolve("opswap_tier1_test")
    assert (len(train), len(read_chat_jsonl(test_path))) == (1530, 170)
    assert opswap.VERSION in str(test_path)
    row = json.loads(test_path.read_text().splitlines()[0])
    assert row["messages"][1]["content"] == str(opswap.evaluate(row["expression"], 1))


# --- exact match ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("prediction, answer, expected", [
    ("42", 42, True),
    (" 42\n", 42, True),
    ("42.", 42, True),
    ("-7", -7, True),
    ("\u22127", -7, True),          # typographic minus
    ("-7", 7, False),
    ("+7", 7, True),
    ("042", 42, True),              # compared as integers
    ("Answer: 42", 42, True),
    ("answer:42.", 42, True),
    ("= 42", 42, True),
    ("7 - 3 = 21", 21, True),       # an equation: its right-hand side is the answer
    ("7 - 3 = 4", 21, False),
    ("The answer is 42", 42, False),
    ("4 2", 42, False),
    ("42.0", 42, False),
    ("42 or 43", 42, False),
    ("", 0, False),
    ("   ", 0, False),
    ("=", 0, False),
    ("42", "42", True),
])
def test_exact_match_edge_cases(prediction, answer, expected):
    assert opswap.exact_match(prediction, answer) is expected


def test_accuracy():
    assert opswap.accuracy(["1", "2.", "x", "4"], [1, 2, 3, 5]) == 0.5
    with pytest.raises(ValueError, match="2 predictions for 1 answers"):
        opswap.accuracy(["1", "2"], [1])
    with pytest.raises(ValueError, match="zero items"):
        opswap.accuracy([], [])


# --- difficulty, measured on the embedded model ---------------------------------------------------------------

@pytest.mark.slow
def test_zero_shot_accuracy_falls_from_tier_one_to_tier_three():
    """SmolLM2-135M-Instruct, greedy, no training: tier 1 is partly solvable from the prior ("+" keeps its
    meaning), tier 3 essentially never (measured at writing: 0.15 vs 0.025 on these 40 items)."""
    from emalib.core.config import GenerationParams, ModelParams
    from emalib.evaluation.generate import inference_mode, sample_batch
    from emalib.model.engines import load_base

    model, tokenizer = load_base(ModelParams(name="smollm2-135m-instruct"))
    params = GenerationParams(temperature=0, max_new_tokens=12)
    accuracies = {}
    for tier in (1, 3):
        items = opswap.split(opswap.generate_tier(tier))[1][:40]
        with inference_mode(model):
            replies = sample_batch(model, tokenizer, [{"question": ex["prompt"]} for ex in items], params, seed=0)
        accuracies[tier] = opswap.accuracy(replies, [ex["answer"] for ex in items])
    assert accuracies[1] > accuracies[3], accuracies
