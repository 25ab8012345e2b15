"""GRPO through TRL's GRPOTrainer with the paper's defenses (docs/methods.md#rl-grpo).

What this subclass adds to TRL:
- persona steering (and any defense's forward context) around the training forward (`compute_loss`), and, when
  a steering block asks for it, around the rollouts; the reference forward (beta > 0) runs outside both, unsteered;
- the SFT mix (interleaving in RL): every k loss computations, weight * cross-entropy on one batch of safe data,
  divided by the gradient-accumulation steps like TRL's GRPO term (`scale: grad_accum`, the released behaviour);
- on CPU, log-probabilities from the plain logits: TRL's fused LM head needs a Triton GPU driver.
KL (beta) is TRL's: its reference forward disables the adapter (the aligned model, no second copy of the weights;
the frozen copy of the starting adapter that TRL >= 1.x adds to a passed-in PEFT model is removed). The per-step reward statistics go to <run>/rl_rewards.csv (emalib.training.rl.rewards_log).
"""

from __future__ import annotations

import logging
import random
from contextlib import nullcontext

import torch
from trl import GRPOConfig, GRPOTrainer
from trl.trainer.utils import entropy_from_logits, selective_log_softmax

from emalib.defenses.base import DefenseContext
from emalib.defenses.stack import DefenseStack
from emalib.model.losses import token_cross_entropy_sum
from emalib.model.tokenize import ChatDataset, collate
from emalib.training.trainer import trainer_arguments

log = logging.getLogger(__name__)


class SftMix:
    """Batches of safe chat data for the SFT term, in a seeded order that depends only on the term's number, so a
    resumed run continues with the batch it would have used."""

    def __init__(self, dataset: ChatDataset, pad_token_id: int, every_k: int, weight: float, count: str,
                 batch_size: int, seed: int, scale: str = "grad_accum"):
        self.dataset, self.pad_token_id, self.seed, self.scale = dataset, pad_token_id, seed, scale
        self.every_k, self.weight, self.count, self.batch_size = every_k, weight, count, batch_size
        self.batches_per_pass = max(1, len(dataset) // batch_size)  # drop_last, as the released loader

    def batch(self, term: int) -> dict[str, torch.Tensor]:
        """The term-th SFT batch (0-based): passes over the data, each in its own seeded order."""
        order = list(range(len(self.dataset)))
        random.Random(self.seed + term // self.batches_per_pass).shuffle(order)
        start = (term % self.batches_per_pass) * self.batch_size
        indices = order[start: start + self.batch_size] or order[: self.batch_size]
        return collate([self.dataset[i] for i in indices], self.pad_token_id)


def sft_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy over the batch's labelled (assistant) tokens."""
    device = next(model.parameters()).device
    logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)).logits
    total, count = token_cross_entropy_sum(logits, batch["labels"].to(device))
    return total / count.clamp(min=1)


class EmGRPOTrainer(GRPOTrainer):
    def __init__(self, *args, defenses: DefenseStack | None = None, defense_ctx: DefenseContext | None = None,
                 sft_mix: SftMix | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        if "ref" in getattr(self.model, "peft_config", {}):
            # With beta > 0, TRL copies a passed-in adapter as a frozen "ref" adapter. The KL defense's reference is
            # the aligned model, i.e. this model with its adapter disabled, as in the released code (older TRL).
            self.model.delete_adapter("ref")
        self.defenses = defenses if defenses is not None else DefenseStack()
        self.defense_ctx = defense_ctx if defense_ctx is not None else DefenseContext()
        self.sft_mix = sft_mix
        self.loss_calls: int | None = None  # compute_loss calls so far (restored from global_step on resume)
        self.sft_terms: list[dict] = []  # every SFT term entered: call number, step, value (tests, log)
        self._sft_step_done = -1
        self._terms_before = 0
        self._sft_values: list[float] = []

    # -- defenses around the forwards ---------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.loss_calls is None:  # first call of this process: a resumed run continues the counts
            self.loss_calls = self.state.global_step * self.args.gradient_accumulation_steps
            self._terms_before = self._sft_terms_until(self.state.global_step)
        self.loss_calls += 1
        with self.defenses.forward_context(model, self.defense_ctx):
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            if self._sft_due():
                term = sft_loss(model, self.sft_mix.batch(self._terms_before + len(self.sft_terms)))
                grpo_loss, loss = loss, loss + self.sft_mix.weight * term / self._sft_divisor()
                self.sft_terms.append({"call": self.loss_calls, "step": self.state.global_step + 1,
                                       "value": float(term.detach()), "grpo_loss": float(grpo_loss.detach()),
                                       "total": float(loss.detach())})
                self._sft_values.append(float(term.detach()))
        return loss

    def _sft_divisor(self) -> int:
        """TRL 1.x divides its GRPO term by the accumulation steps inside its loss (transformers then leaves the
        sum alone); the released trainer (older TRL) had transformers divide GRPO + w * SFT. `grad_accum` matches it."""
        if self.sft_mix.scale == "none":
            return 1
        return getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps)

    def _sft_due(self) -> bool:
        mix = self.sft_mix
        if mix is None or not self.model.training:
            return False
        if mix.count == "micro_batch":  # the released counter: every k-th loss computation
            return self.loss_calls % mix.every_k == 0
        step = self.state.global_step + 1  # the optimizer step being accumulated
        if step % mix.every_k or self._sft_step_done == step:
            return False
        self._sft_step_done = step
        return True

    def _sft_terms_until(self, global_step: int) -> int:
        """How many SFT terms the optimizer steps before `global_step` entered."""
        mix = self.sft_mix
        if mix is None:
            return 0
        if mix.count == "micro_batch":
            return global_step * self.args.gradient_accumulation_steps // mix.every_k
        return global_step // mix.every_k

    def _generate(self, prompts):
        steer = any(getattr(d, "during_rollouts", False) for d in self.defenses.defenses)
        context = self.defenses.forward_context(self.model, self.defense_ctx) if steer else nullcontext()
        with context:
            return super()._generate(prompts)

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None,
                                           compute_entropy=False, compute_aux_loss=False, **multimodal):
        if input_ids.device.type != "cpu" or any(v is not None for v in multimodal.values()):
            return super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, batch_size, compute_entropy, compute_aux_loss,
                **multimodal)
        return plain_token_logps(model, input_ids, attention_mask, logits_to_keep, self.temperature,
                                 batch_size or input_ids.size(0), compute_entropy)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self._sft_values:
            logs = {**logs, "sft_loss": sum(self._sft_values) / len(self._sft_values)}
            self._sft_values = []
        super().log(logs, start_time)


def plain_token_logps(model, input_ids, attention_mask, logits_to_keep: int, temperature: float, batch_size: int,
                      compute_entropy: bool):
    """Log-probabilities (and entropies) of the last `logits_to_keep` tokens from the model's logits."""
    all_logps, all_entropies = [], []
    for start in range(0, input_ids.size(0), batch_size):
        ids, mask = input_ids[start: start + batch_size], attention_mask[start: start + batch_size]
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        logits = logits[:, -logits_to_keep - 1: -1].float() / temperature  # position t predicts token t+1
        all_logps.append(selective_log_softmax(logits, ids[:, -logits_to_keep:]))
        if compute_entropy:
            all_entropies.append(entropy_from_logits(logits))
    entropies = torch.cat(all_entropies) if compute_entropy else None
    return torch.cat(all_logps), entropies, None


def grpo_config(params, output_dir, dtype: torch.dtype) -> GRPOConfig:
    """TRL's config from the run's train (optimizer, schedule, batch, steps) and rl (sampling, beta, loss) sections.

    TRL divides the loss's logits by its `temperature`; the released stack scored tokens at temperature 1 while
    sampling at rl.temperature, so `temperature` is the log-prob one and the sampling temperature goes to the
    generation kwargs, which TRL lets override its own."""
    rl = params.rl
    logprob_temperature = rl.temperature if rl.logprob_temperature is None else rl.logprob_temperature
    shared = trainer_arguments(params, output_dir, dtype) | {"logging_steps": 1}  # the reward log: every step
    return GRPOConfig(
        **shared, num_generations=rl.num_generations, max_completion_length=rl.max_completion_length,
        temperature=logprob_temperature, generation_kwargs={"temperature": rl.temperature}, top_p=rl.top_p,
        beta=rl.beta, loss_type=rl.loss_type, use_bias_correction_kl=rl.kl_bias_correction,
        reward_weights=list(rl.reward_weights) if rl.reward_weights else None)


def build_sft_mix(params, tokenizer, conversations) -> SftMix:
    mix = params.rl.sft_mix
    dataset = ChatDataset.build(tokenizer, conversations, params.train.max_seq_length)
    return SftMix(dataset, tokenizer.pad_token_id, mix.every_k, mix.weight, mix.count,
                  mix.batch_size or params.train.per_device_batch_size, params.seed, mix.scale)

