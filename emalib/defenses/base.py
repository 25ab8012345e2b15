"""The defense protocol: a few optional hooks the one trainer and the pipeline call at fixed points.

| hook                                   | when                                    | used by                       |
|----------------------------------------|-----------------------------------------|-------------------------------|
| transform_data(conversations, ctx)     | once, before tokenisation               | interleave(+/++), inoculation |
| setup(model, ctx)                      | once, after the model is loaded         | persona steering (vector)     |
| forward_context(model, ctx)            | around every training (policy) forward  | persona steering hooks        |
| extra_loss(model, batch, outputs, ctx) | every micro-batch; UNWEIGHTED terms     | kl, ldifs                     |
| on_step(model, step, ctx)              | after every optimizer step              | safelora (every k steps)      |
| after_train(model, ctx)                | after training, before the adapter save | safelora                      |
| trainer_settings(ctx)                  | once, when the HF Trainer is built      | early_stopping                |

`DefenseBase` supplies no-op defaults and holds no logic; no defense subclasses another concrete defense.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

Conversation = list[dict[str, str]]


@dataclass
class DefenseContext:
    """What a defense may need besides the model: the run's params, folder, seed and tokenizer.

    `notes` collects what defenses report (counts, files written); the pipeline saves it to the manifest.
    """

    seed: int = 0
    run_dir: Path | None = None
    params: Any = None  # emalib.core.config.RunParams (None in unit tests that need no model loading)
    tokenizer: Any = None
    notes: dict[str, Any] = field(default_factory=dict)


@dataclass
class StepOutputs:
    """The forwards of one training micro-batch, computed once by the trainer and shared by every defense.

    policy: the trained model's output (logits [B, T, V]; hidden_states when some defense needs them).
    When no defense reads the policy's logits (all but KL), the trainer computes the task loss from `policy_hidden`
    and `policy.logits` holds the last position's only.
    reference: the same model with its adapter disabled, under no_grad (None when no defense needs it).
    policy_blocks / reference_blocks: the raw output of every decoder block, [L] tensors [B, T, D], when hidden
    states were asked for (emalib.model.modeling.block_outputs: the last one is taken before the final norm).
    """

    policy: Any
    reference: Any = None
    policy_blocks: list[torch.Tensor] | None = None
    reference_blocks: list[torch.Tensor] | None = None
    policy_hidden: torch.Tensor | None = None  # final norm output, when the policy's logits were not computed


@dataclass
class TrainerSettings:
    """What a defense adds to the HF Trainer (early stopping: evaluation and best-checkpoint arguments, its
    callbacks and the conversations it validates on)."""

    arguments: dict[str, Any] = field(default_factory=dict)  # TrainingArguments fields, over the run's own
    callbacks: list[Any] = field(default_factory=list)
    eval_conversations: list[Conversation] | None = None


class Defense(Protocol):
    name: str
    weight: float  # lambda for extra_loss terms (ignored by defenses without loss terms)
    needs_policy_hidden: bool
    needs_reference: bool
    needs_reference_hidden: bool

    def transform_data(self, conversations: list[Conversation], ctx: DefenseContext) -> list[Conversation]: ...
    def setup(self, model: torch.nn.Module, ctx: DefenseContext) -> None: ...
    def forward_context(self, model: torch.nn.Module, ctx: DefenseContext) -> AbstractContextManager: ...
    def extra_loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor], outputs: StepOutputs,
                   ctx: DefenseContext) -> dict[str, torch.Tensor]: ...
    def on_step(self, model: torch.nn.Module, step: int, ctx: DefenseContext) -> None: ...
    def after_train(self, model: torch.nn.Module, ctx: DefenseContext) -> None: ...
    def trainer_settings(self, ctx: DefenseContext) -> TrainerSettings | None: ...


class DefenseBase:
    """No-op defaults for every hook; a defense overrides only what it uses."""

    name: str = ""
    weight: float = 1.0
    needs_policy_hidden: bool = False
    needs_reference: bool = False
    needs_reference_hidden: bool = False
    needs_policy_logits: bool = False  # reads outputs.policy.logits (KL); else the trainer skips computing them
    has_loss: bool = False

    def transform_data(self, conversations: list[Conversation], ctx: DefenseContext) -> list[Conversation]:
        return conversations

    def setup(self, model, ctx: DefenseContext) -> None:
        return None

    def forward_context(self, model, ctx: DefenseContext) -> AbstractContextManager:
        return nullcontext()

    def extra_loss(self, model, batch, outputs: StepOutputs, ctx: DefenseContext) -> dict[str, torch.Tensor]:
        return {}

    def on_step(self, model, step: int, ctx: DefenseContext) -> None:
        return None

    def after_train(self, model, ctx: DefenseContext) -> None:
        return None

    def trainer_settings(self, ctx: DefenseContext) -> TrainerSettings | None:
        return None
