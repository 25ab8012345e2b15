"""The paper's figures from a study's runs (seaborn): Figure 1's trade-off over each method's strength, the
interleaving-ratio figure, the RL reward curves, and an overview of every run that leads with the judge-free signal.
A planned point that did not run is named on the figure ("not run: ..."), never drawn as a zero."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from emalib.core.errors import DataError
from emalib.reporting.cells import planned_or_run_pairs
from emalib.reporting.frame import METHODS, method_label
from emalib.reporting.table1 import Table1Rules, criterion_values

TRADEOFF_COLUMNS = ["model", "method", "strength", "label", "status", "em_reduction", "incoherence_change",
                    "narrow_kept", "learns_well", "domains"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    sns.set_theme(style="whitegrid", context="paper")
    return plt, sns


def tradeoff_points(cells: pd.DataFrame, planned: pd.DataFrame, model: str, rules: Table1Rules | None = None,
                    judge_free: bool = False) -> pd.DataFrame:
    """Figure 1's points: per defense and strength (ran or planned), the mean EM reduction (%), the change of general
    incoherence (points) and the in-domain misalignment kept (%) against no defense, over the EM domains."""
    rules = rules or Table1Rules()
    rows = []
    for method, strength in planned_or_run_pairs((planned, cells), lambda f: (f["model"] == model) & f["task"].isna()
                                             & ~f["method"].isin(["aligned", "none"])):
        values = criterion_values(cells, model, method, strength, rules, judge_free)
        no_em, domains, status = values["no_em"]
        coherent, narrow, learns = values["coherent"][0], values["narrow_misalignment"][0], values["learns_well"][0]
        rows.append({"model": model, "method": method, "strength": strength, "label": method_label(method, strength),
                     "status": "done" if status == "ok" else status,
                     "em_reduction": None if no_em is None else 100 * no_em,
                     "incoherence_change": coherent, "narrow_kept": None if narrow is None else 100 * narrow,
                     "learns_well": None if learns is None else 100 * learns, "domains": domains})
    return pd.DataFrame(rows, columns=TRADEOFF_COLUMNS)


def _missing_note(axis, labels: list[str], statuses: list[str]) -> None:
    """Under the axis, per reason ('not run', 'n/a', ...), the points that have no value."""
    groups: dict[str, list[str]] = {}
    for label, status in zip(labels, statuses):
        if status != "done":
            groups.setdefault(status, []).append(label)
    text = "\n".join(f"{status}: " + "; ".join(names) for status, names in groups.items())
    if text:
        axis.text(0.01, -0.22, text, transform=axis.transAxes, fontsize=7, va="top")


def figure1(points: pd.DataFrame, model: str, judge_free: bool = False):
    """Two panels: EM reduction against the change of incoherence, and against the narrow misalignment kept; one line
    per method through its strengths, each point labelled with its strength. Judge-free (no judged EM to reduce), one
    panel: the reduction read from the log-likelihood gap per method and strength, since coherence and narrow
    misalignment need a judge."""
    plt, sns = _pyplot()
    drawn = points[points["status"] == "done"].copy()
    drawn["method label"] = [METHODS[m].label if m in METHODS else m for m in drawn["method"]]
    if judge_free:
        figure, axis = plt.subplots(figsize=(6.5, 1.8 + 0.3 * len(points)))
        if not drawn.empty:
            sns.scatterplot(data=drawn, x="em_reduction", y="label", hue="method label", ax=axis, s=60, legend=False)
        axis.axvline(0, color="gray", linewidth=0.8)
        axis.axvline(100, color="gray", linewidth=0.8, linestyle="--")
        axis.set_xlabel("EM reduction vs no defense (%), from the log-likelihood gap (judge-free)")
        axis.set_ylabel("")
        _missing_note(axis, list(points["label"]), list(points["status"]))
        figure.suptitle(f"Figure 1, {model}, judge-free: coherence and narrow learning need a judged study")
        return figure
    panels = [("incoherence_change", "general incoherence vs no defense (points)"),
              ("narrow_kept", "in-domain misalignment kept (% of no defense)")]
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for axis, (column, ylabel) in zip(axes, panels):
        # Every point of a method in strength order, a missing one as NaN: the line breaks there instead of
        # joining its neighbours.
        _lines(axis, points, "em_reduction", column, sns.color_palette())
        for _, point in drawn.dropna(subset=["em_reduction", column]).iterrows():
            if point["strength"] is not None and not pd.isna(point["strength"]):
                axis.annotate(f"{point['strength']:g}", (point["em_reduction"], point[column]), fontsize=7,
                              xytext=(3, 3), textcoords="offset points")
        axis.set_xlabel("EM reduction vs no defense (%)")
        axis.set_ylabel(ylabel)
    axes[0].legend(fontsize=7)
    _missing_note(axes[0], list(points["label"]), list(points["status"]))
    figure.suptitle(f"Figure 1, {model}: EM reduction against coherence and narrow learning")
    return figure


def _lines(axis, points: pd.DataFrame, x: str, y: str, palette) -> None:
    """One line per method through its points in order, with markers; a point without a value (not run) is NaN, so
    the line has a gap there rather than joining the points either side of it."""
    for color, (method, group) in zip(palette, points.groupby("method", sort=False)):
        label = METHODS[method].label if method in METHODS else method
        axis.plot(group[x].astype(float), group[y].astype(float), marker="o", color=color, label=label)


def ratio_figure(sweep: pd.DataFrame, no_defense: dict[str, float | None], model: str):
    """General misalignment and incoherence (%) against the interleaving ratio for random interleaving, + and ++;
    the no-defense level as a dashed line."""
    plt, sns = _pyplot()
    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    points = sweep.sort_values(["method", "ratio"]).assign(ratio_percent=lambda f: 100 * f["ratio"])
    ratios = sorted(points["ratio_percent"].unique())
    for axis, metric, title in zip(axes, ("general_misaligned", "general_incoherent"),
                                   ("general misaligned %", "general incoherent %")):
        _lines(axis, points, "ratio_percent", metric, sns.color_palette())
        if no_defense.get(metric) is not None:
            axis.axhline(no_defense[metric], color="gray", linestyle="--", label="no defense")
        if points[metric].notna().any():  # a log axis needs at least one value (a sweep may have none yet)
            axis.set_xscale("log")
        axis.set_xticks(ratios, [f"{r:g}" for r in ratios])
        axis.set_xlabel("safe data added (% of the fine-tuning set)")
        axis.set_ylabel(title)
    axes[0].legend(fontsize=7)
    _missing_note(axes[0], [f"{label} {100 * ratio:g} %" for label, ratio in zip(sweep["label"], sweep["ratio"])],
                  list(sweep["status"]))
    figure.suptitle(f"{model}: interleaving ratio (mean over EM domains)")
    return figure


def rl_reward_curves(study_dir: str | Path) -> pd.DataFrame:
    """Every RL run's per-step rewards (<run>/rl_rewards.csv: step, reward_mean, reward_std, ...), with the run."""
    frames = []
    for path in sorted(Path(study_dir).glob("*/rl_rewards.csv")):
        try:
            curve = pd.read_csv(path)
        except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as err:
            raise DataError(f"{path}: not a readable CSV ({type(err).__name__})") from None
        missing = {"step", "reward_mean"} - set(curve.columns)
        if missing:
            raise DataError(f"{path}: missing column(s) {', '.join(sorted(missing))}")
        frames.append(curve.assign(run=path.parent.name))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["run", "step", "reward_mean"])


def _interval_bars(axis, frame: pd.DataFrame, value: str, lo: str, hi: str, runs: list[str], scale: float = 1) -> None:
    """A 95 % interval on each horizontal bar (at its run's row) that has one; intervals in the unscaled unit."""
    for _, row in frame.iterrows():
        low, high = row.get(lo), row.get(hi)
        if low is not None and not pd.isna(low):
            axis.errorbar(row[value], runs.index(row["run"]), color="black", capsize=2, linewidth=0.8,
                          xerr=[[row[value] - scale * low], [scale * high - row[value]]])


def overview_figure(frame: pd.DataFrame, title: str, judge_note: str = ""):
    """`frame`: the report's overview numbers (a row per run and question set, intervals as _lo/_hi). One row of bars
    per run: first the judge-free log-likelihood gap (misaligned minus aligned reference answers, nats/token; higher =
    closer to the misaligned answers) and the KL to the base model, then the judged misaligned and incoherent % with
    95 % intervals under a note on what the judge can show, then benign-task accuracy when there is one."""
    plt, sns = _pyplot()
    overall = frame[frame["question_set"] == "all"].reset_index(drop=True)
    runs = list(overall["run"])
    has_tasks = overall["task_accuracy"].notna().any()
    panels = 4 if has_tasks else 3
    figure, axes = plt.subplots(1, panels, figsize=(3.6 * panels, 1.6 + 0.32 * len(runs)), sharey=True)
    for axis, column, label in ((axes[0], "loglik_gap", "log-lik. gap, misaligned - aligned\n(nats/token)"),
                                (axes[1], "kl_to_base", "KL to the base model\n(nats/token)")):
        values = overall.dropna(subset=[column])
        if not values.empty:
            sns.barplot(data=values, y="run", x=column, ax=axis, color="slategray", order=runs)
            _interval_bars(axis, values, column, f"{column}_ci_lo", f"{column}_ci_hi", runs)
        axis.set_xlabel(label)
        axis.set_ylabel("")
    axes[0].set_title("judge-free signals", loc="left")
    long = []
    for _, row in overall.iterrows():
        for metric in ("misaligned", "incoherent"):
            rate = row[f"{metric}_rate"]
            if rate is None or pd.isna(rate):
                continue
            lo, hi = row[f"{metric}_rate_ci_lo"], row[f"{metric}_rate_ci_hi"]
            lo, hi = (rate, rate) if lo is None or pd.isna(lo) else (lo, hi)
            long.append({"run": row["run"], "metric": metric, "rate": 100 * rate, "lo": 100 * lo, "hi": 100 * hi})
    long = pd.DataFrame(long, columns=["run", "metric", "rate", "lo", "hi"])
    rates_axis = axes[2]
    if not long.empty:
        sns.barplot(data=long, y="run", x="rate", hue="metric", ax=rates_axis, errorbar=None, order=runs)
        for container, metric in zip(rates_axis.containers, dict.fromkeys(long["metric"])):
            subset = long[long["metric"] == metric].set_index("run")
            for bar, run in zip(container, [r for r in runs if r in subset.index]):
                entry = subset.loc[run]
                rates_axis.errorbar(entry["rate"], bar.get_y() + bar.get_height() / 2,
                                    xerr=[[entry["rate"] - entry["lo"]], [entry["hi"] - entry["rate"]]],
                                    color="black", capsize=2, linewidth=0.8)
        rates_axis.legend(fontsize=7, loc="lower right")
    rates_axis.set_xlabel("% of judged answers (95 % CI)")
    rates_axis.set_ylabel("")
    rates_axis.set_title("judged rates", loc="left")
    if has_tasks:
        tasks = overall.dropna(subset=["task_accuracy"]).assign(accuracy=lambda f: 100 * f["task_accuracy"])
        sns.barplot(data=tasks, y="run", x="accuracy", ax=axes[3], color="seagreen", order=runs)
        _interval_bars(axes[3], tasks, "accuracy", "task_accuracy_ci_lo", "task_accuracy_ci_hi", runs, scale=100)
        axes[3].set_xlabel("benign task accuracy % (95 % CI)")
        axes[3].set_ylabel("")
    figure.suptitle(title, x=0.01, ha="left")
    figure.tight_layout()
    if judge_note:
        figure.text(0.01, -0.02, judge_note, fontsize=7, va="top", ha="left")
    return figure
