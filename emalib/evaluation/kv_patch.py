"""TReFT's patching diagnostic (docs/methods.md#treft): generate with the fine-tuned model while the keys and values
of each prompt's template prefix (system block + user header) are the initial model's.

Every layer's k_proj / v_proj output at the prefix positions is replaced, in the prompt's forward only, by the
adapter-disabled model's on the prefix alone (cached per distinct prefix). Replacing them at every layer is the
same as handing the fine-tuned model the initial model's prefix KV cache: the prefix positions reach later tokens
only through their keys and values. The values are taken before RoPE, which rotates both alike at one position.
A diagnostic, not a defense: if patching removes the broad misalignment, the fine-tune stored it in the prefix.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from emalib.core.errors import EmalibError
from emalib.model.kv_capture import attention_modules, captured_kv
from emalib.model.template_regions import row_spans, user_header_ids


class PrefixKVPatch:
    def __init__(self, model, tokenizer):
        if not hasattr(model, "disable_adapter"):
            raise EmalibError("generation.patch_prefix_kv: the evaluated model has no adapter to switch off for the "
                              "initial model's keys and values")
        self.attention = attention_modules(model)
        self.header = user_header_ids(tokenizer)
        self.cache: dict[tuple[int, ...], list[dict[str, torch.Tensor]]] = {}

    @torch.no_grad()
    def initial(self, model, tokens: list[int]) -> list[dict[str, torch.Tensor]]:
        """Per layer {"k": [P, kv_dim], "v": ...} of the adapter-disabled model on the prefix tokens alone."""
        key = tuple(tokens)
        if key not in self.cache:
            device = next(model.parameters()).device
            with model.disable_adapter(), captured_kv(self.attention) as store:
                model(input_ids=torch.tensor([tokens], device=device), logits_to_keep=1)
            self.cache[key] = [{"k": store[layer, "k"][0], "v": store[layer, "v"][0]}
                               for layer in range(len(self.attention))]
        return self.cache[key]

    @contextmanager
    def applied(self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        """Inside the context, a forward over the whole prompt (width T) gets the initial prefix keys/values; the
        decoding forwards (one new token each) are left alone. Rows without a user header are not patched."""
        plan = []
        for row, span in enumerate(row_spans(input_ids, attention_mask, self.header, "prefix")):
            if span is not None:
                start, end = span
                plan.append((row, start, end, self.initial(model, input_ids[row, start:end].tolist())))
        width = input_ids.shape[1]

        def patcher(layer: int, kind: str):
            def patch(module, args, output):
                if output.shape[1] != width:
                    return None
                output = output.clone()
                for row, start, end, initial in plan:
                    output[row, start:end] = initial[layer][kind].to(output.dtype)
                return output
            return patch

        handles = []
        try:
            for layer, attention in enumerate(self.attention):
                handles.append(attention.k_proj.register_forward_hook(patcher(layer, "k")))
                handles.append(attention.v_proj.register_forward_hook(patcher(layer, "v")))
            yield len(plan)
        finally:
            for handle in handles:
                handle.remove()
