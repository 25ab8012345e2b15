"""Which of the paper's tables and figures a study's results allow, written under results/<study>/tables and
results/<study>/figures. Names: main_<model>_<domain>, table1_<model>, table1_judge_free_<model>, headline_<model>,
benign_<model>, figure1_<model>, ratio_<model>, comparison_<model>_<domain> (a study with several defenses on
one EM domain), rl_rewards."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from emalib.core.io import atomic_write_text
from emalib.reporting import comparison, figures, table1, tables
from emalib.reporting.cells import run_cells
from emalib.reporting.comparison_figure import comparison_figure
from emalib.reporting.frame import (
    PAPER_DOMAINS,
    PAPER_MODELS,
    has_judged_rates,
    planned_cells,
    results_frame,
)
from emalib.reporting.labels import judge_note
from emalib.reporting.writers import percent_with_interval, save_figure, write_table


def _em_domains(cells: pd.DataFrame, planned: pd.DataFrame, model: str) -> list[str]:
    """The paper's four domains for a paper model (a missing one is a table of gaps), else those the study has."""
    found = set()
    for source in (cells, planned):
        if not source.empty:
            found |= set(source.loc[(source["model"] == model) & source["task"].isna(), "domain"])
    if model in PAPER_MODELS:
        return list(PAPER_DOMAINS) + sorted(found - set(PAPER_DOMAINS))
    return sorted(found)


def _mean_over_domains(cells: pd.DataFrame, model: str, method: str) -> dict[str, float | None]:
    """General misaligned and incoherent % of a method's EM runs (no defense, the aligned model), mean over domains."""
    runs = cells[(cells["model"] == model) & (cells["method"] == method) & cells["task"].isna()]
    return {m: (100 * runs.groupby("domain")[m].mean().mean() if runs[m].notna().any() else None)
            for m in ("general_misaligned", "general_incoherent")}


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)


def paper_outputs(study_dir: Path, index: pd.DataFrame, planned_index: pd.DataFrame,
                  rules: table1.Table1Rules) -> dict[str, Path]:
    tables_dir, figures_dir = study_dir / "tables", study_dir / "figures"
    paths: dict[str, Path] = {}
    frame = results_frame(index, study_dir) if not index.empty else results_frame(pd.DataFrame(columns=["node"]))
    cells = run_cells(frame)
    planned = planned_cells(planned_index) if not planned_index.empty else planned_cells(pd.DataFrame())
    models = sorted(set(cells["model"]) | set(planned["model"]))
    judged = has_judged_rates(frame)  # Table 1's caption says when it has nothing judged to go on

    def table(numbers: pd.DataFrame, shown: pd.DataFrame, name: str, caption: str) -> None:
        for kind, path in write_table(numbers, shown, tables_dir, name, caption).items():
            paths[f"{name}.{kind}"] = path

    def figure(fig, name: str) -> None:
        for kind, path in save_figure(fig, figures_dir, name).items():
            paths[f"{name}.{kind}"] = path

    for model in models:
        slug = _slug(model)
        em_cells = cells[(cells["model"] == model) & cells["task"].isna()]
        em_planned = planned[(planned["model"] == model) & planned["task"].isna()]
        if not em_cells.empty or not em_planned.empty:
            for domain in _em_domains(cells, planned, model):
                numbers, shown = tables.main_table(cells, planned, model, domain)
                table(numbers, shown, f"main_{slug}_{_slug(domain)}",
                      f"{model}, {domain}: % of judged answers [95 % CI]; paper: the published value (Δ = ours - "
                      f"paper; † = outside our interval)")
            for domain in comparison.compared_domains(cells, model):
                numbers = comparison.comparison_numbers(cells, model, domain)
                name = f"comparison_{slug}_{_slug(domain)}"
                table(numbers, comparison.comparison_shown(numbers), name,
                      f"{model}, {domain}: every defense side by side; rates % [95 % CI], EM-F1 0-100 [95 % CI], "
                      f"step time and peak memory as multiples of plain SFT's; paper: the published value")
                figure(comparison_figure(numbers, model, domain, judge_note(index)), name)
            verdicts = table1.table1(cells, model, rules)
            table(verdicts, table1.display(verdicts), f"table1_{slug}",
                  f"Table 1, {model}: by the rules of docs/methods.md#table-1-rules" +
                  ("" if judged else " (no judged rates in this study)"))
            free = table1.table1(cells, model, rules, judge_free=True)
            table(free, table1.display(free, judge_free=True), f"table1_judge_free_{slug}",
                  f"Table 1, {model}, judge-free: no EM from the log-likelihood gap; criteria that need judged rates "
                  f"say so")
            numbers, shown = tables.headline_table(cells, model, rules)
            table(numbers, shown, f"headline_{slug}",
                  f"{model}: mean relative reduction of general EM against no defense over the EM domains")
            points = figures.tradeoff_points(cells, planned, model, rules)
            judge_free = not (points["status"] == "done").any()  # no judged EM to reduce: the gap still moves
            if judge_free:
                points = figures.tradeoff_points(cells, planned, model, rules, judge_free=True)
            if not points.empty:
                figure(figures.figure1(points, model, judge_free=judge_free,
                                       reference=figures.aligned_reference(cells, model, rules)), f"figure1_{slug}")
                paths[f"figure1_{slug}.csv"] = atomic_write_text(tables_dir / f"figure1_{slug}.csv",
                                                                 points.to_csv(index=False))
            sweep = tables.ratio_sweep(cells, planned, model)
            if not sweep.empty:
                levels = {method: _mean_over_domains(cells, model, method) for method in ("none", "aligned")}
                figure(figures.ratio_figure(sweep, levels["none"], model, aligned=levels["aligned"]), f"ratio_{slug}")
                paths[f"ratio_{slug}.csv"] = atomic_write_text(tables_dir / f"ratio_{slug}.csv",
                                                               sweep.to_csv(index=False))
        numbers, shown = tables.trigger_table(frame, model)
        if not numbers.empty:
            table(numbers, shown, f"triggers_{slug}",
                  f"{model}: general misaligned % [95 % CI] under each trigger probe, beside the plain questions")
        has_tasks = cells.loc[cells["model"] == model, "task"].notna().any() or \
            planned.loc[planned["model"] == model, "task"].notna().any()
        if has_tasks:
            numbers, shown = tables.benign_table(cells, planned, model)
            table(numbers, shown, f"benign_{slug}",
                  f"{model}: benign-task accuracy % [95 % CI] (OpSwap, FoQA: exact match)")
    agreement = tables.judge_agreement_table(study_dir)
    if not agreement.empty:
        shown = agreement[["run", "pair", "metric", "kind", "n", "pearson", "kappa", "rate_a", "rate_b", "diff",
                           "lo", "hi"]].round(3).fillna("")
        table(agreement, shown, "judge_agreement", "Judge agreement per run and judge pair (python -m emalib rejudge)")
    rates = tables.judge_rates(study_dir)
    if not rates.empty:
        shown = pd.DataFrame({"run": rates["run"], "judge": rates["judge"], "judge model": rates["judge_model"],
                              "mode": rates["judge_mode"], "question set": rates["question_set"],
                              "misaligned % [95 % CI]": [percent_with_interval(v, lo, hi) for v, lo, hi in zip(
                                  rates["misaligned_rate"], rates["misaligned_rate_ci_lo"],
                                  rates["misaligned_rate_ci_hi"])]})
        table(rates, shown, "judge_rates", "Rates of every re-judged run per judge (python -m emalib rejudge)")
    curves = figures.rl_reward_curves(study_dir)  # validated: a damaged reward log is one line naming it
    if not curves.empty:
        from emalib.training.rl.rewards_log import REWARDS_FIGURE, plot_rewards  # the run's own figure, all runs in one

        drawn = plot_rewards({run: curve for run, curve in curves.groupby("run", sort=False)},
                             figures_dir / REWARDS_FIGURE, title=f"Mean GRPO reward: {study_dir.name}")
        paths.update({f"{REWARDS_FIGURE}.{kind}": path for kind, path in drawn.items()})
    return paths


def write_report_md(study_dir: Path, name: str, paths: dict[str, Path]) -> Path:
    """results/<study>/report.md: every table's Markdown and every figure, in one page."""
    lines = [f"# Report: {name}", "", ("Made by `python -m emalib report`; numbers in tables/*.csv, LaTeX in "
                                       "tables/*.tex, figures as PNG and PDF. Values beside 'paper' are the paper's "
                                       "published numbers (emalib's package data, with their sources); emalib did "
                                       "not measure them."), ""]
    for key, path in paths.items():
        relative = path.relative_to(study_dir)
        if key.endswith("md") and path.suffix == ".md":
            lines += [f"## {path.stem}", "", path.read_text(encoding="utf-8"), ""]
        elif path.suffix == ".png":
            lines += [f"![{path.stem}]({relative.as_posix()})", ""]
    return atomic_write_text(study_dir / "report.md", "\n".join(lines))
