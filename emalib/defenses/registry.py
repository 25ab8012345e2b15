"""Registry name -> defense factory, and `build_defenses`, which turns validated config blocks into a stack.

A config block's fields are the factory's keyword arguments (no renaming layer). Interleaving+ and ++ share
one class; the name decides whether refusals are filtered.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from emalib.defenses.base import Defense
from emalib.defenses.caft import CaftDefense
from emalib.defenses.early_stopping import EarlyStoppingDefense
from emalib.defenses.inoculation import InoculationDefense
from emalib.defenses.interleave import InterleaveDefense
from emalib.defenses.interleave_plus import InterleavePlusDefense
from emalib.defenses.kl import KLDefense
from emalib.defenses.kl_retain import KLRetainDefense
from emalib.defenses.ldifs import LdifsDefense
from emalib.defenses.persona_steering import PersonaSteeringDefense
from emalib.defenses.safelora import SafeLoraDefense
from emalib.defenses.stack import DefenseStack
from emalib.defenses.treft import TreftDefense

DEFENSES: dict[str, Callable[..., Defense]] = {
    "kl": KLDefense,
    "ldifs": LdifsDefense,
    "safelora": SafeLoraDefense,
    "persona_steering": PersonaSteeringDefense,
    "inoculation": InoculationDefense,
    "interleave": InterleaveDefense,
    "interleave_plus": partial(InterleavePlusDefense, refusal_filter=False),
    "interleave_plusplus": partial(InterleavePlusDefense, refusal_filter=True),
    "treft": TreftDefense,
    "kl_retain": KLRetainDefense,
    "caft": CaftDefense,
    "early_stopping": EarlyStoppingDefense,
}


def register_defense(block, defense: Callable[..., Defense] | dict[str, Callable[..., Defense]]) -> None:
    """Add a defense defined outside this package: its config block (a `DefenseBlock` with a `name` literal and its
    descriptor) joins the params schema, and `defense` (one factory, or one per registry name of the block) builds
    it from the block's fields. Nothing else needs editing: the steps, the study graph, the cost model and the
    report read the descriptor."""
    from emalib.core.config import register_defense_block

    factories = defense if isinstance(defense, dict) else {name: defense for name in block.registry_names()}
    if set(factories) != set(block.registry_names()):
        raise ValueError(f"register_defense: factories for {sorted(factories)}, block names {block.registry_names()}")
    register_defense_block(block)
    DEFENSES.update(factories)


def build_defense(spec) -> Defense:
    # A preset is already expanded into the block's fields; its name is no constructor argument.
    kwargs = {field: getattr(spec, field) for field in type(spec).model_fields if field != "preset"}
    return DEFENSES[spec.name](**kwargs)


def build_defenses(specs) -> DefenseStack:
    """A DefenseStack from config blocks (RunParams.defenses), in their listed order."""
    return DefenseStack([build_defense(spec) for spec in specs])
