"""What each run is called on a figure: its method and strength from the study's axes ("KL (λ=0.1)"), grouped by
the EM domain or benign task it was fine-tuned on, never its folder name (base-smollm2-135m-instruct-3f7d9ab3)."""

from __future__ import annotations

import pandas as pd

from emalib.reporting.frame import METHODS, method_label, results_frame

LABEL_COLUMNS = ["run", "group", "label", "method", "strength", "order"]


def run_labels(index: pd.DataFrame, runs: list[str]) -> pd.DataFrame:
    """One row per run in `runs`: its group ("EM: code", "task: opswap_tier1", with the model when the study has
    several), its label, and its place in the figure's order (EM domains first, then benign tasks; in each group
    the aligned model, no defense, then the defenses in the paper's order and by strength). A run the index does
    not know keeps its folder name, in a group of its own."""
    known = _known_rows(index)
    several_models = known["model"].nunique() > 1
    rows = []
    for run in runs:
        if run not in known.index:
            rows.append({"run": run, "group": "other", "label": run, "method": None, "strength": None,
                         "kind_rank": 2, "group_key": "~other"})
            continue
        row = known.loc[run]
        is_task = isinstance(row["task"], str)
        name = row["task"] if is_task else row["domain"]
        group = f"{'task' if is_task else 'EM'}: {name}" + (f" ({row['model']})" if several_models else "")
        rows.append({"run": run, "group": group, "label": method_label(row["method"], row["strength"]),
                     "method": row["method"], "strength": row["strength"], "seed": row["seed"],
                     "kind_rank": int(is_task), "group_key": f"{row['model']}|{int(is_task)}|{name}"})
    frame = pd.DataFrame(rows)
    if frame.empty:
        return pd.DataFrame(columns=LABEL_COLUMNS)
    method_rank = {method: rank for rank, method in enumerate(METHODS)}
    frame["method_rank"] = [method_rank.get(m, len(method_rank)) for m in frame["method"]]
    frame["strength_key"] = pd.to_numeric(frame["strength"], errors="coerce").fillna(-1.0)
    frame = frame.sort_values(["kind_rank", "group_key", "method_rank", "strength_key", "run"], kind="stable")
    frame["label"] = _unique_within_groups(frame)
    frame["order"] = range(len(frame))
    return frame[LABEL_COLUMNS].reset_index(drop=True)


def _known_rows(index: pd.DataFrame) -> pd.DataFrame:
    if index is None or index.empty or "node" not in index:
        return pd.DataFrame(columns=["model", "domain", "task", "method", "strength", "seed"])
    frame = results_frame(index).drop_duplicates("node").set_index("node")
    return frame[["model", "domain", "task", "method", "strength", "seed"]]


def _unique_within_groups(frame: pd.DataFrame) -> list[str]:
    """Two runs of one group with the same method and strength differ by seed, else by folder name."""
    duplicated = frame.duplicated(["group", "label"], keep=False)
    if "seed" in frame:
        seeds = [f"{label}, seed {seed:g}" if dup and seed is not None and not pd.isna(seed) else label
                 for label, seed, dup in zip(frame["label"], frame["seed"], duplicated)]
        frame = frame.assign(label=seeds)
        duplicated = frame.duplicated(["group", "label"], keep=False)
    return [f"{label} [{run}]" if dup else label for label, run, dup in zip(frame["label"], frame["run"], duplicated)]
