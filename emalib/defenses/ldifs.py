"""LDIFS, the l2 distance in feature space to the aligned model (PAPER.md §2.2; Mukhoti et al. 2024).

Features are residual-stream outputs of a few decoder blocks, taken from `output_hidden_states` (index i+1 is
block i's output), not from capture hooks: under Unsloth's gradient checkpointing, hooked activations carry no
gradient. The policy features keep their graph, so the term trains the LoRA weights; the authors' released code
detached both feature sets (a constant term), reproduced only with `released_no_grad_bug`.
"""

from __future__ import annotations

import torch

from emalib.defenses.base import DefenseBase, DefenseContext, StepOutputs
from emalib.errors import EmalibError
from emalib.losses import ldifs_distance, ldifs_features


def select_layers(n_blocks: int, layers: str | tuple[int, ...] = "evenly_spaced", n_layers: int = 5,
                  every_k: int = 5) -> list[int]:
    """Decoder block indices (0-based) whose outputs form the features.

    evenly_spaced: torch.linspace(0, L-1, n_layers).long(), as the released code (28 blocks: 0, 6, 13, 20, 27);
    every_k: blocks k-1, 2k-1, ... (the outputs of every k-th block, the paper text's "every 5 layers");
    a tuple: those blocks.
    """
    if layers == "evenly_spaced":
        return torch.linspace(0, n_blocks - 1, n_layers).long().tolist()
    if layers == "every_k":
        chosen = list(range(every_k - 1, n_blocks, every_k))
        if not chosen:
            raise EmalibError(f"ldifs: every_k={every_k} selects no block of a {n_blocks}-block model")
        return chosen
    chosen = list(layers)
    if max(chosen) >= n_blocks:
        raise EmalibError(f"ldifs: layers {chosen} exceed the model's {n_blocks} decoder blocks (0-based)")
    return chosen


def block_count(model) -> int:
    return int(model.config.num_hidden_layers)


class LdifsDefense(DefenseBase):
    needs_policy_hidden = True
    needs_reference_hidden = True
    has_loss = True

    def __init__(self, name: str = "ldifs", weight: float = 1.0, layers="evenly_spaced", n_layers: int = 5,
                 every_k: int = 5, released_no_grad_bug: bool = False):
        self.name, self.weight = name, weight
        self.layers, self.n_layers, self.every_k = layers, n_layers, every_k
        self.released_no_grad_bug = released_no_grad_bug
        self.blocks: list[int] | None = None

    def setup(self, model, ctx: DefenseContext) -> None:
        self.blocks = select_layers(block_count(model), self.layers, self.n_layers, self.every_k)
        ctx.notes.setdefault(self.name, {})["blocks"] = self.blocks

    def extra_loss(self, model, batch, outputs: StepOutputs, ctx: DefenseContext) -> dict[str, torch.Tensor]:
        blocks = self.blocks or select_layers(block_count(model), self.layers, self.n_layers, self.every_k)
        mask = batch["attention_mask"]
        policy = [outputs.policy.hidden_states[i + 1] for i in blocks]
        if self.released_no_grad_bug:
            policy = [h.detach() for h in policy]
        reference = [outputs.reference.hidden_states[i + 1].detach() for i in blocks]
        return {self.name: ldifs_distance(ldifs_features(policy, mask), ldifs_features(reference, mask))}
