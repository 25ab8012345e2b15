"""The reward log of an RL run: <run>/rl_rewards.csv, one row per optimizer step, and its figure (the paper's
Figures 2-3: mean GRPO reward against step).

Columns: step, reward_mean, reward_std (the summed, weighted reward over the step's completions), then
reward_<function>_mean and reward_<function>_std per reward function, kl (beta > 0), sft_loss (steps with an SFT
term), completion_length (mean tokens). A resumed run first drops the rows past its checkpoint, so every step
appears once.
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
from transformers import TrainerCallback

from emalib.core.io import atomic_write_text, save_figure

REWARDS_CSV = "rl_rewards.csv"
REWARDS_FIGURE = "rl_rewards"


def reward_columns(reward_names: list[str]) -> list[str]:
    per_function = [f"reward_{name}_{stat}" for name in reward_names for stat in ("mean", "std")]
    return ["step", "reward_mean", "reward_std", *per_function, "kl", "sft_loss", "completion_length"]


def row_from_logs(step: int, logs: dict, reward_names: list[str]) -> dict:
    """One csv row from a TRL log entry ('reward', 'reward_std', 'rewards/<f>/mean', 'kl', ...)."""
    row = {"step": step, "reward_mean": logs.get("reward"), "reward_std": logs.get("reward_std"),
           "kl": logs.get("kl"), "sft_loss": logs.get("sft_loss"),
           "completion_length": logs.get("completions/mean_length")}
    for name in reward_names:
        row[f"reward_{name}_mean"] = logs.get(f"rewards/{name}/mean")
        row[f"reward_{name}_std"] = logs.get(f"rewards/{name}/std")
    return {key: (None if isinstance(value, float) and math.isnan(value) else value) for key, value in row.items()}


def read_rewards(path: str | Path) -> pd.DataFrame:
    return pd.read_csv(path)


class RewardLogCallback(TrainerCallback):
    """Appends a row to the csv at every log of a training step (logging_steps=1: every optimizer step)."""

    def __init__(self, path: Path, reward_names: list[str]):
        self.path, self.reward_names = Path(path), list(reward_names)
        self.columns = reward_columns(self.reward_names)

    def _write(self, frame: pd.DataFrame) -> None:
        atomic_write_text(self.path, frame.reindex(columns=self.columns).to_csv(index=False))

    def on_train_begin(self, args, state, control, **kwargs):
        frame = read_rewards(self.path) if self.path.is_file() else pd.DataFrame(columns=self.columns)
        self._write(frame[frame["step"] <= state.global_step])

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or "reward" not in logs:
            return
        frame = read_rewards(self.path)
        row = pd.DataFrame([row_from_logs(state.global_step, logs, self.reward_names)])
        self._write(row if frame.empty else pd.concat([frame, row], ignore_index=True))


def rewards_figure(curves: dict[str, pd.DataFrame], title: str = "Mean GRPO reward"):
    """Mean reward (band: +- one std over the step's completions) against step, one line per run (seaborn)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    sns.set_theme(style="whitegrid")
    figure, axis = plt.subplots(figsize=(6, 4))
    for label, frame in curves.items():
        frame = frame.dropna(subset=["reward_mean"])
        sns.lineplot(x=frame["step"], y=frame["reward_mean"], ax=axis, label=label, marker="o", markersize=3)
        if "reward_std" in frame:
            std = frame["reward_std"].fillna(0)
            axis.fill_between(frame["step"], frame["reward_mean"] - std, frame["reward_mean"] + std, alpha=0.15)
    axis.set_xlabel("GRPO step")
    axis.set_ylabel("mean reward   ↑ better\n(band: ± 1 std over the step's completions)")
    axis.set_title(title)
    figure.tight_layout()
    return figure


def plot_rewards(curves: dict[str, pd.DataFrame], path_stem: str | Path, title: str = "Mean GRPO reward") -> dict:
    """rewards_figure written as <path_stem>.png and .pdf; returns both paths."""
    stem = Path(path_stem)
    return save_figure(rewards_figure(curves, title), stem.parent, stem.name, dpi=120)


def plot_run_rewards(run_dirs: dict[str, str | Path], path_stem: str | Path, title: str = "Mean GRPO reward") -> dict:
    """The figure of several runs' rl_rewards.csv side by side (label -> run folder)."""
    return plot_rewards({label: read_rewards(Path(d) / REWARDS_CSV) for label, d in run_dirs.items()}, path_stem,
                        title)


def plot_study_rewards(study_dir: str | Path) -> dict:
    """Every RL run of a study (each <run>/rl_rewards.csv) in one figure: <study>/figures/rl_rewards.png / .pdf;
    returns both paths and the runs plotted."""
    study_dir = Path(study_dir)
    runs = {path.parent.name: path.parent for path in sorted(study_dir.glob(f"*/{REWARDS_CSV}"))}
    if not runs:
        from emalib.core.errors import DataError

        raise DataError(f"{study_dir}: no RL runs (no */{REWARDS_CSV})")
    paths = plot_run_rewards(runs, study_dir / "figures" / REWARDS_FIGURE, title=f"Mean GRPO reward: {study_dir.name}")
    return {**paths, "runs": list(runs)}
