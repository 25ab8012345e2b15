"""The defense comparison as one figure: a panel per metric, a row per defense, each value with its 95 % interval
and the published value beside it as a red cross; a value that is missing is named in the panel, never drawn."""

from __future__ import annotations

import numpy as np
import pandas as pd

from emalib.reporting.comparison import SIGNALS, metric_title


def comparison_figure(numbers: pd.DataFrame, model: str, domain: str, note: str = ""):
    from emalib.reporting.style import pyplot

    plt, _ = pyplot()
    metrics = list(dict.fromkeys(numbers["metric"]))
    labels = list(dict.fromkeys(numbers["label"]))  # run order, top to bottom
    columns = min(4, len(metrics))
    panel_rows = -(-len(metrics) // columns)
    height = 0.32 * len(labels) + 1.3
    figure, axes = plt.subplots(panel_rows, columns, figsize=(4.0 * columns, height * panel_rows + 0.6),
                                sharey=True, squeeze=False)
    y_of = {label: i for i, label in enumerate(labels)}
    for axis, metric in zip(axes.flat, metrics):
        rows = numbers[numbers["metric"] == metric]
        drawn = rows[rows["value"].notna()]
        y = drawn["label"].map(y_of).to_numpy(dtype=float)
        value = drawn["value"].to_numpy(dtype=float)
        has_ci = drawn["lo"].notna().to_numpy()
        lo = np.where(has_ci, value - drawn["lo"].to_numpy(dtype=float, na_value=np.nan), 0.0)
        hi = np.where(has_ci, drawn["hi"].to_numpy(dtype=float, na_value=np.nan) - value, 0.0)
        axis.errorbar(value, y, xerr=np.vstack([np.nan_to_num(lo), np.nan_to_num(hi)]), fmt="o", color="tab:blue",
                      ecolor="tab:blue", elinewidth=1.2, capsize=3, markersize=5, label="emalib (95 % CI)")
        paper = rows[rows["paper"].notna()]
        if not paper.empty:
            axis.plot(paper["paper"].astype(float), paper["label"].map(y_of).astype(float) + 0.25, "x",
                      color="tab:red", markersize=6, label="published")
        for _, row in rows[rows["value"].isna()].iterrows():
            axis.text(0.02, y_of[row["label"]], "not run" if row["status"] == "not run" else "n/a",
                      transform=axis.get_yaxis_transform(), fontsize=7, color="gray", va="center")
        if metric in ("step_time", "peak_memory"):
            axis.axvline(1.0, color="gray", linewidth=0.8, linestyle="--")  # plain SFT
        elif metric in SIGNALS:
            aligned = rows.loc[rows["method"] == "aligned", "value"].dropna()
            if not aligned.empty:  # the aligned model's value, as the overview figure marks it
                axis.axvline(float(aligned.iloc[0]), color="tab:red", linewidth=0.8, linestyle="--")
        else:  # rates and EM-F1 from 0, so that a zero reads as a zero and not as the middle of the axis
            ends = pd.concat([rows["value"], rows["hi"], rows["paper"]]).dropna().astype(float)
            top = 100.0 if metric == "em_f1" or ends.empty else max(1.0, float(ends.max()) * 1.08)
            axis.set_xlim(-0.02 * top, top)
        axis.set_title(metric_title(metric), fontsize=9)
        axis.tick_params(labelsize=7)
        axis.set_ylim(len(labels) - 0.5, -0.5)
    for axis in axes.flat[len(metrics):]:
        axis.axis("off")
    axes[0][0].set_yticks(range(len(labels)), labels)
    handles, names = axes.flat[0].get_legend_handles_labels()
    for axis in axes.flat[1:len(metrics)]:  # the published marker may be in any panel
        for handle, name in zip(*axis.get_legend_handles_labels()):
            if name not in names:
                handles.append(handle)
                names.append(name)
    figure.legend(handles, names, loc="lower right", fontsize=8, frameon=False)
    figure.suptitle(f"Defenses side by side: {model}, {domain}", fontsize=10)
    note_inches = 0.15 + 0.13 * (note.count("\n") + 1) if note else 0.25  # the note (and the legend) at the foot
    figure.tight_layout(rect=(0, note_inches / figure.get_figheight(), 1, 1 - 0.3 / figure.get_figheight()))
    if note:
        figure.text(0.01, 0.01, note, fontsize=7, va="bottom", ha="left")
    return figure
