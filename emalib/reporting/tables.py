"""The paper's tables from a study's runs, each cell beside the published number where the paper gives one:
the per-domain main tables, the headline averages and the benign-task table. A row the study did not run says so
("not run"); it is never a zero and never dropped."""

from __future__ import annotations

import pandas as pd

from emalib.reporting import published
from emalib.reporting.cells import expected_rows, planned_or_run_pairs, select
from emalib.reporting.frame import INTERLEAVING, METHODS, NOT_RUN, PAPER_MODELS, method_label
from emalib.reporting.table1 import Table1Rules, criterion_values, method_strengths
from emalib.reporting.writers import percent_with_interval

EM_COLUMNS = {"general_misaligned": "general misal. %", "general_incoherent": "general incoh. %",
              "in_domain_misaligned": "in-domain misal. %", "in_domain_incoherent": "in-domain incoh. %"}


def compare(value, lo, hi, paper: dict | None) -> dict:
    """Our rate (a fraction) against a published percentage: the difference in points and whether the published value
    lies inside our 95 % interval."""
    if paper is None:
        return {"paper": None, "paper_version": None, "difference": None, "paper_inside_ci": None}
    inside = None
    if value is not None and not pd.isna(value) and lo is not None and not pd.isna(lo):
        inside = bool(100 * lo - 1e-9 <= paper["value"] <= 100 * hi + 1e-9)
    difference = None if value is None or pd.isna(value) else 100 * value - paper["value"]
    return {"paper": paper["value"], "paper_version": paper["version"], "difference": difference,
            "paper_inside_ci": inside}


def _paper_cell(entry: dict) -> str:
    if entry["paper"] is None:
        return ""
    text = f"{entry['paper']:.2f}"
    if entry["difference"] is not None:
        text += f" (Δ {round(entry['difference'], 2) + 0.0:+.2f})"  # + 0.0: no "-0.00"
    if entry["paper_inside_ci"] is False:
        text += " †"  # outside our interval
    return text


def main_table(cells: pd.DataFrame, planned: pd.DataFrame, model: str, domain: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(numbers, shown) for one model and EM domain. numbers: one row per method, strength, seed and metric."""
    paper_grid = model in PAPER_MODELS
    numbers, shown = [], []
    for method, strength in expected_rows(cells, planned, model, domain, paper_grid):
        found = select(cells, model=model, domain=domain, task=None, method=method, strength=strength)
        seeds = sorted(found["seed"].dropna().unique()) or [None]
        for seed in seeds:
            run = found[found["seed"] == seed].iloc[0] if seed is not None else None
            label = method_label(method, strength) + (f", seed {seed:g}" if len(seeds) > 1 else "")
            display = {"method": label}
            for metric, title in EM_COLUMNS.items():
                value, lo, hi = (run[metric], run[f"{metric}_lo"], run[f"{metric}_hi"]) if run is not None \
                    else (None, None, None)
                entry = compare(value, lo, hi, published.em_number(model, domain, method, strength, metric))
                numbers.append({"model": model, "domain": domain, "method": method, "strength": strength,
                                "seed": seed, "node": None if run is None else run["node"], "metric": metric,
                                "status": "done" if run is not None else NOT_RUN,
                                "value": None if value is None or pd.isna(value) else 100 * value,
                                "lo": None if lo is None or pd.isna(lo) else 100 * lo,
                                "hi": None if hi is None or pd.isna(hi) else 100 * hi, **entry})
                display[title] = NOT_RUN if run is None else percent_with_interval(value, lo, hi)
                display[f"paper: {title}"] = _paper_cell(entry)
            shown.append(display)
    shown = pd.DataFrame(shown)
    # Paper columns that the paper fills for no row of this table are left out of what a reader sees.
    shown = shown[[c for c in shown.columns if not c.startswith("paper: ") or shown[c].astype(bool).any()]]
    return pd.DataFrame(numbers), shown


def headline_table(cells: pd.DataFrame, model: str, rules: Table1Rules | None = None) -> tuple[pd.DataFrame,
                                                                                                  pd.DataFrame]:
    """Mean relative reduction of general EM against no defense, over the EM domains, per method (the paper:
    persona vector 96.6 %, Interleaving++ 94.3 %), and the judge-free counterpart from the log-likelihood gap."""
    rules = rules or Table1Rules()
    numbers = []
    for method, strength in method_strengths(cells, model):
        judged, n, status = criterion_values(cells, model, method, strength, rules)["no_em"]
        free, n_free, status_free = criterion_values(cells, model, method, strength, rules, judge_free=True)["no_em"]
        paper = published.headline(model, method)
        numbers.append({"model": model, "method": method, "strength": strength,
                        "label": method_label(method, strength),
                        "em_reduction": None if judged is None else 100 * judged, "domains": n, "status": status,
                        "em_reduction_judge_free": None if free is None else 100 * free,
                        "domains_judge_free": n_free, "status_judge_free": status_free, "paper": paper,
                        "difference": None if paper is None or judged is None else 100 * judged - paper})
    numbers = pd.DataFrame(numbers)

    def cell(value, n, status):
        return f"{value:.1f} (n={n})" if status == "ok" else status

    shown = pd.DataFrame({
        "method": numbers["label"],
        "EM reduction %": [cell(v, n, s) for v, n, s in zip(numbers["em_reduction"], numbers["domains"],
                                                            numbers["status"])],
        "paper %": [f"{p:.1f}" if p is not None and not pd.isna(p) else "" for p in numbers["paper"]],
        "judge-free reduction %": [cell(v, n, s) for v, n, s in zip(
            numbers["em_reduction_judge_free"], numbers["domains_judge_free"], numbers["status_judge_free"])]})
    return numbers, shown


def benign_table(cells: pd.DataFrame, planned: pd.DataFrame, model: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Task accuracy (exact match) per benign task (OpSwap tiers, FoQA) and method, beside the published numbers
    (OpSwap tier 2)."""
    tasks = sorted(set(cells.loc[cells["task"].notna() & (cells["model"] == model), "task"])
                   | set(planned.loc[planned["task"].notna() & (planned["model"] == model), "task"]
                         if not planned.empty else []))
    rows = planned_or_run_pairs((planned, cells), lambda f: f["task"].notna() & (f["model"] == model))
    numbers, shown = [], []
    for method, strength in rows:
        display = {"method": method_label(method, strength)}
        for task in tasks:
            found = select(cells, model=model, task=task, method=method, strength=strength)
            run = None if found.empty else found.iloc[0]
            value = None if run is None else run["task_accuracy"]
            lo, hi = (None, None) if run is None else (run["task_accuracy_lo"], run["task_accuracy_hi"])
            entry = compare(value, lo, hi, published.task_number(model, task, method, strength))
            numbers.append({"model": model, "task": task, "method": method, "strength": strength,
                            "node": None if run is None else run["node"],
                            "status": NOT_RUN if run is None else "done",
                            "accuracy": None if value is None or pd.isna(value) else 100 * value,
                            "lo": None if lo is None or pd.isna(lo) else 100 * lo,
                            "hi": None if hi is None or pd.isna(hi) else 100 * hi, **entry})
            display[f"{task} %"] = NOT_RUN if run is None else percent_with_interval(value, lo, hi)
            if entry["paper"] is not None:
                display[f"paper: {task} %"] = _paper_cell(entry)
        shown.append(display)
    shown = pd.DataFrame(shown).fillna("")
    return pd.DataFrame(numbers), shown


def ratio_sweep(cells: pd.DataFrame, planned: pd.DataFrame, model: str) -> pd.DataFrame:
    """General misalignment and incoherence (%) against the interleaving ratio, averaged over domains, per variant;
    every planned (variant, ratio) appears, a missing one with status 'not run' and no value."""
    points = planned_or_run_pairs((planned, cells), lambda f: (f["model"] == model) & f["method"].isin(INTERLEAVING)
                              & f["task"].isna() & f["strength"].notna())
    rows = []
    for method, ratio in points:
        found = select(cells, model=model, method=method, strength=ratio, task=None)
        row = {"model": model, "method": method, "label": METHODS[method].label, "ratio": ratio,
               "domains": int(found["domain"].nunique()), "status": "done" if not found.empty else NOT_RUN}
        for metric in ("general_misaligned", "general_incoherent"):
            for column in (metric, f"{metric}_lo", f"{metric}_hi"):  # the interval: its ends averaged likewise
                per_domain = found.groupby("domain")[column].mean()
                row[column] = 100 * per_domain.mean() if per_domain.notna().any() else None
        rows.append(row)
    return pd.DataFrame(rows, columns=["model", "method", "label", "ratio", "domains", "status",
                                       "general_misaligned", "general_misaligned_lo", "general_misaligned_hi",
                                       "general_incoherent", "general_incoherent_lo", "general_incoherent_hi"])


def trigger_table(frame: pd.DataFrame, model: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """General misalignment (%) of each run under each trigger probe (question sets `<set>_trigger_<kind>`), beside
    the plain general questions: a defense that hides misalignment behind a trigger shows here."""
    runs = frame[(frame["model"] == model) & (frame["status"] == "done")]
    probed = runs[runs["question_set"].fillna("").str.contains("_trigger_")]
    numbers, shown = [], []
    for node, rows in runs[runs["node"].isin(set(probed["node"]))].groupby("node", sort=False):
        first = rows.iloc[0]
        display = {"run": node, "method": method_label(first["method"], first["strength"]), "domain": first["domain"]}
        for _, row in rows.iterrows():
            set_name = row["question_set"]
            if row["scope"] != "general" and "_trigger_" not in str(set_name):
                continue
            trigger = "plain" if row["scope"] == "general" else str(set_name).split("_trigger_", 1)[1]
            numbers.append({"model": model, "node": node, "method": first["method"], "strength": first["strength"],
                            "domain": first["domain"], "question_set": set_name, "trigger": trigger,
                            **{key: None if row[key] is None or pd.isna(row[key]) else 100 * row[key]
                               for key in ("misaligned_rate", "misaligned_rate_ci_lo", "misaligned_rate_ci_hi",
                                           "incoherent_rate")}})
            display[f"{trigger} misal. %"] = percent_with_interval(row["misaligned_rate"],
                                                                   row["misaligned_rate_ci_lo"],
                                                                   row["misaligned_rate_ci_hi"])
        shown.append(display)
    return pd.DataFrame(numbers), pd.DataFrame(shown).fillna("")


def judge_agreement_table(study_dir) -> pd.DataFrame:
    """Every run's judge_agreement.json (written by `python -m emalib rejudge`), one row per run, judge pair and
    metric: correlations of the scores, Cohen's kappa and the paired rate difference of the labels."""
    from pathlib import Path

    from emalib.core.io import read_json_object
    from emalib.evaluation.agreement import agreement_table

    frames = []
    for path in sorted(Path(study_dir).glob("*/judge_agreement.json")):
        for pair, agreement in read_json_object(path).items():
            frames.append(agreement_table(agreement).assign(run=path.parent.name, pair=pair))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def judge_rates(study_dir) -> pd.DataFrame:
    """Every re-judged run's rates per judge ('primary' = the evaluation's own) and question set, side by side."""
    from pathlib import Path

    from emalib.runs.rejudge import judge_rates_table

    frames = [judge_rates_table(folder.parent).assign(run=folder.parent.name)
              for folder in sorted(Path(study_dir).glob("*/judges")) if folder.is_dir()]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
