"""LDIFS, the l2 distance in feature space to the aligned model (docs/methods.md#ldifs; Mukhoti et al. 2024).

Features are the raw outputs of a few decoder blocks, as the authors' released extractor hooks them: the trainer
hands them over as `StepOutputs.policy_blocks` / `reference_blocks` (emalib.model.modeling.block_outputs), the last
block's output taken before the final norm. transformers' `hidden_states[L]` is the final norm's output instead,
which would make the last layer's term several times larger. The policy features keep their graph, so the term
trains the LoRA weights; the released code detached both feature sets (a constant term), reproduced only with
`released_no_grad_bug`. Padding is excluded by default (`padding: keep` reproduces the released extractor).
`preset: released` (emalib/core/defense_specs.py) sets both, with the released lambda 0.1.
"""

from __future__ import annotations

import torch

from emalib.core.errors import EmalibError
from emalib.defenses.base import DefenseBase, DefenseContext, StepOutputs
from emalib.model.losses import ldifs_distance, ldifs_features


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
                 every_k: int = 5, padding: str = "exclude", released_no_grad_bug: bool = False):
        if padding not in ("exclude", "keep"):
            raise EmalibError(f"ldifs: padding must be 'exclude' or 'keep', got {padding!r}")
        self.name, self.weight = name, weight
        self.layers, self.n_layers, self.every_k = layers, n_layers, every_k
        self.padding, self.released_no_grad_bug = padding, released_no_grad_bug
        self.blocks: list[int] | None = None

    def setup(self, model, ctx: DefenseContext) -> None:
        self.blocks = select_layers(block_count(model), self.layers, self.n_layers, self.every_k)
        ctx.notes.setdefault(self.name, {}).update(blocks=self.blocks, padding=self.padding)

    def extra_loss(self, model, batch, outputs: StepOutputs, ctx: DefenseContext) -> dict[str, torch.Tensor]:
        blocks = self.blocks or select_layers(block_count(model), self.layers, self.n_layers, self.every_k)
        if outputs.policy_blocks is None or outputs.reference_blocks is None:
            raise EmalibError("ldifs: the step carries no decoder block outputs (the trainer computes them when a "
                              "defense needs hidden states)")
        policy = [outputs.policy_blocks[i] for i in blocks]
        if self.released_no_grad_bug:
            policy = [h.detach() for h in policy]
        reference = [outputs.reference_blocks[i].detach() for i in blocks]
        mask, exclude = batch["attention_mask"], self.padding == "exclude"
        return {self.name: ldifs_distance(ldifs_features(policy, mask, exclude), ldifs_features(reference, mask, exclude))}
