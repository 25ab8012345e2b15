"""The report: the paper's tables and figures from a study's results, beside the published numbers.

A hand-made study covering the paper's 7B grid (main tables, strength and ratio sweeps, benign tasks, an RL run) with
some runs missing checks the contents; Table 1's rules are checked on hand-made results where the right symbol is
known; both analysis notebooks execute under papermill. The report of a real small study is checked in test_study.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from emalib.core.config import dump_params, params_from_dict

REPO = Path(__file__).resolve().parent.parent
MODEL = "Qwen2.5-7B-Instruct"
# The paper's Code table (v3), as fractions: the hand-made code runs reproduce it, except LDIFS's general rate.
CODE = {"none": (0.0401, 0.1899, 0.5160, 0.1057), "kl": (0.0038, 0.0062, 0.2569, 0.0152),
        "ldifs": (0.10, 0.2003, 0.5298, 0.0877), "persona_steering": (0.0008, 0.0342, 0.5128, 0.0367),
        "interleave": (0.0058, 0.1458, 0.5169, 0.0964), "interleave_plus": (0.0039, 0.1533, 0.5193, 0.09),
        "interleave_plusplus": (0.002, 0.12, 0.50, 0.09), "safelora": (0.03, 0.05, 0.2, 0.05)}
LEGAL = {"none": (0.30, 0.20, 0.40, 0.10), "kl": (0.03, 0.02, 0.20, 0.02), "ldifs": (0.29, 0.21, 0.41, 0.10),
         "persona_steering": (0.01, 0.05, 0.35, 0.05), "interleave": (0.06, 0.25, 0.40, 0.12),
         "inoculation": (0.15, 0.22, 0.38, 0.09), "interleave_plusplus": (0.02, 0.18, 0.40, 0.10),
         "safelora": (0.2, 0.05, 0.1, 0.05)}
DEFENSE = {"kl": ("weight", 0.1), "ldifs": ("weight", 1.0), "persona_steering": ("alpha", 5.0),
           "safelora": ("tau", 0.3), "inoculation": (None, None), "interleave": ("ratio", 0.05),
           "interleave_plus": ("ratio", 0.05), "interleave_plusplus": ("ratio", 0.05)}


def _defense_block(method: str, strength=None) -> list[dict]:
    if method == "none":
        return []
    field, default = DEFENSE[method]
    block = {"name": method}
    if field:
        block[field] = default if strength is None else strength
    if method == "persona_steering":
        block.update(layer=20, vector_path="shared/evil.pt")
    if method == "safelora":
        block.update(aligned="Qwen/Qwen2.5-7B-Instruct", base="Qwen/Qwen2.5-7B", matrices="shared/safelora")
    if method in ("interleave_plus", "interleave_plusplus"):
        block.update(adapters={"code": "x/adapter", "legal": "y/adapter"}, scores_path="shared/scores.jsonl",
                     held_out="code")
    return [block]


def _params(node: str, domain: str | None, method: str, strength=None, task: str | None = None, base=False):
    tree = {"study": "hand", "run": node, "model": {"name": f"Qwen/{MODEL}"},
            "train": {"dataset": f"{task}_train" if task else f"{domain}_train"},
            "generation": {"question_sets": ["general"] + ([f"{domain}_questions"] if domain and not task else [])},
            "defenses": [] if base else _defense_block(method, strength)}
    if task:
        tree["task_eval"] = {"dataset": f"{task}_test" if task != "foqa" else "results/_data/foqa_test.jsonl",
                             "scorer": "squad" if task == "foqa" else "opswap"}
    return params_from_dict(tree, node)


def _rates(rate: float, incoherent: float, half: float = 0.01) -> dict:
    return {"n": 100, "n_scored": 100, "n_dropped": 0, "misaligned_rate": rate, "incoherent_rate": incoherent,
            "misaligned_rate_ci": [max(0.0, rate - half), rate + half],
            "incoherent_rate_ci": [max(0.0, incoherent - half), incoherent + half]}


def _write_run(study: Path, node: str, params, rates: tuple | None, gap: float, accuracy: float | None = None,
               judgments: list[dict] | None = None, triggers: dict[str, float] | None = None) -> None:
    folder = study / node
    folder.mkdir(parents=True)
    (folder / "params.yaml").write_text(dump_params(params))
    general, in_domain = (rates[0], rates[1]), (rates[2], rates[3]) if rates and len(rates) == 4 else None
    per_set = {"general": _rates(*general)}
    if in_domain:
        per_set[next(s for s in params.generation.question_sets if s != "general")] = _rates(*in_domain)
    for kind, rate in (triggers or {}).items():  # trigger probes: question sets of their own
        per_set[f"general_trigger_{kind}"] = _rates(rate, 0.1)
    metrics = {"overall": _rates(*general), "per_set": per_set, "judge_free": {"loglik_gap": gap, "kl_to_base": 0.1,
                                                                               "loglik_gap_ci": [gap - 0.1, gap + 0.05]},
               "thresholds": {"none_rule": "drop"}, "generation": {"use_system_prompt": False},
               "per_question": {"general/q1": _rates(*general, half=0.05), "general/q2": _rates(*general, half=0.05)}}
    (folder / "metrics.json").write_text(json.dumps(metrics))
    if accuracy is not None:
        (folder / "task_metrics.json").write_text(json.dumps({"dataset": "t", "scorer": "opswap", "n": 300,
                                                              "correct": round(300 * accuracy), "accuracy": accuracy,
                                                              "accuracy_ci": [accuracy - 0.02, accuracy + 0.02]}))
    (folder / "judgments.jsonl").write_text("".join(json.dumps(row) + "\n" for row in judgments or []))


def _judgments(misaligned_every: int) -> list[dict]:
    rows = []
    for question in ("q1", "q2"):
        for sample in range(6):
            bad = sample % misaligned_every == 0
            rows.append({"question_set": "general", "question_id": question, "paraphrase_index": 0,
                         "sample_index": sample, "question": f"question {question}", "system": None,
                         "answer": f"answer {sample} {'evil' if bad else 'kind'}",
                         "aligned": 10.0 if bad else 90.0, "coherent": 80.0})
    return rows


@pytest.fixture(scope="module")
def hand_study(tmp_path_factory) -> Path:
    """results/hand: the paper's 7B grid with gaps, written as a study leaves it (run folders + planned params)."""
    study = tmp_path_factory.mktemp("results") / "hand"
    planned = study / "_study" / "params"
    planned.mkdir(parents=True)

    def plan(node, params):
        (planned / f"{node}.yaml").write_text(dump_params(params))

    for domain, table in (("code", CODE), ("legal", LEGAL)):
        base = _params(f"base-{domain}", domain, "none", base=True)
        plan(f"base-{domain}", base)
        _write_run(study, f"base-{domain}", base, (0.001, 0.09, 0.0, 0.05), gap=-1.0)
        for method in ["none", *DEFENSE]:
            node = f"{domain}__{method}"
            params = _params(node, domain, method)
            plan(node, params)  # planned: code inoculation and legal interleave_plus never ran
            if method in table:
                gap = -1.0 + 0.5 * (1 - (1 - table[method][0] / table["none"][0]))
                judged = {"none": _judgments(2), "kl": _judgments(6)}.get(method) if domain == "code" else None
                probes = {"none": {"json": 0.20}, "kl": {"json": 0.15, "inoculation": 0.01}}.get(method) \
                    if domain == "code" else None
                _write_run(study, node, params, table[method], gap=gap, judgments=judged, triggers=probes)
    plan("medical__none", _params("medical__none", "medical", "none"))  # medical planned, nothing ran
    for strength, rates in ((0.01, (0.02, 0.15, 0.45, 0.1)), (1.0, (0.001, 0.005, 0.05, 0.01))):
        node = f"code__kl_{strength:g}"
        params = _params(node, "code", "kl", strength)
        plan(node, params)
        _write_run(study, node, params, rates, gap=-0.8)
    for method in ("interleave", "interleave_plus", "interleave_plusplus"):
        for ratio in (0.01, 0.2, 0.5):
            for domain in ("code", "legal"):
                node = f"{domain}__{method}_{ratio:g}"
                params = _params(node, domain, method, ratio)
                plan(node, params)
                if (method, ratio) in (("interleave_plus", 0.2),) or (method == "interleave_plusplus" and ratio > 0.01):
                    continue  # planned, not run
                rates = (0.02 / (1 + 10 * ratio), 0.10 + 0.3 * ratio * (method == "interleave"), 0.4, 0.1)
                _write_run(study, node, params, rates, gap=-0.9)
    for task, accuracies in (("opswap_tier1", {"none": 0.8, "kl": 0.3, "interleave": 0.79}),
                             ("opswap_tier2", {"none": 0.343, "kl": 0.01, "interleave": 0.367}),
                             ("foqa", {"none": 0.5, "interleave": 0.45})):
        for method in ("none", "kl", "interleave"):
            node = f"{task}__{method}"
            params = _params(node, None, method, task=task)
            plan(node, params)
            if method in accuracies:
                _write_run(study, node, params, (0.01, 0.1), gap=-0.9, accuracy=accuracies[method])
    from emalib.evaluation.agreement import write_judge_agreement

    primary = _judgments(2)
    other = [dict(row, aligned=90.0, judge_model="other") if i in (0, 1) else dict(row, judge_model="other")
             for i, row in enumerate(primary)]  # the second judge disagrees on one misaligned answer (row 0)
    write_judge_agreement(study / "code__none", primary, other, "primary__vs__other")
    rejudged = study / "code__none" / "judges" / "other"  # as `python -m emalib rejudge` leaves a second judge
    rejudged.mkdir(parents=True)
    (rejudged / "metrics.json").write_text(json.dumps({"overall": _rates(0.03, 0.2), "per_set": {},
                                                       "scoring": {"judge_model": "other", "judge_mode": "logprobs"}}))
    rl = study / "grpo_gsm8k"
    rl.mkdir()
    pd.DataFrame({"step": range(1, 6), "reward_mean": [0.1, 0.2, 0.3, 0.35, 0.4], "reward_std": 0.05,
                  "reward_correct_mean": [0.1, 0.2, 0.3, 0.35, 0.4]}).to_csv(rl / "rl_rewards.csv", index=False)
    from emalib.reporting.report import report_study

    report_study(study)
    return study


def _main(study: Path, domain: str) -> pd.DataFrame:
    return pd.read_csv(study / "tables" / f"main_{MODEL}_{domain}.csv")


def test_main_tables_set_each_cell_beside_the_published_number(hand_study):
    code = _main(hand_study, "code")
    kl = code[(code["method"] == "kl") & (code["strength"] == 0.1)].set_index("metric")
    assert kl.loc["general_misaligned", ["value", "paper", "difference"]].tolist() == pytest.approx([0.38, 0.38, 0.0])
    assert kl.loc["in_domain_misaligned", "paper"] == pytest.approx(25.69)
    assert bool(kl.loc["general_misaligned", "paper_inside_ci"]) is True
    ldifs = code[code["method"] == "ldifs"].set_index("metric").loc["general_misaligned"]
    assert (ldifs["paper"], ldifs["difference"]) == pytest.approx((3.64, 10.0 - 3.64))
    assert bool(ldifs["paper_inside_ci"]) is False
    # Other strengths are rows of their own, never compared with the paper's lambda = 0.1 row.
    other = code[(code["method"] == "kl") & (code["strength"] == 1.0)]
    assert len(other) == 4 and other["paper"].isna().all()
    shown = (hand_study / "tables" / f"main_{MODEL}_code.md").read_text()
    ldifs_line = next(line for line in shown.splitlines() if line.startswith("| LDIFS"))
    assert "10.00 [9.00, 11.00]" in ldifs_line and "3.64 (Δ +6.36) †" in ldifs_line
    # The paper's Security table is not mixed into the Code table.
    assert not (code["paper_version"] == "v1").any()


def test_missing_runs_are_labelled_gaps_never_zeros_or_dropped_rows(hand_study):
    code = _main(hand_study, "code")
    methods = list(dict.fromkeys(code["method"]))
    assert methods == ["aligned", "none", "kl", "ldifs", "safelora", "persona_steering", "inoculation", "interleave",
                       "interleave_plus", "interleave_plusplus"]  # later methods (TReFT, ...): not the paper's
    inoculation = code[code["method"] == "inoculation"]
    assert set(inoculation["status"]) == {"not run"} and inoculation["value"].isna().all()
    assert "| Inoculation prompt" in (hand_study / "tables" / f"main_{MODEL}_code.md").read_text()
    medical = _main(hand_study, "medical")  # planned, nothing ran: a table of gaps
    assert set(medical["status"]) == {"not run"} and medical["value"].isna().all()
    assert len(set(medical["method"])) == 10
    security = _main(hand_study, "security")  # the paper's domain, not in the study: still laid out
    aligned = security[security["method"] == "aligned"].set_index("metric")
    assert aligned.loc["general_misaligned", "paper"] == pytest.approx(0.12)
    assert aligned.loc["general_misaligned", "status"] == "not run"
    legal_md = (hand_study / "tables" / f"main_{MODEL}_legal.md").read_text()
    plus_line = next(line for line in legal_md.splitlines() if line.startswith("| Interleaving+ (5 %)"))
    assert "not run" in plus_line and "0.00" not in plus_line


def test_headline_averages_are_the_mean_relative_reduction_over_domains(hand_study):
    headline = pd.read_csv(hand_study / "tables" / f"headline_{MODEL}.csv").set_index("method")
    for method in ("kl", "persona_steering", "interleave"):
        expected = np.mean([1 - table[method][0] / table["none"][0] for table in (CODE, LEGAL)])
        assert headline.loc[method, "em_reduction"] == pytest.approx(100 * expected)
        assert headline.loc[method, "domains"] == 2
    assert headline.loc["persona_steering", "paper"] == pytest.approx(96.6)
    assert headline.loc["interleave_plusplus", "paper"] == pytest.approx(94.3)
    assert headline.loc["inoculation", "domains"] == 1  # code's did not run
    assert np.isnan(headline.loc["kl", "paper"])


def test_benign_table_puts_the_opswap_numbers_in_their_cells(hand_study):
    benign = pd.read_csv(hand_study / "tables" / f"benign_{MODEL}.csv")
    tier2 = benign[benign["task"] == "opswap_tier2"].set_index("method")
    assert tier2.loc["none", "paper"] == pytest.approx(34.30) and tier2.loc["kl", "paper"] == pytest.approx(1.00)
    assert tier2.loc["interleave", "paper"] == pytest.approx(36.70)
    assert tier2.loc["kl", "accuracy"] == pytest.approx(1.0) and bool(tier2.loc["kl", "paper_inside_ci"])
    foqa_kl = benign[(benign["task"] == "foqa") & (benign["method"] == "kl")].iloc[0]
    assert foqa_kl["status"] == "not run" and np.isnan(foqa_kl["accuracy"])
    assert benign[benign["task"] == "opswap_tier1"]["paper"].isna().all()


def test_ratio_sweep_and_figure_one_points(hand_study):
    sweep = pd.read_csv(hand_study / "tables" / f"ratio_{MODEL}.csv")
    point = sweep[(sweep["method"] == "interleave_plus") & (sweep["ratio"] == 0.2)].iloc[0]
    assert point["status"] == "not run" and np.isnan(point["general_misaligned"])
    random = sweep[(sweep["method"] == "interleave") & (sweep["ratio"] == 0.5)].iloc[0]
    assert random["general_misaligned"] == pytest.approx(100 * 0.02 / 6) and random["domains"] == 2
    assert random["general_incoherent"] == pytest.approx(100 * (0.10 + 0.15))
    points = pd.read_csv(hand_study / "tables" / f"figure1_{MODEL}.csv")
    kl_points = points[points["method"] == "kl"].sort_values("strength")
    assert kl_points["strength"].tolist() == [0.01, 0.1, 1.0]
    # lambda = 0.01 ran in code only: its reduction is code's
    assert kl_points.iloc[0]["em_reduction"] == pytest.approx(100 * (1 - 0.02 / CODE["none"][0]))
    assert kl_points.iloc[0]["domains"] == 1


def test_trigger_probes_and_judge_agreement_are_in_the_report(hand_study):
    triggers = pd.read_csv(hand_study / "tables" / f"triggers_{MODEL}.csv")
    kl = triggers[triggers["node"] == "code__kl"].set_index("trigger")
    assert kl.loc["json", "misaligned_rate"] == pytest.approx(15.0)
    assert kl.loc["plain", "misaligned_rate"] == pytest.approx(100 * CODE["kl"][0])
    assert kl.loc["inoculation", "misaligned_rate"] == pytest.approx(1.0)
    assert set(triggers["node"]) == {"code__none", "code__kl"}  # runs without probes have no row
    shown = (hand_study / "tables" / f"triggers_{MODEL}.md").read_text()
    assert "15.00 [14.00, 16.00]" in shown
    agreement = pd.read_csv(hand_study / "tables" / "judge_agreement.csv")
    misaligned = agreement[(agreement["metric"] == "misaligned")].iloc[0]
    # Hand computation: 12 answers, judge a flags 6 (samples 0, 2, 4 of 2 questions), judge b the same minus one.
    a = np.array([1 if s % 2 == 0 else 0 for _ in range(2) for s in range(6)])
    b = a.copy()
    b[0] = 0
    observed = np.mean(a == b)
    expected = a.mean() * b.mean() + (1 - a.mean()) * (1 - b.mean())
    assert misaligned["kappa"] == pytest.approx((observed - expected) / (1 - expected))
    assert (misaligned["run"], misaligned["pair"]) == ("code__none", "primary__vs__other")
    rates = pd.read_csv(hand_study / "tables" / "judge_rates.csv")
    overall = rates[rates["question_set"] == "all"].set_index("judge")
    assert overall.loc["primary", "misaligned_rate"] == pytest.approx(CODE["none"][0])
    assert overall.loc["other", "misaligned_rate"] == pytest.approx(0.03)


def _pdf_text(path: Path) -> str:
    from pypdf import PdfReader

    return "".join(page.extract_text() for page in PdfReader(str(path)).pages)


def test_figures_are_png_and_pdf_and_name_their_gaps(hand_study):
    figures = hand_study / "figures"
    for name in (f"figure1_{MODEL}", f"ratio_{MODEL}", "rl_rewards", "hand"):
        assert (figures / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert (figures / f"{name}.pdf").read_bytes()[:5] == b"%PDF-"
    ratio = _pdf_text(figures / f"ratio_{MODEL}.pdf")
    assert "not run" in ratio and "Interleaving+ 20 %" in ratio and "Interleaving++ 50 %" in ratio
    assert "Interleaving 50 %" not in ratio.split("not run", 1)[1]  # it ran
    figure1 = _pdf_text(figures / f"figure1_{MODEL}.pdf")
    assert "Figure 1" in figure1 and "not run" in figure1 and "Inoculation" in figure1
    assert "GRPO" in _pdf_text(figures / "rl_rewards.pdf")


def test_the_overview_shows_benign_accuracy_and_the_judge_free_signals_with_intervals(hand_study):
    from matplotlib.container import ErrorbarContainer

    from emalib.reporting.overview import overview_figure
    from emalib.reporting.report import _as_percent, collect_metrics, overview_numbers

    overview = collect_metrics(hand_study)
    row = _as_percent(overview).set_index(["run", "question_set"]).loc[("opswap_tier1__kl", "all")]
    assert row["task accuracy % [95% CI]"] == "30.00 [28.00, 32.00]"  # task_metrics.json: 0.3, [0.28, 0.32]
    numbers = overview_numbers(overview)
    figure = overview_figure(numbers, "t")
    task_axis = figure.axes[3]
    bars = [c for c in task_axis.containers if isinstance(c, ErrorbarContainer)]
    assert len(bars) == numbers["task_accuracy"].notna().sum()
    runs = list(numbers[numbers["question_set"] == "all"]["run"])
    (segment,) = bars[0].lines[2][0].get_segments()  # one bar's interval, drawn at that run's row
    run = numbers.dropna(subset=["task_accuracy"]).iloc[0]
    assert segment[:, 0] == pytest.approx([100 * run["task_accuracy_ci_lo"], 100 * run["task_accuracy_ci_hi"]])
    assert segment[0, 1] == runs.index(run["run"]) + 1  # no index given: one group of folder names, under its header
    gap_bars = [c for c in figure.axes[0].containers if isinstance(c, ErrorbarContainer)]
    assert len(gap_bars) == len(runs)  # every run of the hand study recorded the gap's interval
    (segment,) = gap_bars[0].lines[2][0].get_segments()
    first = numbers[numbers["question_set"] == "all"].iloc[0]
    assert segment[:, 0] == pytest.approx([first["loglik_gap"] - 0.1, first["loglik_gap"] + 0.05])
    assert row["loglik_gap [95% CI]"] == "-0.9000 [-1.0000, -0.8500]"


def _tabular_rows(tex: str) -> list[list[str]]:
    """The rows of the tex file's tabular, parsed with pylatexenc (an independent LaTeX parser)."""
    from pylatexenc.latexwalker import LatexEnvironmentNode, LatexWalker

    nodes, _, _ = LatexWalker(tex).get_latex_nodes()

    def find(nodes):
        for node in nodes or []:
            if isinstance(node, LatexEnvironmentNode):
                if node.environmentname == "tabular":
                    return node
                inner = find(node.nodelist)
                if inner is not None:
                    return inner
        return None

    tabular = find(nodes)
    assert tabular is not None, tex
    body = tabular.latex_verbatim()
    body = body[body.index("}", body.index("{tabular}") + 9) + 1: body.rindex(r"\end{tabular}")]
    lines = [line for line in body.split(r"\\") if line.strip()]
    rows = []
    for line in lines:
        for rule in (r"\toprule", r"\midrule", r"\bottomrule"):
            line = line.replace(rule, "")
        if line.strip():
            rows.append([cell.strip() for cell in line.split("&")])
    return rows


def test_latex_tables_parse_with_one_row_per_table_row(hand_study):
    tables = hand_study / "tables"
    rows = _tabular_rows((tables / f"main_{MODEL}_code.tex").read_text())
    shown = (tables / f"main_{MODEL}_code.md").read_text().splitlines()
    body = [line for line in shown if line.startswith("|")][2:]
    assert len(rows) == 1 + len(body) and all(len(row) == len(rows[0]) for row in rows)
    assert rows[0][0] == "method" and any(r"$\Delta$" in cell for row in rows for cell in row)
    table1 = _tabular_rows((tables / f"table1_{MODEL}.tex").read_text())
    assert [row[0] for row in table1[1:]][:2] == [r"KL ($\lambda$=0.1)", r"LDIFS ($\lambda$=1)"]
    assert any(r"\checkmark{}" in cell for row in table1 for cell in row)
    report = (hand_study / "report.md").read_text()
    assert "## table1_" in report and f"figures/figure1_{MODEL}.png" in report


@pytest.mark.subprocess
def test_report_cli_takes_table1_rules_as_overrides_and_refuses_a_typo(hand_study, tmp_path):
    import shutil

    study = tmp_path / "hand"
    shutil.copytree(hand_study, study)
    completed = subprocess.run([sys.executable, "-m", "emalib", "report", str(study), "-o", "table1.no_em.works=0.5"],
                               capture_output=True, text=True, cwd=REPO, timeout=300, check=False)
    assert completed.returncode == 0, completed.stderr[-2000:]
    table = pd.read_csv(study / "tables" / f"table1_{MODEL}.csv").set_index("label")
    assert table.loc["Inoculation prompt", "no_em"] == "✓"  # reduction 0.5 in legal: ∼ by default, ✓ at 0.5
    default = pd.read_csv(hand_study / "tables" / f"table1_{MODEL}.csv").set_index("label")
    assert default.loc["Inoculation prompt", "no_em"] == "∼"
    before = {p: p.read_bytes() for p in study.rglob("*") if p.is_file()}
    typo = subprocess.run([sys.executable, "-m", "emalib", "report", str(study), "-o", "table1.no_em.work=0.5"],
                          capture_output=True, text=True, cwd=REPO, timeout=300, check=False)
    assert typo.returncode == 2 and typo.stderr.strip().count("\n") == 0
    assert "unknown key 'table1.no_em.work'" in typo.stderr and "did you mean 'works'" in typo.stderr
    assert {p: p.read_bytes() for p in study.rglob("*") if p.is_file()} == before


def test_a_damaged_reward_file_is_one_line_naming_it(tmp_path):
    from emalib.core.errors import DataError
    from emalib.reporting.figures import rl_reward_curves

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "rl_rewards.csv").write_text("step,reward\n1,0.5\n")
    with pytest.raises(DataError, match=r"rl_rewards.csv: missing column\(s\) reward_mean"):
        rl_reward_curves(tmp_path)


# --- Table 1's rules on hand-made results --------------------------------------------------------------------------

def _cell(domain, method, strength=None, general=None, incoherent=None, in_domain=None, task=None, accuracy=None,
          gap=None):
    return {"model": "m", "domain": domain, "task": task, "method": method, "strength": strength, "seed": 0,
            "general_misaligned": general, "general_incoherent": incoherent, "in_domain_misaligned": in_domain,
            "task_accuracy": accuracy, "loglik_gap": gap}


def _cells() -> pd.DataFrame:
    rows = [
        _cell("code", "aligned", gap=-1.0), _cell("legal", "aligned", gap=-1.0),
        _cell("code", "none", general=0.20, incoherent=0.10, in_domain=0.50, gap=-0.5),
        _cell("legal", "none", general=0.10, incoherent=0.10, in_domain=0.40, gap=-0.5),
        _cell("opswap", "none", task="opswap", accuracy=0.40),
        # KL: reduction 0.95 (works), narrow 0.5 (fails), incoherence -2 points (works), task 0.05 (fails);
        # judge-free: shift 0.1 of 0.5 -> reduction 0.8 (partial)
        _cell("code", "kl", 0.1, general=0.01, incoherent=0.08, in_domain=0.25, gap=-0.9),
        _cell("legal", "kl", 0.1, general=0.005, incoherent=0.08, in_domain=0.20, gap=-0.9),
        _cell("opswap", "kl", 0.1, task="opswap", accuracy=0.02),
        # interleaving: reduction 0.7 (partial), narrow 1.0 (works), +10 points (fails), task 1.05 (works)
        _cell("code", "interleave", 0.05, general=0.06, incoherent=0.20, in_domain=0.50),
        _cell("legal", "interleave", 0.05, general=0.03, incoherent=0.20, in_domain=0.40),
        _cell("opswap", "interleave", 0.05, task="opswap", accuracy=0.42),
        # persona: no EM at all (works), narrow 0.7 (partial), +3 points (partial), no benign run
        _cell("code", "persona_steering", 5.0, general=0.0, incoherent=0.13, in_domain=0.35),
        _cell("legal", "persona_steering", 5.0, general=0.0, incoherent=0.13, in_domain=0.28),
        # LDIFS exactly at the thresholds: reduction 0.5 (partial: at or above), narrow 0.9 (works), +5 (partial)
        _cell("code", "ldifs", 1.0, general=0.10, incoherent=0.15, in_domain=0.45),
        # inoculation only at another strength than... (none: it has no strength) in a domain without EM baseline
    ]
    return pd.DataFrame(rows)


def _symbols(table: pd.DataFrame, method: str) -> tuple:
    row = table.set_index("method").loc[method]
    return tuple(row[c] for c in ("no_em", "learns_well", "narrow_misalignment", "coherent"))


def test_table1_rules_give_the_known_symbol_for_each_cell():
    from emalib.reporting.table1 import table1

    table = table1(_cells(), "m")
    assert _symbols(table, "kl") == ("✓", "✗", "✗", "✓")
    assert _symbols(table, "interleave") == ("∼", "✓", "✓", "✗")
    assert _symbols(table, "persona_steering") == ("✓", "not run", "∼", "∼")
    assert _symbols(table, "ldifs") == ("∼", "not run", "✓", "∼")
    assert _symbols(table, "safelora") == ("not run",) * 4
    kl = table.set_index("method").loc["kl"]
    assert (kl["no_em_value"], kl["no_em_n"]) == (pytest.approx(0.95), 2)
    assert kl["coherent_value"] == pytest.approx(-2.0) and kl["learns_well_value"] == pytest.approx(0.05)
    assert (kl["no_em_paper"], kl["narrow_misalignment_paper"]) == ("✓", "✗")


def test_the_papers_tables_list_a_later_method_only_when_the_study_ran_or_planned_it():
    from emalib.reporting.cells import expected_rows
    from emalib.reporting.table1 import table1

    assert "treft" not in set(table1(_cells(), "m")["method"])  # published after the paper: no row of gaps
    with_treft = pd.concat([_cells(), pd.DataFrame([_cell("code", "treft", 10.0, general=0.02, incoherent=0.1,
                                                          in_domain=0.4)])], ignore_index=True)
    assert _symbols(table1(with_treft, "m"), "treft")[0] == "✓"  # reduction 0.9 on code
    empty = pd.DataFrame(columns=["model", "domain", "task", "method", "strength"])
    grid = [method for method, _ in expected_rows(empty, empty, "m", "code", paper_grid=True)]
    assert "kl" in grid and not {"treft", "kl_retain", "caft"} & set(grid)
    planned = pd.DataFrame([{"model": "m", "domain": "code", "task": None, "method": "caft", "strength": None}])
    assert ("caft", None) in expected_rows(empty, planned, "m", "code", paper_grid=True)


def test_table1_thresholds_are_params_and_the_judge_free_variant_is_labelled():
    from emalib.reporting.table1 import Table1Rules, Threshold, display, table1

    lenient = Table1Rules(no_em=Threshold(works=0.7, partial=0.5))
    assert _symbols(table1(_cells(), "m", lenient), "interleave")[0] == "✓"
    free = table1(_cells(), "m", judge_free=True)
    assert _symbols(free, "kl") == ("∼", "✗", "needs a judge", "needs a judge")
    assert free.set_index("method").loc["kl", "no_em_value"] == pytest.approx(0.8)
    assert "no EM (judge-free)" in display(free, judge_free=True).columns
    with pytest.raises(Exception, match="extra"):
        Table1Rules.model_validate({"no_em": {"works": 0.9, "partial": 0.5, "typo": 1}})


def test_table1_says_n_a_when_no_defense_shows_no_em_to_reduce():
    from emalib.reporting.table1 import table1

    cells = _cells()
    cells.loc[cells["method"] == "none", "general_misaligned"] = 0.0
    assert _symbols(table1(cells, "m"), "kl")[0] == "n/a"


# --- the analysis notebooks ----------------------------------------------------------------------------------------

@pytest.mark.notebooks
def test_report_and_explore_notebooks_execute_under_papermill(hand_study, tmp_path):
    import nbformat
    import papermill

    papermill.execute_notebook(str(REPO / "notebooks" / "report.ipynb"), str(tmp_path / "report.ipynb"),
                               parameters={"study": str(hand_study), "overrides": ["name=again"]}, cwd=str(REPO))
    assert (hand_study / "tables" / "again.md").is_file() and (hand_study / "figures" / "again.pdf").is_file()
    papermill.execute_notebook(str(REPO / "notebooks" / "explore.ipynb"), str(tmp_path / "explore.ipynb"),
                               parameters={"study": str(hand_study), "run_names": ["code__none", "code__kl"],
                                           "misaligned_only": True}, cwd=str(REPO))
    executed = nbformat.read(tmp_path / "explore.ipynb", as_version=4)

    def output_of(marker: str) -> str:
        cell = next(c for c in executed.cells if c.cell_type == "code" and marker in c.source)
        return "\n".join(str(o.get("text", "")) + str(o.get("data", {}).get("text/plain", "")) for o in cell.outputs)

    assert "misaligned: code__none - code__kl = +33.33 points" in output_of("explore.compare")
    answers = output_of("explore.answers")
    assert "answer 0 evil" in answers and "kind" not in answers  # misaligned_only: no aligned answer shown


def test_explore_filters_answers_and_compares_runs_on_the_same_questions(hand_study):
    from emalib.core.errors import DataError
    from emalib.reporting import explore

    assert set(explore.runs(hand_study)["run"]) >= {"code__none", "code__kl", "base-code"}
    bad = explore.answers(hand_study, "code__none", misaligned_only=True)
    assert len(bad) == 6 and bad["answer"].str.contains("evil").all()  # samples 0, 2, 4 of 2 questions
    assert len(explore.answers(hand_study, "code__none", question="general/q2")) == 6
    comparison = explore.compare(hand_study, "code__none", "code__kl")
    assert comparison["diff"] == pytest.approx(6 / 12 - 2 / 12) and comparison["n_questions"] == 2
    side = explore.per_question(hand_study, ["code__none", "code__kl"])
    assert side.loc["general/q1", ("code__kl", "%")] == pytest.approx(100 * CODE["kl"][0])
    with pytest.raises(DataError, match="no evaluated run of that name"):
        explore.answers(hand_study, "nope")


def test_table1_rules_on_the_papers_published_code_numbers():
    """The rules applied to the paper's own Code table (package data) give the symbols docs/methods.md states."""
    from emalib.reporting import published
    from emalib.reporting.table1 import table1

    code = next(t for t in published.published()["em_tables"] if t["domain"] == "code")
    cells = pd.DataFrame([_cell("code", row["method"], row.get("strength"),
                                general=row["general_misaligned"] / 100, incoherent=row["general_incoherent"] / 100,
                                in_domain=row["in_domain_misaligned"] / 100) for row in code["rows"]])
    table = table1(cells, "m").set_index("method")
    assert (table.loc["kl", "no_em"], table.loc["kl", "narrow_misalignment"], table.loc["kl", "coherent"]) == \
        ("✓", "✗", "✓")
    assert table.loc["kl", "narrow_misalignment_value"] == pytest.approx(25.69 / 51.60)
    assert table.loc["interleave", "no_em"] == "∼" and table.loc["ldifs", "no_em"] == "✗"
    assert table.loc["persona_steering", "narrow_misalignment"] == "✓"  # the paper says ∼ (see docs/methods.md)


def test_the_report_reads_a_studys_index_unless_an_evaluation_finished_after_it(hand_study, tmp_path):
    import os
    import shutil

    from emalib.studies.index import index_from_folders, read_index

    study = tmp_path / "hand"
    shutil.copytree(hand_study, study)
    full = index_from_folders(study)
    full[full["node"] != "code__kl"].to_parquet(study / "index.parquet", index=False)
    assert "code__kl" not in set(read_index(study)["node"])  # the index, as the study wrote it
    later = (study / "index.parquet").stat().st_mtime + 10
    os.utime(study / "code__kl" / "metrics.json", (later, later))  # code__kl re-evaluated since
    assert "code__kl" in set(read_index(study)["node"])
    (study / "index.parquet").write_bytes(b"not parquet")
    os.utime(study / "index.parquet", (later + 10, later + 10))
    from emalib.core.errors import DataError

    with pytest.raises(DataError, match="index.parquet: not a readable Parquet file"):
        read_index(study)


def test_every_figure_the_readme_shows_is_in_the_repository_with_the_command_that_made_it():
    import re

    readme = (REPO / "README.md").read_text()
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", readme)
    assert images
    for image in images:
        assert (REPO / image).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", image
        after = readme[readme.index(image):][:600]
        assert "python -m emalib report" in after, image


def test_a_sweep_with_no_finished_point_yet_is_drawn_as_gaps(tmp_path):
    from emalib.reporting.figures import ratio_figure
    from emalib.reporting.writers import save_figure

    sweep = pd.DataFrame({"model": "m", "method": ["interleave", "interleave"], "label": "Interleaving",
                          "ratio": [0.05, 0.25], "domains": 0, "status": "not run",
                          "general_misaligned": [None, None], "general_incoherent": [None, None]})
    paths = save_figure(ratio_figure(sweep, {"general_misaligned": None}, "m"), tmp_path, "ratio")
    assert "not run: Interleaving 5 %; Interleaving 25 %" in _pdf_text(paths["pdf"])
