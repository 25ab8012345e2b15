"""A defense defined outside emalib, as a test fixture: one module with its config block (and descriptor) and its
implementation, registered at import; no emalib module is edited (tests/test_defense_plugin.py).

LoRA L2: loss = CE + mu * sum of the squared LoRA weights, pulling the adapter towards zero (towards the aligned
model)."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from emalib.core.defense_specs import DefenseBlock, Method
from emalib.defenses.base import DefenseBase
from emalib.defenses.registry import register_defense


class LoraL2Config(DefenseBlock):
    name: Literal["lora_l2"] = "lora_l2"
    weight: float = Field(0.01, ge=0, description="mu")

    methods: ClassVar[dict[str, Method]] = {"lora_l2": Method("LoRA L2", "weight", "μ", 0.01)}


class LoraL2Defense(DefenseBase):
    has_loss = True

    def __init__(self, name: str = "lora_l2", weight: float = 0.01):
        self.name, self.weight = name, weight

    def extra_loss(self, model, batch, outputs, ctx):
        return {"lora_l2": sum((p.float() ** 2).sum() for n, p in model.named_parameters()
                               if "lora_" in n and p.requires_grad)}


register_defense(LoraL2Config, LoraL2Defense)
