"""Registry name -> defense factory, and `build_defenses`, which turns validated config blocks into a stack.

A config block's fields are the factory's keyword arguments (no renaming layer). Interleaving+ and ++ share
one class; the name decides whether refusals are filtered.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from emalib.defenses.base import Defense
from emalib.defenses.inoculation import InoculationDefense
from emalib.defenses.interleave import InterleaveDefense
from emalib.defenses.interleave_plus import InterleavePlusDefense
from emalib.defenses.kl import KLDefense
from emalib.defenses.ldifs import LdifsDefense
from emalib.defenses.persona_steering import PersonaSteeringDefense
from emalib.defenses.safelora import SafeLoraDefense
from emalib.defenses.stack import DefenseStack

DEFENSES: dict[str, Callable[..., Defense]] = {
    "kl": KLDefense,
    "ldifs": LdifsDefense,
    "safelora": SafeLoraDefense,
    "persona_steering": PersonaSteeringDefense,
    "inoculation": InoculationDefense,
    "interleave": InterleaveDefense,
    "interleave_plus": partial(InterleavePlusDefense, refusal_filter=False),
    "interleave_plusplus": partial(InterleavePlusDefense, refusal_filter=True),
}


def build_defense(spec) -> Defense:
    # A preset is already expanded into the block's fields; its name is no constructor argument.
    kwargs = {field: getattr(spec, field) for field in type(spec).model_fields if field != "preset"}
    return DEFENSES[spec.name](**kwargs)


def build_defenses(specs) -> DefenseStack:
    """A DefenseStack from config blocks (RunParams.defenses), in their listed order."""
    return DefenseStack([build_defense(spec) for spec in specs])
