"""The overview figure of a study (and of the quickstart): one row per run, named by method and strength and grouped
by EM domain or benign task, with the judge-free signals first, the judged rates when the judge can tell answers
apart, and benign-task accuracy; every value with its 95 % interval and the aligned model's value as a line."""

from __future__ import annotations

import pandas as pd

from emalib.reporting.labels import run_labels
from emalib.reporting.style import pyplot

# (column, its interval's columns' stem, x label with the better direction, colour, scale to the shown unit).
# A further judge-free column (a rate, say) joins as one more entry here.
SIGNAL_PANELS = (
    ("loglik_gap", "loglik_gap_ci", "log-lik. gap, misaligned − aligned\n(nats/token)   ← better", "slategray", 1),
    ("kl_to_base", "kl_to_base_ci", "KL to the base model\n(nats/token)   ← closer to base", "slategray", 1),
)
TASK_PANEL = ("task_accuracy", "task_accuracy_ci", "benign task accuracy %\nbetter →", "seagreen", 100)
JUDGED = (("misaligned", "steelblue"), ("incoherent", "peru"))
ALL_INCOHERENT = 0.95  # a judge that calls at least this share of every run's answers incoherent tells nothing apart
REFERENCE = {"color": "firebrick", "linestyle": "--", "linewidth": 1.0}


def judged_rates_verdict(overall: pd.DataFrame) -> str | None:
    """None when the judged rates can be shown; else why not, for the panel that stands in for them."""
    incoherent = overall["incoherent_rate"].dropna()
    if not incoherent.empty and (incoherent >= ALL_INCOHERENT).all():
        return (f"not drawn: the judge called\n≥ {100 * ALL_INCOHERENT:.0f} % of the answers incoherent\n"
                f"in every run, so it tells no\nanswers apart here\n(its rates are in the table)")
    return None


def overview_figure(frame: pd.DataFrame, title: str, judge_note: str = "", index: pd.DataFrame | None = None,
                    judge_caveat: str = ""):
    """`frame`: the report's overview numbers (a row per run and question set, intervals as _ci_lo/_ci_hi);
    `index`: the study's index, which names each run (labels.run_labels); `judge_caveat`: a short line on the
    judge's reliability, written over the judged panel (e.g. that it is a toy)."""

    plt, _ = pyplot()
    overall = frame[frame["question_set"] == "all"].drop_duplicates("run").set_index("run")
    labels = run_labels(index, list(overall.index))
    rows = _rows(labels)
    has_judged = overall["misaligned_rate"].notna().any()
    has_tasks = overall["task_accuracy"].notna().any()
    panels = [*SIGNAL_PANELS, *(["judged"] if has_judged else []), *([TASK_PANEL] if has_tasks else [])]
    figure, axes = plt.subplots(1, len(panels), figsize=(3.4 * len(panels) + 1.5, 2.2 + 0.27 * len(rows)),
                                sharey=True, squeeze=False)
    axes = list(axes[0])
    for axis, panel in zip(axes, panels):
        if panel == "judged":
            _judged_panel(axis, overall, rows, judge_caveat)
        else:
            _value_panel(axis, overall, rows, *panel)
        _groups(axis, rows)
    axes[0].set_yticks(range(len(rows)), [row["text"] for row in rows])
    for tick, row in zip(axes[0].get_yticklabels(), rows):
        tick.set_fontweight("bold" if row["header"] else "normal")
    axes[0].set_ylim(len(rows) - 0.5, -0.7)
    axes[0].set_title("judge-free signals", loc="left", fontsize=9)
    handles = {label: handle for axis in axes for handle, label in zip(*axis.get_legend_handles_labels())}
    figure.suptitle(title, x=0.01, ha="left", fontsize=11)
    figure.tight_layout(rect=(0, 0, 1, 1 - 0.3 / figure.get_figheight()))  # the top 0.3 in: title and legend
    if handles:  # none when no panel drew a marked value (a study whose runs all lack the signals)
        figure.legend(handles.values(), handles.keys(), loc="upper right", ncol=len(handles), fontsize=8,
                      frameon=False)
    if judge_note:
        figure.text(0.01, 0.0, judge_note, fontsize=7, va="top", ha="left")
    return figure


def _rows(labels: pd.DataFrame) -> list[dict]:
    """The figure's rows top to bottom: a bold header per group, then its runs."""
    rows = []
    for group, members in labels.groupby("group", sort=False):
        rows.append({"header": True, "text": group, "run": None, "method": None, "group": group})
        rows += [{"header": False, "text": row["label"], "run": row["run"], "method": row["method"], "group": group}
                 for _, row in members.iterrows()]
    return rows


def _interval(overall, run, stem, scale):
    low, high = overall.at[run, f"{stem}_lo"], overall.at[run, f"{stem}_hi"]
    if low is None or high is None or pd.isna(low) or pd.isna(high):
        return None
    return scale * float(low), scale * float(high)


def _value_panel(axis, overall, rows, column, stem, xlabel, color, scale) -> None:
    for y, row in enumerate(rows):
        if row["header"] or pd.isna(overall.at[row["run"], column]):
            continue
        value = scale * float(overall.at[row["run"], column])
        axis.barh(y, value, color=color, height=0.7)
        interval = _interval(overall, row["run"], stem, scale)
        if interval is not None:
            axis.errorbar(value, y, xerr=[[value - interval[0]], [interval[1] - value]], color="black", capsize=2,
                          linewidth=0.8)
    _aligned_lines(axis, overall, rows, lambda run: overall.at[run, column] * scale)
    axis.axvline(0, color="0.3", linewidth=0.6)
    axis.set_xlabel(xlabel)


def _judged_panel(axis, overall, rows, caveat: str) -> None:
    why_not = judged_rates_verdict(overall)
    title = "judged rates" + (f"\n({caveat})" if caveat else "")
    axis.set_title(title, loc="left", fontsize=9)
    axis.set_xlabel("% of judged answers   ← better")
    if why_not:
        axis.text(0.5, 0.5, why_not, transform=axis.transAxes, ha="center", va="center", fontsize=8, wrap=True)
        axis.set_xticks([])
        return
    for offset, (metric, color) in zip((-0.19, 0.19), JUDGED):
        drawn = False
        for y, row in enumerate(rows):
            if row["header"] or pd.isna(overall.at[row["run"], f"{metric}_rate"]):
                continue
            value = 100 * float(overall.at[row["run"], f"{metric}_rate"])
            axis.barh(y + offset, value, height=0.36, color=color, label=None if drawn else metric)
            drawn = True
            interval = _interval(overall, row["run"], f"{metric}_rate_ci", 100)
            if interval is not None:
                axis.errorbar(value, y + offset, xerr=[[value - interval[0]], [interval[1] - value]], color="black",
                              capsize=1.5, linewidth=0.7)
    _aligned_lines(axis, overall, rows, lambda run: 100 * overall.at[run, "misaligned_rate"])
    axis.set_xlim(left=0)


def _aligned_lines(axis, overall, rows, value_of) -> None:
    """Per group with an aligned (base) evaluation, its value as a dashed line down the group's rows."""
    labelled = False
    for group in dict.fromkeys(row["group"] for row in rows):
        ys = [y for y, row in enumerate(rows) if row["group"] == group]
        aligned = [row["run"] for row in rows if row["group"] == group and row["method"] == "aligned"]
        value = value_of(aligned[0]) if aligned else None
        if value is None or pd.isna(value):
            continue
        axis.vlines(value, min(ys) + 0.5, max(ys) + 0.5, label=None if labelled else "aligned model (base)",
                    **REFERENCE)
        labelled = True


def _groups(axis, rows) -> None:
    for y, row in enumerate(rows):
        if row["header"] and y > 0:
            axis.axhline(y - 0.5, color="0.6", linewidth=0.6)
    axis.grid(axis="y", visible=False)
