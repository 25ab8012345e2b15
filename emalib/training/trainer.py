"""The one trainer: a `transformers.Trainer` whose loss is cross-entropy on assistant tokens (from the final
hidden states, a chunk at a time, unless a defense reads the policy's logits: emalib/model/hidden_loss.py), plus the weighted loss terms of the run's defenses.

The HF Trainer supplies the optimizer, the linear schedule with warmup, gradient accumulation, the progress bar,
checkpoints and resuming. This subclass only owns the loss and the logging of its terms. Token losses are
summed and divided by the number of labelled tokens in the whole accumulated batch (`num_items_in_batch`), so
the result does not depend on how the batch is split into micro-batches. Defense terms are per-micro-batch means
(the paper's per-batch formulas), so their weighted sum is divided by the number of micro-batches per step.

Per micro-batch: at most one reference forward (adapter disabled, no_grad, shared by KL and LDIFS, run first so
the adapter is never toggled while the policy graph is alive) and one policy forward, inside the defenses'
forward contexts (steering hooks), with hidden states only when a defense needs them.
"""

from __future__ import annotations

import logging
import shutil
from contextlib import nullcontext
from functools import partial
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

from emalib.core.config import RunParams
from emalib.core.errors import EmalibError
from emalib.defenses.base import DefenseContext, StepOutputs
from emalib.defenses.stack import DefenseStack
from emalib.model.hidden_loss import hidden_cross_entropy_sum
from emalib.model.losses import token_cross_entropy_sum
from emalib.model.modeling import block_outputs, final_norm_output, last_block_output
from emalib.model.token_scores import output_layer
from emalib.model.tokenize import ChatDataset, collate
from emalib.training.reference import reference_forward
from emalib.training.step_cost import StepCost

log = logging.getLogger(__name__)


class EmTrainer(Trainer):
    """Trainer with the task loss computed here (never by passing labels to the model) plus defense terms."""

    def __init__(self, *args, defenses: DefenseStack | None = None, defense_ctx: DefenseContext | None = None,
                 **kwargs):
        super().__init__(*args, **kwargs)
        # We normalise by num_items_in_batch ourselves; this stops Trainer from also dividing by accumulation.
        self.model_accepts_loss_kwargs = True
        self.defenses = defenses if defenses is not None else DefenseStack()
        self.defense_ctx = defense_ctx if defense_ctx is not None else DefenseContext()
        self._term_sums: dict[str, torch.Tensor] = {}  # summed on the device; read (one sync) only when logging
        self._term_counts: dict[str, int] = {}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        stack, ctx = self.defenses, self.defense_ctx
        if not model.training:  # validation (early stopping): the task loss of the model alone, no defense term
            stack = DefenseStack()
        labels = inputs["labels"]
        forward = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}
        step = step_forwards(model, forward, stack, ctx)
        outputs = step.policy
        if step.policy_hidden is not None:
            loss_sum, n_tokens = hidden_cross_entropy_sum(step.policy_hidden, output_layer(model).weight, labels)
        else:
            loss_sum, n_tokens = token_cross_entropy_sum(outputs.logits, labels)
        denominator = num_items_in_batch if num_items_in_batch is not None else n_tokens.clamp(min=1)
        loss = loss_sum / denominator
        if stack.has_loss:
            self._record("loss/task", loss_sum / n_tokens.clamp(min=1))
            # HF divides the loss by the accumulation steps only when num_items_in_batch is None.
            share = 1.0
            if num_items_in_batch is not None:
                share = 1.0 / getattr(self, "current_gradient_accumulation_steps", 1)
            for name, weight, value in stack.loss_terms(model, inputs, step, ctx):
                self._record(f"loss/{name}", value)
                loss = loss + (weight * share) * value
        return (loss, outputs) if return_outputs else loss

    def _record(self, key: str, value: torch.Tensor) -> None:
        value = value.detach().float()
        self._term_sums[key] = self._term_sums[key] + value if key in self._term_sums else value
        self._term_counts[key] = self._term_counts.get(key, 0) + 1

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add each loss term (mean over the micro-batches since the last log) to the training logs."""
        if "loss" in logs and self._term_sums:
            logs = {**logs, **{k: float(self._term_sums[k]) / self._term_counts[k] for k in self._term_sums}}
            self._term_sums, self._term_counts = {}, {}
        super().log(logs, start_time)


def step_forwards(model, forward: dict[str, torch.Tensor], stack: DefenseStack, ctx: DefenseContext) -> StepOutputs:
    """The forwards of one micro-batch: the reference (adapter off, no_grad) when a loss term needs it, then the
    policy inside the defenses' forward contexts; hidden states and decoder block outputs only when asked for."""
    step = StepOutputs(None)
    if stack.has_loss and stack.needs_reference:
        with _block_capture(model, stack.needs_reference_hidden) as last:
            step.reference = reference_forward(model, **forward, output_hidden_states=stack.needs_reference_hidden,
                                               logits=stack.needs_reference_logits)
        if stack.needs_reference_hidden:
            step.reference_blocks = block_outputs(step.reference.hidden_states, last.get("output"))
    extra = {"output_hidden_states": True} if stack.needs_policy_hidden else {}
    from_hidden = loss_from_hidden(model, stack)
    if from_hidden:
        extra["logits_to_keep"] = 1  # the task loss comes from the final norm's output, a chunk at a time
    with stack.forward_context(model, ctx), _block_capture(model, stack.needs_policy_hidden) as last, \
            _final_capture(model, from_hidden) as final:
        step.policy = model(**forward, **extra)
    if from_hidden:
        step.policy_hidden = final["output"]
    if stack.needs_policy_hidden:
        step.policy_blocks = block_outputs(step.policy.hidden_states, last.get("output"))
    return step


def loss_from_hidden(model, stack: DefenseStack) -> bool:
    """Whether the task cross-entropy is computed from the final hidden states (no logits tensor): when no loss
    term reads the policy's logits (all but KL), the output layer is frozen, and the engine is transformers + peft.
    On Unsloth it keeps the logits path until the GPU check (benchmarks/bench_gpu.py) has run it: the capture no
    longer needs the norm module to be called (Unsloth's fast forward does not call it; final_norm_output hooks the
    backbone, tested on a CPU by imitation), but Unsloth's CUDA forward has not run here, and the cost model counts
    its logits."""
    if stack.has_loss and stack.needs_policy_logits or getattr(model, "emalib_engine", "hf") == "unsloth":
        return False
    try:
        return not output_layer(model).weight.requires_grad
    except EmalibError:  # logits scaled or capped after the output layer
        return False


def _final_capture(model, wanted: bool):
    return final_norm_output(model) if wanted else nullcontext({})


def _block_capture(model, wanted: bool):
    """last_block_output(model) when block outputs are wanted, else a context that captures nothing."""
    return last_block_output(model) if wanted else nullcontext({})


class _DefenseStepCallback(TrainerCallback):
    """Calls the defenses' on_step hook after every optimizer step (e.g. SafeLoRA every k steps)."""

    def __init__(self, model, defenses: DefenseStack, ctx: DefenseContext):
        self.model, self.defenses, self.ctx = model, defenses, ctx

    def on_step_end(self, args, state, control, **kwargs):
        self.defenses.on_step(self.model, state.global_step, self.ctx)


class StepProgress(TrainerCallback):
    """The optimizer steps as a progress bar in real units (emalib.core.progress), which the CLI's console draws;
    a resumed training starts at its checkpoint's step."""

    def __init__(self, desc: str):
        self.desc, self.bar = desc, None

    def on_train_begin(self, args, state, control, **kwargs):
        from emalib.core.progress import Progress

        self.bar = Progress(state.max_steps, self.desc, "steps", state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def resolve_optimizer(optim: str) -> str:
    """adamw_8bit (the paper's) needs bitsandbytes on CUDA; elsewhere use plain AdamW and say so."""
    if optim.endswith("8bit") and not torch.cuda.is_available():
        log.warning("optimizer %s needs CUDA; using adamw_torch on this machine", optim)
        return "adamw_torch"
    return optim


def trainer_arguments(params: RunParams, output_dir: Path, dtype: torch.dtype) -> dict:
    """The arguments every trainer of a run shares (SFT's TrainingArguments, GRPO's GRPOConfig): the `train`
    section's optimizer, schedule, batch, steps and checkpoints, the seed and the device's precision."""
    train = params.train
    return {
        "output_dir": str(output_dir),
        "per_device_train_batch_size": train.per_device_batch_size,
        "gradient_accumulation_steps": train.grad_accum_steps,
        "learning_rate": train.learning_rate,
        "lr_scheduler_type": train.lr_scheduler,
        "warmup_steps": train.warmup_steps,
        "weight_decay": train.weight_decay,
        "optim": resolve_optimizer(train.optim),
        "num_train_epochs": train.epochs,
        "max_steps": train.max_steps or -1,
        "logging_steps": train.logging_steps,
        "save_strategy": "steps",
        "save_steps": train.save_steps,
        "save_total_limit": 1,
        "seed": params.seed,
        "data_seed": params.seed,
        "bf16": dtype == torch.bfloat16 and torch.cuda.is_available(),
        "fp16": dtype == torch.float16 and torch.cuda.is_available(),
        "use_cpu": not torch.cuda.is_available(),
        "report_to": report_to(train.report_to),
        "disable_tqdm": False,
    }


def report_to(loggers: tuple[str, ...]) -> list[str] | str:
    """train.report_to as the trainers take it; a logger that is not installed is one line before training."""
    from transformers.integrations import is_tensorboard_available, is_wandb_available

    available = {"tensorboard": is_tensorboard_available, "wandb": is_wandb_available}
    missing = [name for name in loggers if not available[name]()]
    if missing:
        raise EmalibError(f"train.report_to: {', '.join(missing)} is not installed here (pip install "
                          f"{' '.join(missing)}, or leave it out)")
    return list(loggers) or "none"


def training_arguments(params: RunParams, output_dir: Path, dtype: torch.dtype,
                       extra: dict | None = None) -> TrainingArguments:
    """The run's TrainingArguments; `extra` (the defenses' TrainerSettings.arguments) overrides them."""
    return TrainingArguments(**{**trainer_arguments(params, output_dir, dtype), **(extra or {})},
                             remove_unused_columns=False)


def train_adapter(model, tokenizer, conversations, params: RunParams, run_dir: Path,
                  defenses: DefenseStack | None = None, ctx: DefenseContext | None = None) -> dict:
    """Fine-tune `model` (a PeftModel) on chat conversations; resume from the newest checkpoint in run_dir.

    `conversations` are the training data after the defenses' data transforms (emalib.runs.pipeline.train applies
    them). Here: the defenses' setup, their loss terms and forward contexts in every step, on_step after each
    optimizer step, and after_train before the adapter is saved in standard PEFT format to run_dir/adapter
    (atomically, via a temporary folder). Returns the training log history, each step's wall time and the peak
    memory (emalib/training/step_cost.py).
    """
    defenses = defenses if defenses is not None else DefenseStack()
    ctx = ctx if ctx is not None else DefenseContext(seed=params.seed, run_dir=run_dir, params=params)
    ctx.tokenizer = ctx.tokenizer or tokenizer
    dataset = ChatDataset.build(tokenizer, conversations, params.train.max_seq_length,
                                params.train.train_on_responses_only, params.train.drop_template_prefix)
    defenses.setup(model, ctx)
    checkpoints = run_dir / "checkpoints"
    settings = defenses.trainer_settings(ctx)
    args = training_arguments(params, checkpoints, next(model.parameters()).dtype, settings.arguments)
    validation = None
    if settings.eval_conversations is not None:
        validation = ChatDataset.build(tokenizer, settings.eval_conversations, params.train.max_seq_length,
                                       params.train.train_on_responses_only)
    cost = StepCost()  # HF validates after on_step_end: early stopping's validation is not in a step's time
    callbacks = [cost, StepProgress(f"training {run_dir.name}")]
    callbacks += ([_DefenseStepCallback(model, defenses, ctx)] if len(defenses) else []) + settings.callbacks
    trainer = EmTrainer(model=model, args=args, train_dataset=dataset, eval_dataset=validation,
                        data_collator=partial(collate, pad_token_id=tokenizer.pad_token_id),
                        defenses=defenses, defense_ctx=ctx, callbacks=callbacks or None)
    resume_from = get_last_checkpoint(str(checkpoints)) if checkpoints.is_dir() else None
    if resume_from:
        log.info("resuming from %s", resume_from)
    result = trainer.train(resume_from_checkpoint=resume_from)
    defenses.after_train(model, ctx)  # with early stopping, the model now holds the best checkpoint's weights
    save_adapter(model, tokenizer, run_dir / "adapter")
    shutil.rmtree(checkpoints, ignore_errors=True)  # the adapter is the artefact; checkpoints were resume points
    return {"train_loss": result.training_loss, "global_step": result.global_step,
            "n_examples": len(dataset), "log_history": trainer.state.log_history,
            "resumed_from": resume_from, **cost.summary()}


def save_adapter(model, tokenizer, target: Path) -> Path:
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    if target.exists():
        shutil.rmtree(target)
    tmp.rename(target)
    return target
