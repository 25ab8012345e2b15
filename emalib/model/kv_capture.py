"""The attention keys and values of every layer, read at the outputs of the k_proj / v_proj projections.

The outputs are taken before the rotary embedding. RoPE rotates the key at position t by an orthogonal matrix
that depends on t only, so the distance between two keys at the same position is the same before and after it,
and a shifted position (left padding) changes nothing either.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from emalib.core.errors import EmalibError
from emalib.model.modeling import decoder_blocks


def attention_modules(model) -> list[torch.nn.Module]:
    """Each decoder block's self-attention module (the one that owns k_proj and v_proj)."""
    modules = []
    for index, block in enumerate(decoder_blocks(model)):
        attention = getattr(block, "self_attn", None)
        if attention is None or not (hasattr(attention, "k_proj") and hasattr(attention, "v_proj")):
            raise EmalibError(f"{type(model).__name__}: decoder block {index} has no self_attn.k_proj/v_proj")
        modules.append(attention)
    return modules


@contextmanager
def captured_kv(attention: list[torch.nn.Module]):
    """Inside the context, every forward stores each layer's k_proj and v_proj outputs ([B, T, kv_dim], with
    their autograd graph) in the yielded dict under (layer, "k") / (layer, "v"); the hooks are removed on exit,
    exceptions included."""
    store: dict[tuple[int, str], torch.Tensor] = {}
    handles = []

    def keeper(key):
        def keep(module, args, output):
            store[key] = output
        return keep

    try:
        for layer, module in enumerate(attention):
            handles.append(module.k_proj.register_forward_hook(keeper((layer, "k"))))
            handles.append(module.v_proj.register_forward_hook(keeper((layer, "v"))))
        yield store
    finally:
        for handle in handles:
            handle.remove()
