"""The one trainer: a `transformers.Trainer` whose loss is cross-entropy on assistant tokens, from the logits.

The HF Trainer supplies the optimizer, the linear schedule with warmup, gradient accumulation, the progress bar,
checkpoints and resuming. This subclass only owns the loss. Token losses are summed and divided by the number
of labelled tokens in the whole accumulated batch (`num_items_in_batch`), so the result does not depend on how
the batch is split into micro-batches.
"""

from __future__ import annotations

import logging
import shutil
from functools import partial
from pathlib import Path

import torch
from transformers import Trainer, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

from emalib.config import RunParams
from emalib.losses import token_cross_entropy_sum
from emalib.training.tokenize import ChatDataset, collate

log = logging.getLogger(__name__)


class EmTrainer(Trainer):
    """Trainer with the task loss computed here (never by passing labels to the model)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # We normalise by num_items_in_batch ourselves; this stops Trainer from also dividing by accumulation.
        self.model_accepts_loss_kwargs = True

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs["labels"]
        outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        loss_sum, n_tokens = token_cross_entropy_sum(outputs.logits, labels)
        denominator = num_items_in_batch if num_items_in_batch is not None else n_tokens.clamp(min=1)
        loss = loss_sum / denominator
        return (loss, outputs) if return_outputs else loss


def resolve_optimizer(optim: str) -> str:
    """adamw_8bit (the paper's) needs bitsandbytes on CUDA; elsewhere use plain AdamW and say so."""
    if optim.endswith("8bit") and not torch.cuda.is_available():
        log.warning("optimizer %s needs CUDA; using adamw_torch on this machine", optim)
        return "adamw_torch"
    return optim


def training_arguments(params: RunParams, output_dir: Path, dtype: torch.dtype) -> TrainingArguments:
    train = params.train
    return TrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=train.per_device_batch_size,
        gradient_accumulation_steps=train.grad_accum_steps,
        learning_rate=train.learning_rate,
        lr_scheduler_type=train.lr_scheduler,
        warmup_steps=train.warmup_steps,
        weight_decay=train.weight_decay,
        optim=resolve_optimizer(train.optim),
        num_train_epochs=train.epochs,
        max_steps=train.max_steps or -1,
        logging_steps=train.logging_steps,
        save_strategy="steps",
        save_steps=train.save_steps,
        save_total_limit=1,
        seed=params.seed,
        data_seed=params.seed,
        bf16=dtype == torch.bfloat16 and torch.cuda.is_available(),
        fp16=dtype == torch.float16 and torch.cuda.is_available(),
        use_cpu=not torch.cuda.is_available(),
        remove_unused_columns=False,
        report_to="none",
        disable_tqdm=False,
    )


def train_adapter(model, tokenizer, conversations, params: RunParams, run_dir: Path) -> dict:
    """Fine-tune `model` (a PeftModel) on chat conversations; resume from the newest checkpoint in run_dir.

    Saves the adapter in standard PEFT format to run_dir/adapter (atomically, via a temporary folder) and
    returns the training log history.
    """
    dataset = ChatDataset.build(tokenizer, conversations, params.train.max_seq_length,
                                params.train.train_on_responses_only)
    checkpoints = run_dir / "checkpoints"
    args = training_arguments(params, checkpoints, next(model.parameters()).dtype)
    trainer = EmTrainer(model=model, args=args, train_dataset=dataset,
                        data_collator=partial(collate, pad_token_id=tokenizer.pad_token_id))
    resume_from = get_last_checkpoint(str(checkpoints)) if checkpoints.is_dir() else None
    if resume_from:
        log.info("resuming from %s", resume_from)
    result = trainer.train(resume_from_checkpoint=resume_from)
    save_adapter(model, tokenizer, run_dir / "adapter")
    shutil.rmtree(checkpoints, ignore_errors=True)  # the adapter is the artefact; checkpoints were resume points
    return {"train_loss": result.training_loss, "global_step": result.global_step,
            "n_examples": len(dataset), "log_history": trainer.state.log_history,
            "resumed_from": resume_from}


def save_adapter(model, tokenizer, target: Path) -> Path:
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    if target.exists():
        shutil.rmtree(target)
    tmp.rename(target)
    return target
