"""One GRPO training of a run: its prompts, reward functions, optional SFT warm start, and the trainer loop
(resumable from <run>/rl_checkpoints; the adapter is saved to <run>/adapter like an SFT run's)."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from emalib.core.errors import DataError
from emalib.data.registry import resolve
from emalib.data.rl_prompts import read_prompt_rows
from emalib.training.rl.rewards import gsm8k_answer, gsm8k_format
from emalib.training.rl.rewards_log import REWARDS_CSV, REWARDS_FIGURE, RewardLogCallback, plot_rewards, read_rewards

log = logging.getLogger(__name__)


def rl_prompts(params) -> list[dict]:
    """The run's prompt rows (system prompt applied), seeded shuffle, first rl.max_prompts."""
    import random

    rows = read_prompt_rows(resolve(params.rl.prompts), params.rl.system_prompt)
    random.Random(params.seed).shuffle(rows)
    return rows[: params.rl.max_prompts] if params.rl.max_prompts else rows


def drop_long_prompts(rows: list[dict], tokenizer, max_tokens: int | None) -> tuple[list[dict], int]:
    """Rows whose templated prompt fits max_tokens (TRL no longer truncates prompts), and how many were dropped."""
    if max_tokens is None:
        return rows, 0
    kept = [row for row in rows
            if len(tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=True,
                                                 return_dict=True)["input_ids"]) <= max_tokens]
    if not kept:
        raise DataError(f"rl.max_prompt_length: every prompt is longer than {max_tokens} tokens")
    return kept, len(rows) - len(kept)


def reward_functions(params, run_dir: Path) -> list:
    """The callables named in rl.rewards (TRL names each by its __name__)."""
    functions = []
    for name in params.rl.rewards:
        if name == "gsm8k_answer":
            functions.append(gsm8k_answer)
        elif name == "gsm8k_format":
            functions.append(gsm8k_format)
        else:
            from emalib.training.rl.grader import EmGraderReward

            functions.append(EmGraderReward.from_params(params, run_dir))
    return functions


def warm_start_params(params):
    """The run's params with `train` replaced by the warm start's own optimiser block (rl.warm_start): the released
    SFT config, not the GRPO optimiser settings of `train`."""
    from emalib.core.config import TrainParams

    spec = params.rl.warm_start
    train = TrainParams(**spec.model_dump(), train_on_responses_only=True, logging_steps=1)
    return params.model_copy(update={"train": train})


def warm_start(model, tokenizer, params, run_dir: Path) -> dict:
    """The short SFT before GRPO (rl.warm_start) on the same adapter; kept in <run>/warm_start/adapter, resumable
    from <run>/warm_start/checkpoints."""
    from emalib.data.chat import read_chat_jsonl
    from emalib.training.trainer import train_adapter

    spec = params.rl.warm_start
    return train_adapter(model, tokenizer, read_chat_jsonl(resolve(spec.dataset)), warm_start_params(params),
                         run_dir / "warm_start")


def train_grpo(model, tokenizer, rows: list[dict], params, run_dir: Path, defenses, ctx,
               sft_conversations: list | None = None) -> dict:
    """GRPO on `rows` with the run's defenses; writes rl_rewards.csv and its figure, saves the adapter."""
    from datasets import Dataset
    from transformers.trainer_utils import get_last_checkpoint
    from trl.trainer.utils import get_callable_name

    from emalib.training.rl.trainer import EmGRPOTrainer, build_sft_mix, grpo_config
    from emalib.training.trainer import StepProgress, save_adapter

    functions = reward_functions(params, run_dir)
    names = [get_callable_name(f) for f in functions]  # the names TRL logs them under
    defenses.setup(model, ctx)
    checkpoints = run_dir / "rl_checkpoints"
    trainer = EmGRPOTrainer(
        model=model, reward_funcs=functions, processing_class=tokenizer, train_dataset=Dataset.from_list(rows),
        args=grpo_config(params, checkpoints, next(model.parameters()).dtype),
        callbacks=[RewardLogCallback(run_dir / REWARDS_CSV, names), StepProgress(f"rl {run_dir.name}")],
        defenses=defenses, defense_ctx=ctx,
        sft_mix=build_sft_mix(params, tokenizer, sft_conversations) if sft_conversations is not None else None)
    resume_from = get_last_checkpoint(str(checkpoints)) if checkpoints.is_dir() else None
    if resume_from:
        log.info("resuming from %s", resume_from)
    result = trainer.train(resume_from_checkpoint=resume_from)
    save_adapter(model, tokenizer, run_dir / "adapter")
    shutil.rmtree(checkpoints, ignore_errors=True)
    figure = plot_rewards({params.run: read_rewards(run_dir / REWARDS_CSV)}, run_dir / REWARDS_FIGURE,
                          title=f"Mean GRPO reward: {params.run}")
    return {"train_loss": result.training_loss, "global_step": result.global_step, "n_prompts": len(rows),
            "reward_functions": names, "sft_terms": len(trainer.sft_terms), "resumed_from": resume_from,
            "figure": {k: str(v) for k, v in figure.items()}, "log_history": trainer.state.log_history}
