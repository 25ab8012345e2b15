import json
from decimal import Decimal

import pytest

from emalib.core.errors import DataError
from emalib.data.chat import validate_messages
from emalib.data.tasks import qa

# Two rows in the dataset card's schema (default config), incl. its extra 'validation' column.
FOQA_ROWS = [
    {"id": "fo-1", "title": "Tórshavn", "validation": "correct",
     "context": "Tórshavn er høvuðsstaður Føroya. Býurin liggur á Streymoy.",
     "question": "Hvar liggur Tórshavn?", "answers": {"text": ["á Streymoy"], "answer_start": [47]}},
    {"id": "fo-2", "title": "Føroyar", "validation": "corrected",
     "context": "Føroyar eru 18 oyggjar í Norðuratlantshavi.",
     "question": "Hvussu nógvar oyggjar eru Føroyar?", "answers": {"text": ["18", "18 oyggjar"],
                                                                "answer_start": [12, 12]}},
]


def write_jsonl(path, rows):
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row, ensure_ascii=False)) + "\n"
                            for row in rows), encoding="utf-8")
    return path


# --- FoQA loading ------------------------------------------------------------------------------------------

def test_foqa_loader_reads_the_card_schema(tmp_path):
    items = qa.load_foqa(path=write_jsonl(tmp_path / "foqa_test.jsonl", FOQA_ROWS))
    assert [item.id for item in items] == ["fo-1", "fo-2"]
    assert items[1].answers == ("18", "18 oyggjar") and items[1].answer_starts == (12, 12)
    first = items[0]
    assert first.context[first.answer_starts[0]:].startswith(first.answers[0])  # the fixture is consistent

    conversations = qa.to_conversations(items)
    user, assistant = conversations[0]["messages"]
    assert validate_messages(conversations[0]["messages"], "x") == conversations[0]["messages"]
    assert first.context in user["content"] and first.question in user["content"]
    assert assistant["content"] == "á Streymoy"
    assert qa.to_conversations(items)[1]["messages"][1]["content"] == "18"  # the first gold answer

    evals = qa.to_eval_items(items)
    assert evals[1]["answers"] == ["18", "18 oyggjar"]
    assert [m["role"] for m in evals[1]["messages"]] == ["user"]


@pytest.mark.parametrize("bad_row, expected", [
    ("{not json", "invalid JSON"),
    ({"id": "x", "title": "t", "context": "c", "answers": {"text": ["a"], "answer_start": [0]}},
     "field 'question' must be a string"),
    ({**FOQA_ROWS[0], "answers": ["á Streymoy"]}, "field 'answers' must be"),
    ({**FOQA_ROWS[0], "answers": {"text": ["a", "b"], "answer_start": [0]}}, "differ in length"),
    ({**FOQA_ROWS[0], "answers": {"text": [], "answer_start": []}}, "at least one non-empty"),
    ({**FOQA_ROWS[0], "answers": {"text": ["a"], "answer_start": [-1]}}, "non-negative"),
])
def test_foqa_loader_names_file_line_and_field(tmp_path, bad_row, expected):
    path = write_jsonl(tmp_path / "bad.jsonl", [FOQA_ROWS[0], bad_row])
    with pytest.raises(DataError) as err:
        qa.read_foqa_jsonl(path)
    assert str(err.value).startswith(f"{path}:2: ") and expected in str(err.value)


def test_foqa_missing_or_empty_file(tmp_path):
    with pytest.raises(DataError, match="data file not found"):
        qa.load_foqa(path=tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match="no records"):
        qa.read_foqa_jsonl(write_jsonl(tmp_path / "empty.jsonl", [""]))
    with pytest.raises(DataError, match="split must be one of"):
        qa.load_foqa(split="validation")


# --- SQuAD-style EM and F1 ---------------------------------------------------------------------------------

@pytest.mark.parametrize("text, language, expected", [
    ("  Tórshavn. ", "fo", "tórshavn"),
    ("Á STREYMOY!", "fo", "á streymoy"),
    ("The Faroe Islands", "fo", "the faroe islands"),   # no English articles stripped for Faroese
    ("The Faroe Islands", "en", "faroe islands"),
    ("an apple, a pear", "en", "apple pear"),
    ("ein bók", "fo", "ein bók"),                       # "ein" is also the numeral: kept
    ("1.000 kr.", "fo", "1 000 kr"),                    # punctuation becomes a token boundary
    ("$5 + 3", "en", "5 3"),                            # symbols go too (SQuAD's string.punctuation)
])
def test_normalize_answer(text, language, expected):
    assert qa.normalize_answer(text, language) == expected


@pytest.mark.parametrize("prediction, golds, em, f1", [
    ("á Streymoy", ["á Streymoy"], 1.0, 1.0),
    ("Á streymoy.", ["á Streymoy"], 1.0, 1.0),
    ("Streymoy", ["á Streymoy"], 0.0, 2 / 3),                # p = 1/1, r = 1/2
    ("liggur á Streymoy", ["á Streymoy"], 0.0, 0.8),         # p = 2/3, r = 2/2
    ("18", ["18", "18 oyggjar"], 1.0, 1.0),                  # best over golds
    ("oyggjar 18", ["18 oyggjar"], 0.0, 1.0),                # F1 is a bag of tokens
    ("Suðuroy", ["á Streymoy"], 0.0, 0.0),
    ("", ["á Streymoy"], 0.0, 0.0),
    ("...", ["!"], 1.0, 1.0),                                # both normalise to nothing
    ("a a b", ["a b b"], 0.0, 2 / 3),                        # counts are clipped: 2 shared of 3 and 3
])
def test_exact_match_and_token_f1(prediction, golds, em, f1):
    assert qa.exact_match(prediction, golds) == em
    assert qa.token_f1(prediction, golds) == pytest.approx(f1)


def test_english_articles_only_matter_in_english():
    assert qa.exact_match("the Tórshavn", ["Tórshavn"], language="en") == 1.0
    assert qa.exact_match("the Tórshavn", ["Tórshavn"], language="fo") == 0.0
    assert qa.token_f1("the Tórshavn", ["Tórshavn"], language="fo") == pytest.approx(2 / 3)


def test_squad_scores_average_and_reject_bad_input():
    scores = qa.squad_scores(["á Streymoy", "Streymoy"], [["á Streymoy"], ["á Streymoy"]])
    assert scores == {"exact_match": 0.5, "f1": pytest.approx((1 + 2 / 3) / 2), "n": 2}
    with pytest.raises(ValueError, match="1 predictions for 2 items"):
        qa.squad_scores(["x"], [["a"], ["b"]])
    with pytest.raises(ValueError, match="at least one gold"):
        qa.exact_match("x", [])


# --- GSM8K final answers -------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nSo 48+24 = <<48+24=72>>72 clips.\n#### 72", "72"),
    ("She pays 3 * 4 = 12 dollars. #### 1,234", "1234"),
    ("#### -3", "-3"),
    ("#### 72 apples, not 5", "72"),                        # first number after the last ####
    ("So the answer is $1,234.50.", "1234.50"),
    ("It costs -$5 in the end", "-5"),
    ("He is 3-4 years older, so 4", "4"),                   # hyphens are not minus signs
    ("Totals: 3,4,5", "5"),                                 # not a thousands group
    ("The answer is 42.", "42"),                            # a full stop is not a decimal point
    ("1,000,000 people", "1000000"),
    ("no number here", None),
    ("#### none", None),
])
def test_extract_final_number(text, expected):
    found = qa.extract_final_number(text)
    assert found == (None if expected is None else Decimal(expected))


@pytest.mark.parametrize("prediction, reference, expected", [
    ("The answer is 72.", "... #### 72", True),
    ("#### 72.00", "#### 72", True),                       # compared as numbers
    ("I think $1,080 in total", "#### 1080", True),
    ("72 or maybe 73", "#### 72", False),                  # the last number counts
    ("", "#### 72", False),
    ("-18", -18, True),
    ("18", -18, False),
])
def test_gsm8k_match(prediction, reference, expected):
    assert qa.gsm8k_match(prediction, reference) is expected


def test_gsm8k_accuracy_and_errors():
    assert qa.gsm8k_accuracy(["#### 1", "2", "three"], ["#### 1", "#### 2", "#### 3"]) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="reference has no number"):
        qa.gsm8k_match("1", "none")
    with pytest.raises(ValueError, match="zero items"):
        qa.gsm8k_accuracy([], [])
