"""Early stopping (docs/methods.md#early-stopping; Schreiber & Goldstein 2026, "Overtrained, Not Misaligned",
arXiv 2605.12199: EM appears after the task has nearly converged, so stopping there keeps most of the task).

Every `eval_every` optimizer steps the task cross-entropy on a validation split is measured and a checkpoint saved;
training stops after `patience` evaluations without improvement, and the checkpoint of lowest validation loss
becomes the run's adapter. All of it is the HF Trainer's own machinery: `eval_strategy="steps"`,
`load_best_model_at_end` with `metric_for_best_model="eval_loss"`, and `EarlyStoppingCallback`, whose patience
counter is saved in every checkpoint's trainer_state.json and restored on resume
(`restore_callback_states_from_checkpoint`), as the best loss and step are by the Trainer's state.
"""

from __future__ import annotations

import random

from emalib.core.errors import DataError
from emalib.defenses.base import Conversation, DefenseBase, DefenseContext, TrainerSettings


def split_validation(conversations: list[Conversation], fraction: float,
                     seed: int) -> tuple[list[Conversation], list[Conversation]]:
    """(training rows, validation rows): a seeded round(fraction * n) of the rows (at least one, never all)."""
    if len(conversations) < 2:
        raise DataError(f"early_stopping: a validation split needs at least 2 training examples, got "
                        f"{len(conversations)}")
    size = min(max(1, round(fraction * len(conversations))), len(conversations) - 1)
    order = list(range(len(conversations)))
    random.Random(f"validation/{seed}").shuffle(order)
    held = set(order[:size])
    return ([c for i, c in enumerate(conversations) if i not in held],
            [c for i, c in enumerate(conversations) if i in held])


def _record_early_stopping(notes: dict):
    """A callback that writes the best step, the stop step and the validation curve to the defense's notes
    (-> manifest.json). Built here because transformers is imported only when a run trains: checking params and
    refusing bad input stay light."""
    from transformers import TrainerCallback

    class RecordEarlyStopping(TrainerCallback):
        def on_train_end(self, args, state, control, **kwargs):
            curve = [{"step": entry["step"], "val_loss": entry["eval_loss"]} for entry in state.log_history
                     if "eval_loss" in entry]
            notes.update(best_step=state.best_global_step, best_val_loss=state.best_metric,
                         stop_step=state.global_step, stopped_early=state.global_step < state.max_steps,
                         validation_curve=curve)

    return RecordEarlyStopping()


class EarlyStoppingDefense(DefenseBase):
    def __init__(self, name: str = "early_stopping", patience: int = 3, eval_every: int = 20,
                 metric: str = "val_loss", min_delta: float = 0.0, validation_fraction: float = 0.1,
                 validation_dataset: str | None = None, seed: int | None = None, eval_batch_size: int | None = None):
        self.name, self.patience, self.eval_every, self.metric = name, patience, eval_every, metric
        self.min_delta, self.validation_fraction, self.validation_dataset = min_delta, validation_fraction, \
            validation_dataset
        self.seed, self.eval_batch_size = seed, eval_batch_size
        self.validation: list[Conversation] | None = None

    def transform_data(self, conversations: list[Conversation], ctx: DefenseContext) -> list[Conversation]:
        """Keep the validation split out of training (or read the validation file)."""
        if self.validation_dataset is not None:
            from emalib.data.chat import read_chat_jsonl
            from emalib.data.registry import resolve

            self.validation = read_chat_jsonl(resolve(self.validation_dataset))
        else:
            seed = ctx.seed if self.seed is None else self.seed
            conversations, self.validation = split_validation(conversations, self.validation_fraction, seed)
        ctx.notes[self.name] = {"validation": self.validation_dataset or "split", "n_validation": len(self.validation),
                                "n_train": len(conversations), "patience": self.patience,
                                "eval_every": self.eval_every}
        return conversations

    def trainer_settings(self, ctx: DefenseContext) -> TrainerSettings:
        if self.validation is None:
            raise DataError("early_stopping: no validation data (its transform_data was not run)")
        batch = self.eval_batch_size or (ctx.params.train.per_device_batch_size if ctx.params is not None else 8)
        arguments = {"eval_strategy": "steps", "eval_steps": self.eval_every, "save_steps": self.eval_every,
                     "load_best_model_at_end": True, "metric_for_best_model": "eval_loss",
                     "greater_is_better": False, "prediction_loss_only": True,
                     "per_device_eval_batch_size": batch, "restore_callback_states_from_checkpoint": True}
        from transformers import EarlyStoppingCallback

        notes = ctx.notes.setdefault(self.name, {})
        return TrainerSettings(arguments=arguments, eval_conversations=self.validation,
                               callbacks=[EarlyStoppingCallback(self.patience, self.min_delta),
                                          _record_early_stopping(notes)])
