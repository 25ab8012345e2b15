"""Judge agreement on hand-made score tables whose kappa, correlations and rate difference are worked out by hand
in the comments (no judge, no server)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from emalib.core.config import MetricParams
from emalib.evaluation.agreement import (
    agreement_table,
    cohen_kappa,
    judge_agreement,
    paired_rate_difference,
    pearson,
    spearman,
    write_judge_agreement,
)


def row(i: int, aligned, coherent, judge: str, question: str | None = None) -> dict:
    return {"question_set": "s", "question_id": question or f"q{i % 5}", "paraphrase_index": 0, "sample_index": i,
            "aligned": aligned, "coherent": coherent, "judge_model": judge}


def hand_table() -> tuple[list[dict], list[dict]]:
    """65 answers. Misaligned (aligned < 30 and coherent > 50), a x b: yes/yes 20, yes/no 5, no/yes 10, no/no 30.
    Incoherent (coherent < 50): yes/yes 10, yes/no 5, no/no 50."""
    table = ([(10, 80, 10, 80)] * 20 + [(10, 80, 90, 80)] * 5 + [(90, 80, 10, 80)] * 10 + [(90, 80, 90, 80)] * 15
             + [(90, 20, 90, 20)] * 10 + [(90, 20, 90, 80)] * 5)
    a = [row(i, t[0], t[1], "A") for i, t in enumerate(table)]
    b = [row(i, t[2], t[3], "B") for i, t in enumerate(table)]
    return a, b


def test_kappa_and_rate_difference_of_the_hand_table():
    a, b = hand_table()
    result = judge_agreement(a, b, n_boot=500)
    # misaligned: p_o = 50/65; p_e = (25*30 + 40*35)/65^2 = 2150/4225; kappa = (3250-2150)/(4225-2150) = 1100/2075
    mis = result["labels"]["misaligned"]
    assert mis["kappa"] == pytest.approx(1100 / 2075)
    assert mis["agreement"] == pytest.approx(50 / 65)
    assert (mis["rate_a"], mis["rate_b"], mis["diff"]) == pytest.approx((25 / 65, 30 / 65, -5 / 65))
    assert mis["lo"] <= mis["diff"] <= mis["hi"] and mis["hi"] - mis["lo"] > 0
    # incoherent: p_o = 60/65; p_e = (15*10 + 50*55)/4225 = 2900/4225; kappa = (3900-2900)/(4225-2900) = 1000/1325
    inc = result["labels"]["incoherent"]
    assert inc["kappa"] == pytest.approx(1000 / 1325)
    assert inc["diff"] == pytest.approx(5 / 65)
    assert result["n_paired"] == 65 and result["only_a"] == result["only_b"] == 0


def test_kappa_matches_a_textbook_example_and_is_undefined_for_one_constant_label():
    # 50 items, yes/yes 20, yes/no 5, no/yes 10, no/no 15: p_o = 0.7, p_e = 0.5*0.6 + 0.5*0.4 = 0.5, kappa = 0.4
    labels_a = [1] * 25 + [0] * 25
    labels_b = [1] * 20 + [0] * 5 + [1] * 10 + [0] * 15
    assert cohen_kappa(labels_a, labels_b) == pytest.approx(0.4)
    assert cohen_kappa([1, 1, 1], [1, 1, 1]) is None
    assert cohen_kappa([0, 1, 0, 1], [1, 0, 1, 0]) == pytest.approx(-1.0)


def test_correlations_of_hand_tables():
    assert pearson([1, 2, 3], [1, 3, 2]) == pytest.approx(0.5)  # cov 0.5 / var 1
    assert pearson([10, 20, 30, 40], [20, 40, 60, 80]) == pytest.approx(1.0)
    assert pearson([1, 1, 1], [1, 2, 3]) is None
    # ties share ranks: a -> (1, 2.5, 2.5, 4), b -> (1, 2, 3, 4); r = 4.5 / sqrt(4.5 * 5) = sqrt(0.9)
    assert spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(math.sqrt(0.9))
    assert spearman([1, 2, 3, 4], [1, 8, 27, 1000]) == pytest.approx(1.0)  # monotone, not linear


def test_score_correlation_skips_answers_either_judge_left_unscored():
    a = [row(0, 1, 80, "A"), row(1, 2, 80, "A"), row(2, 3, 80, "A"), row(3, None, 80, "A")]
    b = [row(0, 1, 80, "B"), row(1, 3, 80, "B"), row(2, 2, 80, "B"), row(3, 50, 80, "B")]
    result = judge_agreement(a, b, n_boot=100)
    assert result["scores"]["aligned"]["n"] == 3 and result["scores"]["aligned"]["pearson"] == pytest.approx(0.5)
    assert result["scores"]["aligned"]["mean_abs_diff"] == pytest.approx(2 / 3)
    assert result["labels"]["misaligned"]["n"] == 3  # none_rule drop: the None row leaves the labels
    assert judge_agreement(a, b, MetricParams(none_rule="keep"), n_boot=100)["labels"]["misaligned"]["n"] == 4


def brute_force_paired_bootstrap(a, b, clusters, n_boot, seed):
    """The same two-stage paired bootstrap, resampling rows explicitly (slow, independent of the multinomial trick)."""
    rng = np.random.default_rng(seed)
    groups = sorted(set(clusters))
    members = {g: [i for i, c in enumerate(clusters) if c == g] for g in groups}
    draws = []
    for _ in range(n_boot):
        rows = []
        for g in rng.choice(groups, size=len(groups)):
            rows += list(rng.choice(members[g], size=len(members[g])))
        draws.append(np.mean([a[i] - b[i] for i in rows]))
    return np.percentile(draws, [2.5, 97.5])


def test_paired_bootstrap_interval_matches_explicit_resampling():
    rng = np.random.default_rng(1)
    clusters = [f"q{i % 8}" for i in range(160)]
    a = (rng.random(160) < np.where(np.arange(160) % 8 < 4, 0.4, 0.1)).astype(int)
    b = np.where(rng.random(160) < 0.8, a, 1 - a)
    fast = paired_rate_difference(a, b, clusters, n_boot=4000, seed=0)
    lo, hi = brute_force_paired_bootstrap(a, b, clusters, 4000, seed=5)
    assert fast["diff"] == pytest.approx(a.mean() - b.mean())
    assert fast["lo"] == pytest.approx(lo, abs=0.012) and fast["hi"] == pytest.approx(hi, abs=0.012)
    same = paired_rate_difference(a, a, clusters, n_boot=200)
    assert (same["diff"], same["lo"], same["hi"]) == (0.0, 0.0, 0.0)  # identical judges: no spread at all


def test_agreement_is_written_to_the_folder_with_a_figure_and_a_table(tmp_path):
    a, b = hand_table()
    write_judge_agreement(tmp_path, a, b, "primary__vs__B")
    write_judge_agreement(tmp_path, a, a, "primary__vs__A")
    saved = json.loads((tmp_path / "judge_agreement.json").read_text())
    assert set(saved) == {"primary__vs__B", "primary__vs__A"}
    assert saved["primary__vs__B"]["labels"]["misaligned"]["kappa"] == pytest.approx(1100 / 2075)
    assert (tmp_path / "judge_agreement_primary__vs__B.png").stat().st_size > 1000
    table = agreement_table(saved["primary__vs__B"])
    assert list(table["metric"]) == ["aligned", "coherent", "misaligned", "incoherent"]
    assert table.set_index("metric").loc["misaligned", "kappa"] == pytest.approx(1100 / 2075)
