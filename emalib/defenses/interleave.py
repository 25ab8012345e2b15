"""Random interleaving (docs/methods.md#interleaving): round(ratio * |task|) safe examples (benign WildGuardMix by default),
drawn without replacement from the pool with a seeded generator and shuffled into the task data."""

from __future__ import annotations

import random

from emalib.core.errors import DataError
from emalib.defenses.base import Conversation, DefenseBase, DefenseContext


def safe_count(n_task: int, ratio: float) -> int:
    """|safe| = round(ratio * |task|) (Python's round: halves go to the even neighbour)."""
    return round(ratio * n_task)


def mix_in(task: list[Conversation], extra: list[Conversation], seed: int) -> list[Conversation]:
    """task + extra in one seeded shuffle."""
    mixed = list(task) + list(extra)
    random.Random(seed).shuffle(mixed)
    return mixed


def sample_safe(pool: list[Conversation], n: int, seed: int, source: str = "pool") -> list[Conversation]:
    if n > len(pool):
        raise DataError(f"{source}: {n} safe examples needed but the pool holds only {len(pool)} "
                        f"(lower the ratio or use a larger source)")
    return random.Random(seed).sample(pool, n)


def load_pool(source: str) -> list[Conversation]:
    from emalib.data.chat import read_chat_jsonl
    from emalib.data.registry import resolve

    return read_chat_jsonl(resolve(source))


class InterleaveDefense(DefenseBase):
    def __init__(self, name: str = "interleave", source: str = "wildguard_benign", ratio: float = 0.05,
                 seed: int | None = None):
        self.name, self.source, self.ratio, self.seed = name, source, ratio, seed

    def transform_data(self, conversations: list[Conversation], ctx: DefenseContext) -> list[Conversation]:
        seed = ctx.seed if self.seed is None else self.seed
        n = safe_count(len(conversations), self.ratio)
        safe = sample_safe(load_pool(self.source), n, seed, self.source)
        ctx.notes[self.name] = {"source": self.source, "ratio": self.ratio, "n_task": len(conversations),
                                "n_safe": n}
        return mix_in(conversations, safe, seed)
