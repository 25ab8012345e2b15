"""The paper's figures from a study's runs (seaborn): Figure 1's trade-off over each method's strength, the
interleaving-ratio figure and the RL reward curves (the overview of every run: emalib.reporting.overview).
A planned point that did not run is named on the figure ("not run: ..."), never drawn as a zero. Every point carries
its 95 % interval, the better direction is written on its axis, and labels never cover each other (placement.py)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from emalib.core.errors import DataError
from emalib.reporting.cells import planned_or_run_pairs
from emalib.reporting.frame import METHODS, method_label
from emalib.reporting.style import pyplot
from emalib.reporting.table1 import Table1Rules, criterion_values

TRADEOFF_COLUMNS = ["model", "method", "strength", "label", "status", "em_reduction", "em_reduction_lo",
                    "em_reduction_hi", "incoherence_change", "incoherence_change_lo", "incoherence_change_hi",
                    "narrow_kept", "narrow_kept_lo", "narrow_kept_hi", "learns_well", "domains"]
# Figure 1's axes: the column, its label with the better direction, and the no-defense value (where it sits).
_PANELS = (("incoherence_change", "general incoherence vs no defense (points)\n↓ better", 0.0),
           ("narrow_kept", "in-domain misalignment kept (% of no defense)\n↑ better (still learns the narrow task)",
            100.0))
_REDUCTION_LABEL = "EM reduction vs no defense (%)   better →"
# The rates behind each criterion, whose 95 % intervals give the criterion's interval.
_RATES = ("general_misaligned", "in_domain_misaligned", "general_incoherent")


def tradeoff_points(cells: pd.DataFrame, planned: pd.DataFrame, model: str, rules: Table1Rules | None = None,
                    judge_free: bool = False) -> pd.DataFrame:
    """Figure 1's points: per defense and strength (ran or planned), the mean EM reduction (%), the change of general
    incoherence (points) and the in-domain misalignment kept (%) against no defense, over the EM domains; each with
    a 95 % interval (_lo/_hi) from the defense runs' own intervals (see _criterion_bounds)."""
    rules = rules or Table1Rules()
    rows = []
    for method, strength in planned_or_run_pairs((planned, cells), lambda f: (f["model"] == model) & f["task"].isna()
                                             & ~f["method"].isin(["aligned", "none"])):
        row = {"model": model, "method": method, "strength": strength, "label": method_label(method, strength),
               **_criterion_columns(cells, model, method, strength, rules, judge_free)}
        row.update(_criterion_bounds(cells, model, method, strength, rules, judge_free))
        rows.append(row)
    return pd.DataFrame(rows, columns=TRADEOFF_COLUMNS)


def _criterion_columns(cells, model, method, strength, rules, judge_free) -> dict:
    values = criterion_values(cells, model, method, strength, rules, judge_free)
    no_em, domains, status = values["no_em"]
    coherent, narrow, learns = values["coherent"][0], values["narrow_misalignment"][0], values["learns_well"][0]
    return {"status": "done" if status == "ok" else status, "domains": domains,
            "em_reduction": None if no_em is None else 100 * no_em, "incoherence_change": coherent,
            "narrow_kept": None if narrow is None else 100 * narrow,
            "learns_well": None if learns is None else 100 * learns}


def _criterion_bounds(cells, model, method, strength, rules, judge_free: bool) -> dict:
    """The criteria computed with the defense's rates (judge-free: its log-likelihood gap) at their 95 % interval
    ends, no defense's held at its value (whose own interval the main tables show): the upper end of the misaligned
    rate gives the lower end of the reduction, and so on. Averaged over domains like the value itself."""
    bounds = {}
    for side in ("lo", "hi"):
        swapped = cells.copy()
        mine = (swapped["method"] == method) & _same_strength(swapped["strength"], strength)
        for rate in ("loglik_gap",) if judge_free else _RATES:
            swapped.loc[mine, rate] = swapped.loc[mine, f"{rate}_{side}"]
        bounds[side] = _criterion_columns(swapped, model, method, strength, rules, judge_free)
    return {"em_reduction_lo": bounds["hi"]["em_reduction"], "em_reduction_hi": bounds["lo"]["em_reduction"],
            "incoherence_change_lo": bounds["lo"]["incoherence_change"],
            "incoherence_change_hi": bounds["hi"]["incoherence_change"],
            "narrow_kept_lo": bounds["lo"]["narrow_kept"], "narrow_kept_hi": bounds["hi"]["narrow_kept"]}


def _same_strength(strengths: pd.Series, strength) -> pd.Series:
    if strength is None or pd.isna(strength):
        return strengths.isna()
    return (strengths.astype(float) - float(strength)).abs() < 1e-12


def aligned_reference(cells: pd.DataFrame, model: str, rules: Table1Rules | None = None) -> dict[str, float | None]:
    """Where the aligned model (the base evaluations) sits on Figure 1's axes, against no defense."""
    values = _criterion_columns(cells, model, "aligned", None, rules or Table1Rules(), False)
    return {key: values[key] for key in ("em_reduction", "incoherence_change", "narrow_kept")}


def _missing_note(axis, labels: list[str], statuses: list[str], below: float = -0.22) -> None:
    """Under the axis, per reason ('not run', 'n/a', ...), the points that have no value."""
    groups: dict[str, list[str]] = {}
    for label, status in zip(labels, statuses):
        if status != "done":
            groups.setdefault(status, []).append(label)
    text = "\n".join(f"{status}: " + "; ".join(names) for status, names in groups.items())
    if text:
        axis.text(0.0, below, text, transform=axis.transAxes, fontsize=7, va="top", wrap=True)


def _method_label(method: str) -> str:
    return METHODS[method].label if method in METHODS else method


def figure1(points: pd.DataFrame, model: str, judge_free: bool = False, reference: dict | None = None):
    """Two panels: EM reduction against the change of incoherence, and against the narrow misalignment kept; one line
    per method through its strengths, each point with its 95 % interval and labelled with its strength where no
    other label is. Dotted lines: no defense; dashed: the aligned model (`reference`, aligned_reference). A point
    far left of the others (Tukey's far-out fence, placement.far_limit) is drawn at the axis's edge as ◀ with its
    value in its label, so the range shows where most methods are. Judge-free (no judged EM to reduce), one panel:
    the reduction read from the log-likelihood gap per method and strength, since coherence and narrow
    misalignment need a judge."""
    if judge_free:
        return _figure1_judge_free(points, model)
    plt, sns = pyplot()
    from emalib.reporting.placement import far_limit, place_labels

    reference = reference or {}
    drawn = points[points["status"] == "done"]
    low = far_limit(list(drawn["em_reduction"].astype(float)))
    shown_x = points["em_reduction"].astype(float)
    far = shown_x < low if low is not None else pd.Series(False, index=points.index)
    edge = None if low is None else low + 0.02 * (100 - low)
    if low is not None:
        shown_x = shown_x.where(~far, edge)
    points = points.assign(shown_x=shown_x, far=far)
    palette = dict(zip(dict.fromkeys(points["method"]), sns.color_palette(n_colors=max(points["method"].nunique(), 1))))
    figure, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for axis, (column, ylabel, no_defense) in zip(axes, _PANELS):
        _tradeoff_panel(axis, points, column, palette, no_defense, reference.get(column), reference.get("em_reduction"))
        axis.set_xlabel(_REDUCTION_LABEL)
        axis.set_ylabel(ylabel)
        if low is not None:
            axis.set_xlim(left=low)
        axis.set_xlim(right=max(105.0, axis.get_xlim()[1]))
    handles, labels = axes[0].get_legend_handles_labels()
    legend = axes[1].legend(handles, labels, loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8,
                            title="next to a point: its strength", title_fontsize=7)
    _missing_note(axes[0], list(points["label"]), list(points["status"]), below=-0.26)
    figure.suptitle(f"Figure 1, {model}: EM reduction against coherence and narrow learning (mean over EM domains, "
                    f"95 % intervals)")
    figure.tight_layout()
    for axis, (column, _, _) in zip(axes, _PANELS):
        labelled = points[(points["status"] == "done")].dropna(subset=["em_reduction", column])
        place_labels(axis, [(row["shown_x"], row[column], _strength_text(row)) for _, row in labelled.iterrows()],
                     obstacles=[*legend.get_texts()])
    return figure


def _strength_text(point) -> str:
    strength = point["strength"]
    text = "" if strength is None or pd.isna(strength) else f"{strength:g}"
    if point["far"]:
        text = f"{text} ({point['em_reduction']:.0f} %, off scale)".strip()
    return text


def _tradeoff_panel(axis, points, column, palette, no_defense, aligned_y, aligned_x) -> None:
    axis.axvline(0, color="0.35", linewidth=0.9, linestyle=":", label="no defense")
    axis.axhline(no_defense, color="0.35", linewidth=0.9, linestyle=":")
    if aligned_x is not None and not pd.isna(aligned_x):
        axis.axvline(aligned_x, color="firebrick", linewidth=0.9, linestyle="--", label="aligned model")
    if aligned_y is not None and not pd.isna(aligned_y):
        axis.axhline(aligned_y, color="firebrick", linewidth=0.9, linestyle="--")
    for method, group in points.groupby("method", sort=False):
        color = palette[method]
        # Every point of a method in strength order, a missing one as NaN: the line breaks there.
        axis.plot(group["shown_x"], group[column].astype(float), marker="o", color=color, label=_method_label(method))
        for _, point in group[group["status"] == "done"].dropna(subset=["em_reduction", column]).iterrows():
            if point["far"]:
                axis.plot(point["shown_x"], point[column], marker="<", markersize=9, color=color)
            xerr = None if point["far"] else _error(point, "em_reduction")
            yerr = _error(point, column)
            if xerr is not None or yerr is not None:
                axis.errorbar(point["shown_x"], point[column], xerr=xerr, yerr=yerr, color=color, linewidth=0.8,
                              capsize=2, alpha=0.7)


def _error(point, column: str):
    low, high = point.get(f"{column}_lo"), point.get(f"{column}_hi")
    if low is None or high is None or pd.isna(low) or pd.isna(high):
        return None
    low, high = min(low, high), max(low, high)  # the ends of a ratio can swap when no defense's rate is tiny
    return [[max(point[column] - low, 0.0)], [max(high - point[column], 0.0)]]


def _figure1_judge_free(points: pd.DataFrame, model: str):
    """One row per method and strength: the reduction of the log-likelihood gap's shift (100 % = back at the
    aligned model), with its interval from the gap's."""
    plt, sns = pyplot()
    from emalib.reporting.placement import far_limit

    drawn = points[points["status"] == "done"].copy()
    drawn["method label"] = [_method_label(m) for m in drawn["method"]]
    figure, axis = plt.subplots(figsize=(7, 1.9 + 0.3 * len(points)))
    low = far_limit(list(drawn["em_reduction"].astype(float)))
    if not drawn.empty:
        far = drawn["em_reduction"] < low if low is not None else pd.Series(False, index=drawn.index)
        drawn["shown"] = drawn["em_reduction"].where(~far, low if low is None else low + 0.02 * (100 - low))
        sns.scatterplot(data=drawn, x="shown", y="label", hue="method label", ax=axis, s=60, legend=False)
        for _, point in drawn[~far].iterrows():
            error = _error(point, "em_reduction")
            if error is not None:
                axis.errorbar(point["shown"], point["label"], xerr=error, color="0.2", capsize=2, linewidth=0.8)
        for _, point in drawn[far].iterrows():
            axis.annotate(f"◀ {point['em_reduction']:.0f} % (off scale)", (point["shown"], point["label"]),
                          xytext=(8, 0),
                          textcoords="offset points", va="center", fontsize=7)
        if low is not None:
            axis.set_xlim(left=low)
    axis.axvline(0, color="0.35", linewidth=0.9, linestyle=":")
    axis.axvline(100, color="firebrick", linewidth=0.9, linestyle="--")
    axis.set_xlabel("EM reduction vs no defense (%), from the log-likelihood gap (judge-free)   better →\n"
                    "dotted: no defense; dashed: the aligned model")
    axis.set_ylabel("")
    _missing_note(axis, list(points["label"]), list(points["status"]), below=-0.12 - 0.5 / max(len(points), 1))
    figure.suptitle(f"Figure 1, {model}, judge-free (95 % intervals): coherence and narrow learning need a judged study")
    return figure


def _lines(axis, points: pd.DataFrame, x: str, y: str, palette) -> None:
    """One line per method through its points in order, with markers; a point without a value (not run) is NaN, so
    the line has a gap there rather than joining the points either side of it."""
    for color, (method, group) in zip(palette, points.groupby("method", sort=False)):
        axis.plot(group[x].astype(float), group[y].astype(float), marker="o", color=color,
                  label=_method_label(method))


def ratio_figure(sweep: pd.DataFrame, no_defense: dict[str, float | None], model: str,
                 aligned: dict[str, float | None] | None = None):
    """General misalignment and incoherence (%) against the interleaving ratio for random interleaving, + and ++,
    each point with its interval (the mean over domains of the runs' 95 % interval ends); no defense's level as a
    dotted line, the aligned model's as a dashed one."""
    plt, sns = pyplot()
    aligned = aligned or {}
    figure, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    points = sweep.sort_values(["method", "ratio"]).assign(ratio_percent=lambda f: 100 * f["ratio"])
    ratios = sorted(points["ratio_percent"].unique())
    # Each variant a little aside (a few % on the log axis), so intervals at the same ratio do not hide each other.
    variants = list(dict.fromkeys(points["method"]))
    points["ratio_percent"] *= [10 ** (0.012 * (variants.index(m) - (len(variants) - 1) / 2)) for m in points["method"]]
    for axis, metric, title in zip(axes, ("general_misaligned", "general_incoherent"),
                                   ("general misaligned %   ↓ better", "general incoherent %   ↓ better")):
        palette = sns.color_palette(n_colors=max(points["method"].nunique(), 1))
        _lines(axis, points, "ratio_percent", metric, palette)
        for color, (_, group) in zip(palette, points.groupby("method", sort=False)):
            for _, point in group.dropna(subset=[metric]).iterrows():
                error = _error(point, metric)
                if error is not None:
                    axis.errorbar(point["ratio_percent"], point[metric], yerr=error, color=color, capsize=2,
                                  linewidth=0.8, alpha=0.7)
        if no_defense.get(metric) is not None:
            axis.axhline(no_defense[metric], color="0.35", linestyle=":", label="no defense")
        if aligned.get(metric) is not None:
            axis.axhline(aligned[metric], color="firebrick", linestyle="--", linewidth=0.9, label="aligned model")
        if points[metric].notna().any():  # a log axis needs at least one value (a sweep may have none yet)
            axis.set_xscale("log")
        axis.set_xticks(ratios, [f"{r:g}" for r in ratios])
        axis.minorticks_off()
        axis.set_xlabel("safe data added (% of the fine-tuning set)")
        axis.set_ylabel(title)
    handles, labels = axes[0].get_legend_handles_labels()
    axes[1].legend(handles, labels, loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8)
    _missing_note(axes[0], [f"{label} {100 * ratio:g} %" for label, ratio in zip(sweep["label"], sweep["ratio"])],
                  list(sweep["status"]))
    figure.suptitle(f"{model}: interleaving ratio (mean over EM domains, 95 % intervals)")
    figure.tight_layout()
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
