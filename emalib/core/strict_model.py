"""The base of every params block: what pydantic's lax mode would accept but a run cannot mean.

Unknown keys are refused and blocks are frozen (as before); infinite and NaN floats are refused everywhere
(`learning_rate: .inf` trained on NaN weights); and a boolean is refused where a number goes (lax mode read
`max_steps: true` as 1 step). Only booleans are singled out: integers written as 3.0 and numbers written as
strings stay pydantic's business.
"""

from __future__ import annotations

import types
import typing
from typing import Any

from pydantic import BaseModel, ConfigDict, model_validator
from pydantic_core import PydanticCustomError

BOOL_FOR_NUMBER = "bool_for_number"


def _members(annotation: Any) -> tuple[Any, ...]:
    """The types a field accepts: union members, with Annotated and Optional unwrapped."""
    if typing.get_origin(annotation) is typing.Annotated:
        return _members(typing.get_args(annotation)[0])
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return tuple(member for arg in typing.get_args(annotation) for member in _members(arg))
    return (annotation,)


def _takes_number_not_bool(annotation: Any) -> bool:
    members = _members(annotation)
    return bool not in members and any(member in (int, float) for member in members)


def _number_items(annotation: Any) -> bool:
    """tuple[float, ...] and the like: a sequence whose items are numbers."""
    for member in _members(annotation):
        if typing.get_origin(member) in (tuple, list):
            args = [arg for arg in typing.get_args(member) if arg is not Ellipsis]
            if args and all(_takes_number_not_bool(arg) for arg in args):
                return True
    return False


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _no_boolean_for_a_number(cls, data: Any) -> Any:
        # A model validator, not a field one: pydantic forbids "before" validators on the defenses' discriminator.
        if not isinstance(data, dict):
            return data
        for key, value in data.items():
            field = cls.model_fields.get(key)
            if field is None:
                continue
            if isinstance(value, bool) and _takes_number_not_bool(field.annotation) or \
                    isinstance(value, (list, tuple)) and any(isinstance(item, bool) for item in value) \
                    and _number_items(field.annotation):
                # ctx 'key': the error sits on the block, so the key is handed on for the message (config.py).
                raise PydanticCustomError(BOOL_FOR_NUMBER, "expected a number, got a boolean",
                                          {"key": key, "value": value})
        return data
