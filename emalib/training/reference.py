"""The reference model of KL and LDIFS: the trained PEFT model itself with its adapter disabled.

No second copy of the weights exists: `disable_adapter()` switches the LoRA branches off for one forward and
restores them on exit (also on exceptions). Run under no_grad, so the reference holds no autograd graph.
"""

from __future__ import annotations

import torch


@torch.no_grad()
def reference_forward(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, output_hidden_states: bool = False,
                      logits: bool = True):
    """The adapter-disabled model's output on a batch (logits [B, T, V]; hidden_states when asked). logits=False
    computes the last position's logits only: LDIFS alone needs no [B, T, V] reference logits."""
    extra = {"output_hidden_states": True} if output_hidden_states else {}
    if not logits:
        extra["logits_to_keep"] = 1
    with model.disable_adapter():
        return model(input_ids=input_ids, attention_mask=attention_mask, **extra)
