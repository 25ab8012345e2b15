"""What each run is called on a figure: its method and strength from the study's axes ("KL (λ=0.1)"), grouped by
the EM domain or benign task it was fine-tuned on, never its folder name (base-smollm2-135m-instruct-3f7d9ab3); and
what a figure says of the judge that scored the runs (`judge_note`, `judge_caveat`)."""

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
    frame["label"] = _unique_within_groups(frame, _axes(index))
    frame["order"] = range(len(frame))
    return frame[LABEL_COLUMNS].reset_index(drop=True)


def _known_rows(index: pd.DataFrame) -> pd.DataFrame:
    if index is None or index.empty or "node" not in index:
        return pd.DataFrame(columns=["model", "domain", "task", "method", "strength", "seed"])
    frame = results_frame(index).drop_duplicates("node").set_index("node")
    return frame[["model", "domain", "task", "method", "strength", "seed"]]


def _axes(index: pd.DataFrame) -> pd.DataFrame:
    """node -> the study's axis labels of its cell (columns axis.<name>)."""
    if index is None or index.empty or "node" not in index:
        return pd.DataFrame()
    columns = [c for c in index.columns if c.startswith("axis.")]
    return index.drop_duplicates("node").set_index("node")[columns]


def _unique_within_groups(frame: pd.DataFrame, axes: pd.DataFrame) -> list[str]:
    """Two runs of one group with the same method and strength differ by seed, else by the study's axes on which
    their cells differ ("KL (λ=0.1), lr=high"), else by folder name."""
    labels = list(frame["label"])
    for _, same in frame.groupby(["group", "label"], sort=False):
        if len(same) < 2:
            continue
        seeds = same["seed"] if "seed" in same else pd.Series(None, index=same.index)
        if seeds.notna().all() and seeds.nunique() == len(same):
            extra = {i: f"seed {seed:g}" for i, seed in seeds.items()}
        else:
            known = axes.reindex(same["run"])
            differing = [c for c in known.columns if known[c].nunique(dropna=False) > 1]
            extra = {i: ", ".join(f"{c.removeprefix('axis.')}={known.at[run, c]}" for c in differing)
                     for i, run in zip(same.index, same["run"])}
            if not differing or len(set(extra.values())) < len(same):
                extra = {i: f"[{run}]" for i, run in zip(same.index, same["run"])}
        for i in same.index:
            labels[frame.index.get_loc(i)] += f", {extra[i]}"
    return labels


def judge_note(index: pd.DataFrame) -> str:
    """What the runs' judge can show, for the overview figure: the embedded toy judge is named as such."""
    if index.empty or "params.judge.model" not in index:
        return ""
    judges = set(zip(index["params.judge.backend"], index["params.judge.model"]))
    if any(backend == "local" and model == "smollm2-135m-instruct" for backend, model in judges):
        return ("judge: the embedded 135M model, a toy that shows the loop runs, not whether answers are misaligned;\n"
                "read the judge-free signals, or set judge.backend/base_url/model to a real judge")
    return "judge: " + ", ".join(sorted(f"{model} ({backend})" for backend, model in judges))


def judge_caveat(index: pd.DataFrame) -> str:
    """The judged panel's warning when the runs were judged by the embedded toy judge."""
    if index.empty or "params.judge.model" not in index:
        return ""
    judges = set(zip(index["params.judge.backend"], index["params.judge.model"]))
    return "toy 135M judge: not a measure of misalignment" if ("local", "smollm2-135m-instruct") in judges else ""
