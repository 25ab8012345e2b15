"""Every figure the report and the quickstart make, rendered from hand-made studies: no two texts cover each other
(tick labels, point labels, legends, notes: their rendered boxes, pairwise), every value with an interval has its
interval bar, runs are named by method and strength in groups (never by folder hash), a far point is clipped with its
value written, and a judge that calls every answer incoherent gets no judged bars, only the reason."""

from __future__ import annotations

import json
import math
from itertools import combinations
from pathlib import Path

import pandas as pd
import pytest
import test_report
from matplotlib.container import ErrorbarContainer
from matplotlib.text import Text
from test_report import CODE, LEGAL, MODEL

from emalib.core.config import dump_params, params_from_dict

hand_study = test_report.hand_study  # the report tests' hand-made study (a fixture), reused


def overlapping_texts(figure) -> list[tuple[str, str]]:
    """Pairs of drawn, non-empty texts whose boxes overlap by more than a pixel (tick labels outside the view, which
    matplotlib does not draw, left out)."""
    figure.canvas.draw()
    renderer = figure.canvas.get_renderer()
    hidden = set()
    for axis in figure.axes:
        for ruler in (axis.xaxis, axis.yaxis):
            low, high = sorted(ruler.get_view_interval())
            for tick in [*ruler.get_major_ticks(), *ruler.get_minor_ticks()]:
                if not low - 1e-9 <= tick.get_loc() <= high + 1e-9:
                    hidden |= {id(tick.label1), id(tick.label2)}
    texts = [t for t in figure.findobj(Text) if t.get_visible() and t.get_text().strip() and id(t) not in hidden]
    boxes = [(t.get_text(), t.get_window_extent(renderer)) for t in texts]
    clashes = []
    for (text_a, a), (text_b, b) in combinations(boxes, 2):
        width = min(a.x1, b.x1) - max(a.x0, b.x0)
        height = min(a.y1, b.y1) - max(a.y0, b.y0)
        if width > 1 and height > 1:
            clashes.append((text_a, text_b))
    return clashes


def interval_bars(axis) -> list[ErrorbarContainer]:
    return [c for c in axis.containers if isinstance(c, ErrorbarContainer)]


def _cells(study: Path):
    from emalib.reporting.cells import run_cells
    from emalib.reporting.frame import planned_cells, results_frame
    from emalib.studies.index import planned_frame, read_index

    return run_cells(results_frame(read_index(study), study)), planned_cells(planned_frame(study))


def test_figure1_labels_do_not_overlap_and_each_point_has_its_interval(hand_study):
    from emalib.reporting.figures import aligned_reference, figure1, tradeoff_points

    cells, planned = _cells(hand_study)
    points = tradeoff_points(cells, planned, MODEL)
    figure = figure1(points, MODEL, reference=aligned_reference(cells, MODEL))
    assert overlapping_texts(figure) == []
    done = points[points["status"] == "done"]
    for axis, column in zip(figure.axes[:2], ("incoherence_change", "narrow_kept")):
        assert len(interval_bars(axis)) == len(done.dropna(subset=["em_reduction", column]))
    # KL at lambda 0.01 ran in code only (general misaligned 0.02, interval +-0.01; no defense 0.0401): the
    # reduction's interval is the formula at the interval's ends.
    kl = points[(points["method"] == "kl") & (points["strength"] == 0.01)].iloc[0]
    none = CODE["none"][0]
    assert (kl["em_reduction_lo"], kl["em_reduction_hi"]) == pytest.approx((100 * (1 - 0.03 / none),
                                                                          100 * (1 - 0.01 / none)))
    # LDIFS: code 1 - 0.10/0.0401, legal 1 - 0.29/0.30, mean -73 %: far left of the rest, drawn at the edge.
    ldifs = 100 * ((1 - CODE["ldifs"][0] / none) + (1 - LEGAL["ldifs"][0] / LEGAL["none"][0])) / 2
    assert points.set_index("method").loc["ldifs", "em_reduction"] == pytest.approx(ldifs)
    left = figure.axes[0].get_xlim()[0]
    assert ldifs < left < 0
    assert any(f"({ldifs:.0f} %, off scale)" in t.get_text() for t in figure.axes[0].texts)
    labels = " ".join(axis.get_xlabel() + axis.get_ylabel() for axis in figure.axes[:2])
    assert "better →" in labels and "↓ better" in labels and "↑ better" in labels


def test_the_judge_free_figure1_has_the_gaps_intervals_and_no_overlaps(hand_study):
    from emalib.reporting.figures import figure1, tradeoff_points

    cells, planned = _cells(hand_study)
    judged = [c for c in cells.columns if c.startswith(("general_", "in_domain_"))]
    cells[judged] = float("nan")  # a study whose judge gave nothing to reduce: the gap still moves
    points = tradeoff_points(cells, planned, MODEL, judge_free=True)
    figure = figure1(points, MODEL, judge_free=True)
    assert overlapping_texts(figure) == []
    # KL at 0.01 (code only): gap -0.8 [-0.9, -0.75], aligned -1.0, no defense -0.5: 1 - 0.2/0.5 = 60 %, its
    # interval from the gap's ends 1 - 0.25/0.5 and 1 - 0.1/0.5.
    kl = points[(points["method"] == "kl") & (points["strength"] == 0.01)].iloc[0]
    assert [kl["em_reduction"], kl["em_reduction_lo"], kl["em_reduction_hi"]] == pytest.approx([60.0, 50.0, 80.0])
    left = figure.axes[0].get_xlim()[0]
    on_scale = points[(points["status"] == "done") & (points["em_reduction"] >= left)]
    assert len(on_scale) < len(points[points["status"] == "done"])  # LDIFS is off scale, its value written
    assert len(interval_bars(figure.axes[0])) == on_scale["em_reduction_lo"].notna().sum()


def test_the_ratio_figure_has_intervals_and_reference_lines_and_no_overlaps(hand_study):
    from emalib.reporting.figures import ratio_figure
    from emalib.reporting.tables import ratio_sweep

    cells, planned = _cells(hand_study)
    sweep = ratio_sweep(cells, planned, MODEL)
    figure = ratio_figure(sweep, {"general_misaligned": 17.0, "general_incoherent": 19.5}, MODEL,
                          aligned={"general_misaligned": 0.05, "general_incoherent": 9.0})
    assert overlapping_texts(figure) == []
    for axis, metric in zip(figure.axes[:2], ("general_misaligned", "general_incoherent")):
        assert len(interval_bars(axis)) == sweep[f"{metric}_lo"].notna().sum()
    legend = [t.get_text() for t in figure.axes[1].get_legend().get_texts()]
    assert "no defense" in legend and "aligned model" in legend
    random_50 = sweep[(sweep["method"] == "interleave") & (sweep["ratio"] == 0.5)].iloc[0]
    assert random_50["general_misaligned_hi"] == pytest.approx(100 * (0.02 / 6 + 0.01))  # both domains' end


def test_the_overview_names_runs_by_method_in_domain_and_task_groups(hand_study):
    from emalib.reporting.overview import overview_figure
    from emalib.reporting.report import collect_metrics, overview_numbers
    from emalib.studies.index import read_index

    numbers = overview_numbers(collect_metrics(hand_study))
    figure = overview_figure(numbers, "hand: every run", "judge: a real one", index=read_index(hand_study))
    assert overlapping_texts(figure) == []
    rows = [t.get_text() for t in figure.axes[0].get_yticklabels()]
    assert not any("__" in row or row.startswith("base-") for row in rows)
    headers = [row for row in rows if row.startswith(("EM: ", "task: "))]
    assert headers == ["EM: code", "EM: legal", "task: foqa", "task: opswap_tier1", "task: opswap_tier2"]
    code = rows[rows.index("EM: code") + 1:rows.index("EM: legal")]
    assert code[:3] == ["Aligned (no fine-tuning)", "No defense", "KL (λ=0.01)"]
    overall = numbers[numbers["question_set"] == "all"]
    gap, _, judged, task = figure.axes[:4]
    assert len(interval_bars(gap)) == overall["loglik_gap_ci_lo"].notna().sum()
    assert len(interval_bars(judged)) == (overall["misaligned_rate_ci_lo"].notna().sum()
                                          + overall["incoherent_rate_ci_lo"].notna().sum())
    assert len(interval_bars(task)) == overall["task_accuracy_ci_lo"].notna().sum()
    # The aligned model's gap (-1.0 in the hand study) as a line down each EM group.
    assert [list(c.get_segments()[0][:, 0]) for c in gap.collections if c.get_label() == "aligned model (base)"] \
        == [[-1.0, -1.0]]


def test_runs_with_one_name_differ_by_seed_else_by_the_axes_they_differ_on_else_by_folder():
    from emalib.reporting.labels import _unique_within_groups

    frame = pd.DataFrame({"run": list("abcdef"), "group": ["EM: code"] * 6, "seed": [0, 1, None, None, None, None],
                          "label": ["No defense", "No defense", "KL (λ=0.1)", "KL (λ=0.1)", "LDIFS", "LDIFS"]})
    axes = pd.DataFrame({"axis.lr": ["x", "x", "low", "high", "same", "same"]}, index=list("abcdef"))
    assert _unique_within_groups(frame, axes) == ["No defense, seed 0", "No defense, seed 1", "KL (λ=0.1), lr=low",
                                                  "KL (λ=0.1), lr=high", "LDIFS, [e]", "LDIFS, [f]"]


@pytest.fixture()
def quickstart_like(tmp_path) -> Path:
    """A quickstart's results: one run and its base evaluation (folder base-<model>-<hash>), judged by the embedded
    toy judge, which calls nearly every answer incoherent."""
    from emalib.runs.results import base_run_name

    study = tmp_path / "quickstart"
    params = params_from_dict({"study": "quickstart", "run": "sft", "model": {"name": "smollm2-135m-instruct"},
                               "train": {"dataset": "standin_em_train"},
                               "generation": {"question_sets": ["standin_general"]},
                               "judge": {"backend": "local", "model": "smollm2-135m-instruct"}}, "quickstart")
    for name, gap, incoherent in (("sft", -0.2, 0.99), (base_run_name(params), -0.5, 1.0)):
        folder = study / name
        folder.mkdir(parents=True)
        (folder / "params.yaml").write_text(dump_params(params))
        rates = {"n": 60, "n_scored": 60, "n_dropped": 0, "misaligned_rate": 0.0, "misaligned_rate_ci": [0.0, 0.06],
                 "incoherent_rate": incoherent, "incoherent_rate_ci": [incoherent - 0.05, 1.0]}
        (folder / "metrics.json").write_text(json.dumps({
            "overall": rates, "per_set": {"standin_general": rates}, "thresholds": {"none_rule": "drop"},
            "judge_free": {"loglik_gap": gap, "kl_to_base": 0.02 if name == "sft" else None,
                           "loglik_gap_ci": [gap - 0.05, gap + 0.05]}}))
    return study


def test_the_quickstart_figure_says_why_a_toy_judges_rates_are_not_drawn(quickstart_like):
    from emalib.reporting.overview import overview_figure
    from emalib.reporting.report import collect_metrics, judge_caveat, judge_note, overview_numbers, report_study
    from emalib.studies.index import read_index

    index = read_index(quickstart_like)
    numbers = overview_numbers(collect_metrics(quickstart_like))
    figure = overview_figure(numbers, "quickstart: every run", judge_note(index), index=index,
                             judge_caveat=judge_caveat(index))
    assert overlapping_texts(figure) == []
    assert [t.get_text() for t in figure.axes[0].get_yticklabels()] == ["EM: standin_em",
                                                                        "Aligned (no fine-tuning)", "No defense"]
    judged = figure.axes[2]
    assert "toy" in judged.get_title(loc="left")
    assert not judged.patches and not interval_bars(judged)  # nothing drawn that the judge cannot tell apart
    assert any("incoherent in every run" in " ".join(t.get_text().split()) for t in judged.texts)
    assert len(interval_bars(figure.axes[0])) == 2
    assert report_study(quickstart_like, paper=False)["png"].is_file()  # the quickstart's own call


def test_judged_rates_are_drawn_when_some_run_is_not_all_incoherent():
    from emalib.reporting.overview import judged_rates_verdict

    assert judged_rates_verdict(pd.DataFrame({"incoherent_rate": [0.97, 1.0]})) is not None
    assert judged_rates_verdict(pd.DataFrame({"incoherent_rate": [0.97, 0.5]})) is None
    assert judged_rates_verdict(pd.DataFrame({"incoherent_rate": [math.nan]})) is None


def test_the_agreement_scatter_and_reward_curves_are_readable():
    from emalib.evaluation.agreement import agreement_figure
    from emalib.training.rl.rewards_log import rewards_figure

    rows = [{"question_set": "general", "question_id": f"q{i}", "paraphrase_index": 0, "sample_index": 0,
             "aligned": 10.0 * i, "coherent": 90.0 - 5 * i} for i in range(10)]
    other = [dict(row, aligned=row["aligned"] + 3, judge_model="gpt-4o-mini", judge_mode="logprobs") for row in rows]
    figure = agreement_figure(rows, other, names=("primary", "gpt"))
    assert overlapping_texts(figure) == []
    names = [figure.axes[0].get_xlabel(), figure.axes[0].get_ylabel()]
    assert names == ["primary judge (model not recorded)", "gpt judge: gpt-4o-mini (logprobs)"]
    assert "None" not in " ".join(names)
    # seaborn's whitegrid style (light grey frame), not bare matplotlib's black one
    assert figure.axes[0].spines["left"].get_edgecolor()[:3] == pytest.approx((0.8, 0.8, 0.8))
    curves = {"grpo_gsm8k": pd.DataFrame({"step": [1, 2, 3], "reward_mean": [0.1, 0.2, 0.3], "reward_std": 0.05})}
    assert overlapping_texts(rewards_figure(curves)) == []


def test_the_comparison_figure_marks_the_aligned_model_on_the_signals_with_intervals_and_no_overlaps():
    from emalib.reporting.comparison_figure import comparison_figure

    rows = []
    for method, label, gap, kl in (("aligned", "Aligned (no fine-tuning)", -0.70, 0.0), ("none", "No defense", -0.56, 0.67),
                                   ("kl", "KL (λ=0.1)", -0.60, 0.40)):
        for metric, value, lo, hi in (("general_misaligned", 1.0, 0.5, 2.0), ("loglik_gap", gap, gap - 0.2, gap + 0.2),
                                      ("kl_to_base", kl, max(0.0, kl - 0.1), kl + 0.1),
                                      ("step_time", None if method == "aligned" else 1.2, None, None)):
            rows.append({"label": label, "method": method, "metric": metric, "value": value, "lo": lo, "hi": hi,
                         "status": "done", "paper": None})
    figure = comparison_figure(pd.DataFrame(rows), "m", "code")
    assert overlapping_texts(figure) == []
    panels = {axis.get_title(): axis for axis in figure.axes}
    for title, aligned in (("log-lik. gap (judge-free)", -0.70), ("KL to base (judge-free)", 0.0)):
        axis = panels[title]
        assert len(interval_bars(axis)) == 1
        lines = [line.get_xdata()[0] for line in axis.get_lines() if line.get_linestyle() == "--"]
        assert lines == [pytest.approx(aligned)]  # the aligned model's value, and nothing else
    # the rate panel starts at 0 and has no reference line
    assert not [line for line in panels["general EM %"].get_lines() if line.get_linestyle() == "--"]
