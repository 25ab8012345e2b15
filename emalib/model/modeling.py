"""Where things are inside a decoder-only causal LM (plain, PEFT-wrapped or Unsloth-patched), and the residual
stream at the outputs of its decoder blocks.

transformers' `hidden_states` has L+1 entries: the embeddings, then the output of blocks 0..L-2, then, as its
last entry, the output of the FINAL NORM, not of block L-1. Code that wants the raw outputs of every block (LDIFS,
as the authors' released feature extractor hooks them) takes entries 1..L-1 and catches the last block's output
on its way into the final norm. A forward pre-hook on the norm sees it with its autograd graph, also under
gradient checkpointing, because the norm runs outside the checkpointed blocks.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from emalib.core.errors import EmalibError


def decoder_blocks(model) -> torch.nn.ModuleList:
    """The decoder block list of a causal LM."""
    n_blocks = model.config.num_hidden_layers
    for name, module in model.named_modules():
        if name.endswith("layers") and isinstance(module, torch.nn.ModuleList) and len(module) == n_blocks:
            return module
    raise EmalibError(f"{type(model).__name__}: no list of {n_blocks} decoder blocks found")


def backbone(model) -> torch.nn.Module:
    """The module that runs the decoder blocks and then the final norm: it owns them as `layers` and `norm`."""
    blocks = decoder_blocks(model)
    for module in model.modules():
        if getattr(module, "layers", None) is blocks and isinstance(getattr(module, "norm", None), torch.nn.Module):
            return module
    raise EmalibError(f"{type(model).__name__}: no final norm found next to the decoder blocks")


def final_norm(model) -> torch.nn.Module:
    """The norm applied after the last decoder block."""
    return backbone(model).norm


@contextmanager
def last_block_output(model):
    """Inside the context, every forward stores the last decoder block's output (the final norm's input) in the
    yielded dict under "output"; the hook is removed on exit, exceptions included. Unsloth's fast forward (CUDA)
    does not call the norm module, so nothing is captured there and `block_outputs` raises: LDIFS on the Unsloth
    engine waits for the GPU check (benchmarks/bench_gpu.py)."""
    captured: dict[str, torch.Tensor] = {}

    def keep_input(module, args):
        captured["output"] = args[0]

    handle = final_norm(model).register_forward_pre_hook(keep_input)
    try:
        yield captured
    finally:
        handle.remove()


def block_outputs(hidden_states, last_output: torch.Tensor) -> list[torch.Tensor]:
    """The output of every decoder block, [L] tensors [B, T, D]: hidden_states[1..L-1] and the captured last one."""
    if last_output is None:
        raise EmalibError("the last decoder block's output was not captured (forward ran outside last_block_output)")
    return list(hidden_states[1:-1]) + [last_output]


@contextmanager
def final_norm_output(model):
    """Inside the context, every forward stores the final norm's output (the output layer's input, from which
    the logits are one matrix product) in the yielded dict under "output"; the hook is removed on exit.

    The hook sits on the backbone, whose first output is that tensor, not on the norm: Unsloth's fast forward
    applies the norm as a function of its weight (`fast_rms_layernorm(self.norm, h)`), so the norm module's own
    hooks never run there, while the causal LM still calls the backbone as a module."""
    captured: dict[str, torch.Tensor] = {}

    def keep_output(module, args, output):
        captured["output"] = output[0]  # last_hidden_state, of a ModelOutput or a tuple alike

    handle = backbone(model).register_forward_hook(keep_output)
    try:
        yield captured
    finally:
        handle.remove()
