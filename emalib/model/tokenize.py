"""Chat conversations to token ids, with labels on assistant tokens only.

The label span of each assistant turn is found from the chat template itself: render the conversation up to
the turn with the generation prompt, and up to the end of the turn; the characters between are the turn's
response (including its end-of-turn marker). Token offsets map that span onto tokens, so the rule works for any
template without hard-coding its markers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from emalib.core.errors import DataError
from emalib.model.losses import IGNORE_INDEX
from emalib.model.template_regions import prefix_length, user_header_ids


def _render(tokenizer, messages, add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def response_char_spans(tokenizer, messages) -> tuple[str, list[tuple[int, int]]]:
    """The full rendered text and the [start, end) character span of each assistant turn."""
    full = _render(tokenizer, messages, add_generation_prompt=False)
    spans = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:index], add_generation_prompt=True)
        through = _render(tokenizer, messages[: index + 1], add_generation_prompt=False)
        if not (full.startswith(through) and through.startswith(before)):
            raise DataError("the chat template does not render conversations prefix by prefix; "
                            "assistant-only labels cannot be located (set train.train_on_responses_only: false)")
        spans.append((len(before), len(through)))
    return full, spans


def tokenize_conversation(tokenizer, messages, max_length: int, responses_only: bool = True,
                          drop_prefix: list[int] | None = None) -> dict[str, list[int]]:
    """input_ids and labels (IGNORE_INDEX outside assistant turns when responses_only), truncated to max_length.

    drop_prefix: the template's user-header tokens (emalib.model.template_regions.user_header_ids); every token
    through their first occurrence (BOS, system block, user header) is removed before truncation, as the TReFT
    ablation trains (the released remove_template_prefix_tokens)."""
    full, spans = response_char_spans(tokenizer, messages)
    encoded = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    input_ids = encoded["input_ids"]
    labels = []
    for token_id, (start, end) in zip(input_ids, encoded["offset_mapping"]):
        in_response = any(span_start <= start and end <= span_end and end > start for span_start, span_end in spans)
        labels.append(token_id if (in_response or not responses_only) else IGNORE_INDEX)
    if drop_prefix is not None:
        cut = prefix_length(input_ids, drop_prefix)
        if cut == 0:
            raise DataError("train.drop_template_prefix: a conversation has no user turn to cut the template before")
        input_ids, labels = input_ids[cut:], labels[cut:]
    return {"input_ids": input_ids[:max_length], "labels": labels[:max_length]}


@dataclass
class ChatDataset(torch.utils.data.Dataset):
    """Tokenised conversations; examples whose response falls entirely past max_length are dropped."""

    features: list[dict[str, list[int]]]

    @classmethod
    def build(cls, tokenizer, conversations, max_length: int, responses_only: bool = True,
              drop_template_prefix: bool = False) -> ChatDataset:
        header = user_header_ids(tokenizer) if drop_template_prefix else None
        features = [tokenize_conversation(tokenizer, messages, max_length, responses_only, header)
                    for messages in conversations]
        kept = [f for f in features if any(label != IGNORE_INDEX for label in f["labels"][1:])]
        if not kept:
            raise DataError(f"no example keeps a response token within max_seq_length={max_length}")
        return cls(kept)

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        return self.features[index]


def collate(features: list[dict[str, list[int]]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example; padding is masked in attention and in the labels."""
    width = max(len(f["input_ids"]) for f in features)
    input_ids = torch.full((len(features), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(features), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(features), width), dtype=torch.long)
    for row, feature in enumerate(features):
        length = len(feature["input_ids"])
        input_ids[row, :length] = torch.tensor(feature["input_ids"])
        labels[row, :length] = torch.tensor(feature["labels"])
        attention_mask[row, :length] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
