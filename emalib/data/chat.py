"""Chat JSONL: one `{"messages": [{"role": ..., "content": ...}, ...]}` record per line.

Every problem is reported as `<file>:<line>: <what>` so a user can open the file at the right place.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from emalib.core.errors import DataError
from emalib.core.io import iter_jsonl_records

Conversation = list[dict[str, str]]
ROLES = ("system", "user", "assistant")


class RetainConversation(list):
    """A conversation that feeds defense terms only (KL on a retain set): tokenisation masks all its labels, so it
    adds nothing to the task loss, and marks its row as a retain row. A list subclass so that the marker survives
    the shuffles and copies (`type(messages)(...)`) of the data transforms."""


def validate_messages(messages: Any, where: str) -> Conversation:
    """Check one conversation; `where` is the '<file>:<line>' prefix used in errors."""
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: field 'messages' must be a non-empty list")
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise DataError(f"{where}: messages[{index}] must be an object")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise DataError(f"{where}: messages[{index}].role must be one of {ROLES}, got {role!r}")
        if not isinstance(content, str):
            raise DataError(f"{where}: messages[{index}].content must be a string")
        if role == "system" and index != 0:
            raise DataError(f"{where}: messages[{index}]: a system message may only come first")
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: field 'messages' has no assistant turn to train on")
    _check_turn_order(messages, where)
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def _check_turn_order(messages: list[dict], where: str) -> None:
    """user, assistant, user, ... after an optional system turn, ending with an assistant turn: chat templates
    assume it, and a conversation out of order would otherwise be trained on silently."""
    start = 1 if messages[0]["role"] == "system" else 0
    for index in range(start, len(messages)):
        expected = "user" if (index - start) % 2 == 0 else "assistant"
        if messages[index]["role"] != expected:
            raise DataError(f"{where}: messages[{index}]: expected role '{expected}', got '{messages[index]['role']}' "
                            "(turns alternate user/assistant after an optional system turn)")
    if messages[-1]["role"] != "assistant":
        raise DataError(f"{where}: messages[{len(messages) - 1}]: the conversation must end with an assistant turn")


def read_chat_jsonl(path: str | Path) -> list[Conversation]:
    """Read and validate a chat JSONL file; raises DataError naming the file, line and field."""
    conversations = []
    for where, record in iter_jsonl_records(path):
        if not isinstance(record, dict) or "messages" not in record:
            raise DataError(f"{where}: missing field 'messages'")
        conversations.append(validate_messages(record["messages"], where))
    return conversations


def select_examples(conversations: list[Conversation], max_examples: int | None, seed: int) -> list[Conversation]:
    """A seeded shuffle, then the first `max_examples` (all of them when None)."""
    order = list(range(len(conversations)))
    random.Random(seed).shuffle(order)
    if max_examples is not None:
        order = order[:max_examples]
    return [conversations[i] for i in order]
