"""A run's defenses, called in their listed order, plus what the trainer must compute for them each step."""

from __future__ import annotations

from contextlib import ExitStack, contextmanager

import torch

from emalib.core.errors import EmalibError
from emalib.defenses.base import Conversation, Defense, DefenseContext, StepOutputs, TrainerSettings


class DefenseStack:
    def __init__(self, defenses: list[Defense] | None = None):
        self.defenses = list(defenses or [])

    def __len__(self) -> int:
        return len(self.defenses)

    @property
    def names(self) -> list[str]:
        return [d.name for d in self.defenses]

    @property
    def needs_policy_hidden(self) -> bool:
        return any(d.needs_policy_hidden for d in self.defenses)

    @property
    def needs_reference(self) -> bool:
        return any(d.needs_reference or d.needs_reference_hidden for d in self.defenses)

    @property
    def needs_reference_logits(self) -> bool:
        """Whether some defense uses the reference's logits (KL), not only its hidden states (LDIFS)."""
        return any(d.needs_reference for d in self.defenses)

    @property
    def needs_policy_logits(self) -> bool:
        """Whether some loss term reads the policy's full logits (KL); a defense that does not say is assumed to."""
        return any(getattr(d, "needs_policy_logits", True) for d in self.defenses if getattr(d, "has_loss", True))

    @property
    def needs_reference_hidden(self) -> bool:
        return any(d.needs_reference_hidden for d in self.defenses)

    @property
    def has_loss(self) -> bool:
        return any(d.has_loss for d in self.defenses)

    def transform_data(self, conversations: list[Conversation], ctx: DefenseContext) -> list[Conversation]:
        for defense in self.defenses:
            conversations = defense.transform_data(conversations, ctx)
        return conversations

    def setup(self, model, ctx: DefenseContext) -> None:
        if self.needs_reference and not hasattr(model, "disable_adapter"):
            users = [d.name for d in self.defenses if d.needs_reference or d.needs_reference_hidden]
            raise EmalibError(f"defenses {users} use the adapter-disabled model as reference, but the model has no "
                              f"PEFT adapter; train with a LoRA adapter (emalib.model.engines.load_model)")
        for defense in self.defenses:
            defense.setup(model, ctx)

    @contextmanager
    def forward_context(self, model, ctx: DefenseContext):
        """Every defense's forward context, entered in order and exited in reverse, also on exceptions."""
        with ExitStack() as stack:
            for defense in self.defenses:
                stack.enter_context(defense.forward_context(model, ctx))
            yield

    def loss_terms(self, model, batch, outputs: StepOutputs,
                   ctx: DefenseContext) -> list[tuple[str, float, torch.Tensor]]:
        """(term name, weight, unweighted value) for every loss term of every defense."""
        terms = []
        for defense in self.defenses:
            for name, value in defense.extra_loss(model, batch, outputs, ctx).items():
                terms.append((name, defense.weight, value))
        return terms

    def on_step(self, model, step: int, ctx: DefenseContext) -> None:
        for defense in self.defenses:
            defense.on_step(model, step, ctx)

    def after_train(self, model, ctx: DefenseContext) -> None:
        for defense in self.defenses:
            defense.after_train(model, ctx)

    def trainer_settings(self, ctx: DefenseContext) -> TrainerSettings:
        """The defenses' additions to the Trainer, merged; at most one defense may bring validation data."""
        merged = TrainerSettings()
        for defense in self.defenses:
            settings = getattr(defense, "trainer_settings", lambda ctx: None)(ctx)  # plug-ins may predate the hook
            if settings is None:
                continue
            if settings.eval_conversations is not None and merged.eval_conversations is not None:
                raise EmalibError("two defenses bring validation data; stack at most one of them")
            merged.arguments.update(settings.arguments)
            merged.callbacks += settings.callbacks
            if settings.eval_conversations is not None:
                merged.eval_conversations = settings.eval_conversations
        return merged
