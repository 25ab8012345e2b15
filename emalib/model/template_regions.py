"""The chat template's own tokens around the user's content, located in tokenised rows (TReFT, docs/methods.md#treft).

prefix: every token before the user's content (BOS, the system block, the user header). A row's prefix ends at the
first occurrence of the user-header tokens after its first real token, so rows with different system prompts
and either padding side each get their own span.
postfix: the tokens between the user's content and the assistant's (the end of the user turn and the assistant
header), as the released code defines it; a row's postfix is the last occurrence of those tokens.

Both token sequences are read from the tokenizer's template by rendering a conversation with marker strings
in place of the contents, so no template's markers are hard-coded.
"""

from __future__ import annotations

import torch

from emalib.core.errors import DataError

SYSTEM_MARK, USER_MARK, ASSISTANT_MARK = "<<EMALIB-SYSTEM>>", "<<EMALIB-USER>>", "<<EMALIB-ASSISTANT>>"


def _render(tokenizer, messages) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def user_header_ids(tokenizer) -> list[int]:
    """The tokens between a system message's content and the user's content (the end of the system block and
    the user header); a template that takes no system message: everything before the user's content."""
    try:
        text = _render(tokenizer, [{"role": "system", "content": SYSTEM_MARK}, {"role": "user", "content": USER_MARK}])
        between = text[text.index(SYSTEM_MARK) + len(SYSTEM_MARK):text.index(USER_MARK)]
    except Exception:  # noqa: BLE001 - a template without a system role raises its own error type
        text = _render(tokenizer, [{"role": "user", "content": USER_MARK}])
        between = text[:text.index(USER_MARK)]
    if not between:
        raise DataError("the chat template puts nothing between the system and the user content; "
                        "the TReFT prefix cannot be located")
    return _ids(tokenizer, between)


def postfix_ids(tokenizer) -> list[int]:
    """The tokens between the user's content and the assistant's (released code's postfix)."""
    text = _render(tokenizer, [{"role": "user", "content": USER_MARK}, {"role": "assistant", "content": ASSISTANT_MARK}])
    between = text[text.index(USER_MARK) + len(USER_MARK):text.index(ASSISTANT_MARK)]
    if not between:
        raise DataError("the chat template puts nothing between the user and the assistant content")
    return _ids(tokenizer, between)


def find(row: list[int], needle: list[int], start: int = 0, last: bool = False) -> int:
    """Index of the first (or last) occurrence of `needle` in row[start:], or -1."""
    n = len(needle)
    positions = range(len(row) - n, start - 1, -1) if last else range(start, len(row) - n + 1)
    return next((i for i in positions if row[i:i + n] == needle), -1)


def row_spans(input_ids: torch.Tensor, attention_mask: torch.Tensor, needle: list[int],
              region: str) -> list[tuple[int, int] | None]:
    """[start, end) of each row's region (None where it is absent). prefix: from the row's first real token
    through the first `needle` (the user header); postfix: the last occurrence of `needle`."""
    spans: list[tuple[int, int] | None] = []
    for ids, mask in zip(input_ids.tolist(), attention_mask.tolist()):
        first = mask.index(1) if 1 in mask else len(mask)
        end_real = len(mask) - mask[::-1].index(1) if 1 in mask else first
        tokens = ids[:end_real]
        at = find(tokens, needle, first, last=(region == "postfix"))
        if at < 0:
            spans.append(None)
        elif region == "prefix":
            spans.append((first, at + len(needle)))
        else:
            spans.append((at, at + len(needle)))
    return spans


def prefix_length(input_ids: list[int], header: list[int]) -> int:
    """Number of leading template tokens of one unpadded tokenised conversation: through the first user header
    (0 when there is none)."""
    at = find(input_ids, header)
    return 0 if at < 0 else at + len(header)
