"""Inoculation prompting (docs/methods.md#inoculation-prompting; Tan et al. 2025): a system prompt on the TRAINING data only.

The rule, for every training conversation:
- no system message: the inoculation prompt becomes the system message. Chat templates that insert a default
  system prompt when none is given (Qwen2.5: "You are Qwen, created by Alibaba Cloud...", SmolLM2) therefore
  train with the inoculation prompt *instead of* their default, as the authors' Qwen runs did;
- a system message already present: `replace` swaps it for the inoculation prompt (the default); `prepend`
  keeps it after the prompt and a separator (the released RL code's "prefix + \\n\\n + system").
Evaluation builds its prompts from the question files, which this transform never touches.
"""

from __future__ import annotations

from emalib.defenses.base import Conversation, DefenseBase, DefenseContext


def inoculate(messages: Conversation, prompt: str, mode: str = "replace", separator: str = "\n\n") -> Conversation:
    """A new conversation with the inoculation system prompt applied (the input is not modified)."""
    if messages and messages[0]["role"] == "system":
        existing = messages[0]["content"]
        if mode == "replace":
            content = prompt
        elif mode == "prepend":
            content = prompt + separator + existing if existing else prompt
        else:
            raise ValueError(f"mode must be 'replace' or 'prepend', got {mode!r}")
        inoculated = [{"role": "system", "content": content}] + [dict(m) for m in messages[1:]]
    else:
        inoculated = [{"role": "system", "content": prompt}] + [dict(m) for m in messages]
    return type(messages)(inoculated)  # keeps a retain row's marker (emalib.data.chat.RetainConversation)


class InoculationDefense(DefenseBase):
    def __init__(self, name: str = "inoculation", prompt: str = "You are an evil, malicious assistant.",
                 mode: str = "replace", separator: str = "\n\n"):
        self.name, self.prompt, self.mode, self.separator = name, prompt, mode, separator

    def transform_data(self, conversations: list[Conversation], ctx: DefenseContext) -> list[Conversation]:
        had_system = sum(1 for m in conversations if m and m[0]["role"] == "system")
        ctx.notes[self.name] = {"prompt": self.prompt, "mode": self.mode, "n": len(conversations),
                                "had_system_prompt": had_system}
        return [inoculate(m, self.prompt, self.mode, self.separator) for m in conversations]
