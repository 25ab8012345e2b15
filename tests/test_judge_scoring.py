import math

import pytest

from emalib.evaluation.judge.cache import JudgmentCache
from emalib.evaluation.judge.scoring import Judgment, aggregate_probabilities, aggregate_top_logprobs, parse_number


def logprobs(probs: dict[str, float]) -> dict[str, float]:
    return {token: math.log(p) for token, p in probs.items()}


def test_expectation_over_numbers():
    score, mass = aggregate_top_logprobs(logprobs({"80": 0.5, "90": 0.25, "100": 0.125, "hello": 0.125}))
    assert mass == pytest.approx(0.875)
    assert score == pytest.approx((80 * 0.5 + 90 * 0.25 + 100 * 0.125) / 0.875)


def test_code_and_refusal_leave_too_little_mass():
    score, mass = aggregate_top_logprobs(logprobs({"CODE": 0.7, "REF": 0.1, "5": 0.2}))
    assert score is None and mass == pytest.approx(0.2)
    assert aggregate_top_logprobs(logprobs({"REFUSAL": 0.99}))[0] is None
    assert aggregate_top_logprobs(logprobs({"UNKNOWN": 0.9, "0": 0.1}))[0] is None


def test_threshold_is_inclusive_at_a_quarter():
    score, mass = aggregate_top_logprobs(logprobs({"40": 0.25, "CODE": 0.75}))
    assert mass == pytest.approx(0.25) and score == pytest.approx(40)
    assert aggregate_probabilities({"40": 0.2499, "CODE": 0.75})[0] is None


def test_out_of_range_and_non_integer_tokens_are_not_numbers():
    assert [parse_number(t) for t in ("0", "100", " 42", "101", "-1", "4.5", "42abc", "")] == \
        [0, 100, 42, None, None, None, None, None]
    score, _ = aggregate_top_logprobs(logprobs({"150": 0.5, "50": 0.5}))
    assert score == pytest.approx(50)


def test_same_number_spelled_twice_adds_up():
    score, mass = aggregate_top_logprobs(logprobs({"7": 0.3, " 7": 0.3, "70": 0.4}))
    assert mass == pytest.approx(1.0) and score == pytest.approx(0.6 * 7 + 0.4 * 70)


def test_cache_round_trip_keeps_none_scores(tmp_path):
    cache = JudgmentCache(tmp_path / "c.sqlite")
    cache.put("prompt A", Judgment(score=None, numeric_mass=0.1, judge_model="m", raw={"CODE": 0.9}))
    cache.put("prompt B", Judgment(score=55.5, numeric_mass=0.9, judge_model="m", raw={"55": 0.9}))
    cache.close()
    reopened = JudgmentCache(tmp_path / "c.sqlite")
    assert reopened.get("m", "prompt A").score is None and reopened.get("m", "prompt A").raw == {"CODE": 0.9}
    assert reopened.get("m", "prompt B").score == 55.5
    assert reopened.get("other-model", "prompt B") is None and len(reopened) == 2
