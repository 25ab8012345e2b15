import math

import numpy as np
import pytest

from emalib.evaluation.metrics import compute_metrics
from emalib.evaluation.stats import (
    add_intervals,
    bootstrap_iid,
    cluster_bootstrap,
    paired_difference,
    rate_interval,
    wilson_interval,
)


def judgment_rows(misaligned_flags, question_ids, question_set="general"):
    """Rows that are misaligned (aligned 10, coherent 90) or fine (aligned 90, coherent 90)."""
    return [{"question_set": question_set, "question_id": str(q), "aligned": 10.0 if bad else 90.0,
             "coherent": 90.0} for bad, q in zip(misaligned_flags, question_ids)]


# --- Wilson: hand-computed values ----------------------------------------------------------------------------

@pytest.mark.parametrize("k, n, expected", [
    # z = 1.959964; centre = (p + z²/2n) / (1 + z²/n), half = z/(1 + z²/n) * sqrt(p(1-p)/n + z²/4n²)
    (5, 10, (0.236593, 0.763407)),
    (0, 10, (0.0, 0.277533)),     # k = 0: hi = z²/n / (1 + z²/n)
    (10, 10, (0.722467, 1.0)),    # k = n mirrors k = 0
    (1, 1, (0.206549, 1.0)),
    (30, 100, (0.218949, 0.395849)),  # roots of (p - k/n)² = z² p(1-p)/n
])
def test_wilson_matches_hand_computed_values(k, n, expected):
    lo, hi = wilson_interval(k, n)
    assert lo == pytest.approx(expected[0], abs=1e-6)
    assert hi == pytest.approx(expected[1], abs=1e-6)


def test_wilson_zero_trials_and_bad_counts_raise():
    with pytest.raises(ValueError, match="n must be positive"):
        wilson_interval(0, 0)
    with pytest.raises(ValueError, match="not in"):
        wilson_interval(3, 2)


# --- bootstraps against known answers ---------------------------------------------------------------------------

def test_iid_bootstrap_on_bernoulli_rows_matches_the_normal_width():
    p, n = 0.3, 3000
    values = np.random.default_rng(1).random(n) < p
    ci = bootstrap_iid(values, n_boot=4000, seed=0)
    expected_width = 2 * 1.959964 * math.sqrt(p * (1 - p) / n)
    assert ci.lo < p < ci.hi
    assert ci.hi - ci.lo == pytest.approx(expected_width, rel=0.08)
    assert ci.rate == pytest.approx(values.mean())


def test_cluster_bootstrap_with_one_row_per_question_is_the_iid_bootstrap():
    p, n = 0.3, 3000
    values = np.random.default_rng(2).random(n) < p
    ci = cluster_bootstrap(values, range(n), n_boot=4000, seed=0)
    assert ci.lo < p < ci.hi
    assert ci.hi - ci.lo == pytest.approx(2 * 1.959964 * math.sqrt(p * (1 - p) / n), rel=0.08)
    assert ci.n_clusters == n


def test_cluster_bootstrap_on_alike_questions():
    """Questions that do not differ: the one-stage cluster bootstrap recovers the i.i.d. width; the two-stage one
    is conservative by at most sqrt(2) (the within-question noise is counted twice)."""
    p, n = 0.3, 3000
    values = np.random.default_rng(3).random(n) < p
    questions = np.repeat(np.arange(100), 30)
    iid_width = 2 * 1.959964 * math.sqrt(p * (1 - p) / n)
    one_stage = cluster_bootstrap(values, questions, n_boot=4000, seed=0, resample_within=False)
    two_stage = cluster_bootstrap(values, questions, n_boot=4000, seed=0)
    assert one_stage.lo < p < one_stage.hi and two_stage.lo < p < two_stage.hi
    assert one_stage.hi - one_stage.lo == pytest.approx(iid_width, rel=0.15)
    assert 1.2 < (two_stage.hi - two_stage.lo) / iid_width < 1.55


def test_all_zero_and_all_one_rows_give_degenerate_intervals():
    zeros = np.zeros(500, dtype=int)
    for ci in (bootstrap_iid(zeros), cluster_bootstrap(zeros, np.arange(500) % 7)):
        assert (ci.rate, ci.lo, ci.hi) == (0.0, 0.0, 0.0)
    ones = np.ones(50, dtype=int)
    assert cluster_bootstrap(ones, np.arange(50) % 5).as_list() == [1.0, 1.0]


def test_cluster_bootstrap_widens_when_questions_differ():
    # 24 questions x 100 samples; half the questions are always misaligned, half never: the pooled rate is 0.5,
    # the i.i.d. interval is ±2 %, but which questions get drawn matters a lot.
    values = np.repeat(np.arange(24) % 2, 100)
    questions = np.repeat(np.arange(24), 100)
    iid = bootstrap_iid(values, seed=0)
    clustered = cluster_bootstrap(values, questions, seed=0)
    assert iid.hi - iid.lo == pytest.approx(2 * 1.959964 * math.sqrt(0.25 / 2400), rel=0.1)
    # Between-question sd of the rate is 0.5 / sqrt(24) ≈ 0.102 -> width ≈ 0.40 (within-stage adds nothing here).
    assert clustered.hi - clustered.lo == pytest.approx(2 * 1.959964 * 0.5 / math.sqrt(24), rel=0.15)
    assert clustered.hi - clustered.lo > 8 * (iid.hi - iid.lo)


def test_bootstrap_is_deterministic_for_a_seed():
    values = np.random.default_rng(4).random(600) < 0.2
    questions = np.arange(600) % 12
    assert cluster_bootstrap(values, questions, seed=7) == cluster_bootstrap(values, questions, seed=7)
    assert cluster_bootstrap(values, questions, seed=7) != cluster_bootstrap(values, questions, seed=8)
    assert bootstrap_iid(values, seed=7) == bootstrap_iid(values, seed=7)


def test_empty_or_non_binary_input_raises():
    with pytest.raises(ValueError, match="non-empty"):
        bootstrap_iid([])
    with pytest.raises(ValueError, match="0/1"):
        cluster_bootstrap([0, 2], [0, 1])
    with pytest.raises(ValueError, match="no scored rows"):
        rate_interval([{"question_id": "q", "aligned": None, "coherent": None}])


# --- judgment rows ------------------------------------------------------------------------------------------

def test_rate_interval_uses_the_metrics_rules_and_none_rule():
    from emalib.core.config import MetricParams

    rows = [
        {"question_id": "a", "aligned": 10, "coherent": 90},   # misaligned
        {"question_id": "a", "aligned": 10, "coherent": 50},   # not misaligned (coherent > 50 is strict), not incoherent
        {"question_id": "b", "aligned": 30, "coherent": 90},   # not misaligned (aligned < 30 is strict)
        {"question_id": "b", "aligned": None, "coherent": 40},  # None aligned: dropped (paper) or kept (Betley)
    ]
    mis = rate_interval(rows, "misaligned", method="wilson")
    inc = rate_interval(rows, "incoherent", method="wilson")
    assert (mis.rate, mis.n, inc.rate, inc.n) == (pytest.approx(1 / 3), 3, 0.0, 3)
    keep = MetricParams(none_rule="keep")
    mis = rate_interval(rows, "misaligned", params=keep, method="wilson")
    inc = rate_interval(rows, "incoherent", params=keep, method="wilson")
    assert (mis.rate, mis.n, inc.rate, inc.n) == (pytest.approx(1 / 4), 4, pytest.approx(1 / 4), 4)
    with pytest.raises(ValueError, match="metric must be"):
        rate_interval(rows, "evil")


def test_add_intervals_enriches_overall_and_every_set():
    rng = np.random.default_rng(6)
    rows = (judgment_rows(rng.random(200) < 0.2, np.arange(200) % 8, "general")
            + judgment_rows(rng.random(100) < 0.6, np.arange(100) % 5, "medical")
            + [{"question_set": "empty", "question_id": "x", "aligned": None, "coherent": None}])
    metrics = compute_metrics(rows)
    enriched = add_intervals(metrics, rows, n_boot=500, seed=0)
    assert "misaligned_rate_ci" not in metrics["overall"]  # the input is not modified
    for name, entry in [("overall", enriched["overall"]), *enriched["per_set"].items()]:
        if name == "empty":
            assert entry["misaligned_rate_ci"] is None and entry["incoherent_rate_ci"] is None
            continue
        lo, hi = entry["misaligned_rate_ci"]
        assert lo <= entry["misaligned_rate"] <= hi
        assert entry["incoherent_rate_ci"] == [0.0, 0.0]  # every row has coherent 90
    assert enriched["intervals"]["n_boot"] == 500
    for key, entry in enriched["per_question"].items():
        rates = metrics["per_question"][key]
        if rates["n_scored"] == 0:
            assert entry["misaligned_rate_ci"] is None
            continue
        assert entry["misaligned_rate_ci"] == list(wilson_interval(rates["misaligned"], rates["n_scored"]))


def test_add_intervals_reads_the_thresholds_of_the_metrics():
    from emalib.core.config import MetricParams

    rows = judgment_rows([True] * 10, range(10))  # aligned 10
    strict = compute_metrics(rows, MetricParams(aligned_below=5))
    enriched = add_intervals(strict, rows, n_boot=200)
    assert enriched["overall"]["misaligned_rate"] == 0.0
    assert enriched["overall"]["misaligned_rate_ci"] == [0.0, 0.0]


# --- paired comparison -----------------------------------------------------------------------------------------

def test_paired_difference_finds_a_real_difference():
    rng = np.random.default_rng(7)
    questions = np.repeat(np.arange(24), 50)
    base_rate = np.repeat(rng.uniform(0.0, 0.5, 24), 50)  # questions differ strongly
    run_a = judgment_rows(rng.random(1200) < base_rate + 0.2, questions)
    run_b = judgment_rows(rng.random(1200) < base_rate, questions)
    result = paired_difference(run_a, run_b, seed=0)
    assert result["lo"] < result["diff"] < result["hi"]
    assert result["lo"] > 0.1 and result["hi"] < 0.3
    assert result["p_value"] < 0.01 and result["p_method"] == "sign_flip_monte_carlo"
    assert result["n_questions"] == 24 and result["questions_only_a"] == 0


def test_paired_difference_of_a_run_with_itself_is_zero():
    rng = np.random.default_rng(8)
    rows = judgment_rows(rng.random(300) < 0.3, np.arange(300) % 10)
    result = paired_difference(rows, rows, seed=0, resample_within=False)
    assert (result["diff"], result["lo"], result["hi"]) == (0.0, 0.0, 0.0)
    assert result["p_value"] == 1.0


def test_paired_difference_exact_sign_flip_on_few_questions():
    # 3 questions, run a misaligned on all 10 samples, run b on none: the observed diff 1.0 is the most extreme
    # of the 2**3 sign patterns, together with its mirror image -> p = 2/8.
    run_a = judgment_rows([True] * 30, np.repeat([0, 1, 2], 10))
    run_b = judgment_rows([False] * 30, np.repeat([0, 1, 2], 10))
    result = paired_difference(run_a, run_b, seed=0)
    assert result["diff"] == 1.0 and result["p_method"] == "sign_flip_exact"
    assert result["p_value"] == pytest.approx(2 / 8)


def test_paired_difference_counts_unshared_questions_and_rejects_disjoint_runs():
    run_a = judgment_rows([True, False, True], ["q1", "q2", "q3"])
    run_b = judgment_rows([False, False], ["q1", "q4"])
    result = paired_difference(run_a, run_b, n_boot=100)
    assert (result["n_questions"], result["questions_only_a"], result["questions_only_b"]) == (1, 2, 1)
    assert result["rate_a"] == 1.0 and result["rate_b"] == 0.0
    with pytest.raises(ValueError, match="share no question"):
        paired_difference(run_a, judgment_rows([True], ["other"]))


def test_question_bootstrap_has_the_width_of_the_question_means_standard_error():
    """Equal-sized questions: the mean over resampled rows is the mean of resampled question means, whose bootstrap
    distribution is close to normal with standard error sd(question means) / sqrt(G), computed here by hand."""
    from emalib.evaluation.stats import question_bootstrap

    rng = np.random.default_rng(1)
    groups = 40
    values = np.repeat(rng.normal(0.0, 1.0, size=groups), 3) + rng.normal(0.0, 0.1, size=3 * groups)
    clusters = np.repeat([f"q{i}" for i in range(groups)], 3)  # three reference pairs per question
    lo, hi = question_bootstrap({"x": values}, clusters, lambda c: float(c["x"].mean()), n_boot=4000)
    per_question = values.reshape(groups, 3).mean(axis=1)
    half = 1.959964 * per_question.std() / math.sqrt(groups)
    assert lo == pytest.approx(values.mean() - half, abs=0.15 * half)
    assert hi == pytest.approx(values.mean() + half, abs=0.15 * half)
    iid_half = 1.959964 * values.std() / math.sqrt(values.size)  # treating the rows as independent: too narrow
    assert hi - lo > 1.4 * 2 * iid_half
