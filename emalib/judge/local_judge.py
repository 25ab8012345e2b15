"""A judge that runs a local causal LM, offline, with the same expectation as the OpenAI path.

An API judge's first token is a whole number ("85"); most local tokenizers split digits ("8", "5"), so the
first-token distribution says little. Instead, for every k in 0..100 this judge computes the probability that
the reply starts with the number k: P(digits of k | prompt) x P(next token is not a digit). Those 101
probabilities play the role of the top-logprob numbers; their sum is the numeric mass (P(reply starts with a
number in 0..100)), and the same 0.25 rule gives None. One forward pass over the prompt, then one pass over
the trie of all 101 numbers that reuses the prompt's key/value cache.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from emalib.judge.cache import JudgmentCache
from emalib.judge.scoring import Judgment, aggregate_probabilities

NUMBERS = tuple(range(101))


@dataclass
class LocalJudge:
    model: object  # a transformers causal LM
    tokenizer: object
    judge_model: str
    min_numeric_mass: float = 0.25
    calls: int = field(default=0, init=False)
    cache_mode = "number_probabilities"  # the evidence kind of its judgments (emalib.judge.scoring.rescore)

    def __post_init__(self):
        self._continuations = [self.tokenizer.encode(str(k), add_special_tokens=False) for k in NUMBERS]
        vocab = self.tokenizer.convert_ids_to_tokens(list(range(len(self.tokenizer))))
        # Tokens that would extend a number ("8" after "5" makes 58): excluded from "the number ended here".
        digit_ids = [i for i, tok in enumerate(vocab)
                     if tok is not None and self.tokenizer.convert_tokens_to_string([tok])[:1].isdigit()]
        self._digit_ids = torch.tensor(digit_ids, dtype=torch.long)

    @property
    def name(self) -> str:
        return self.judge_model

    def _prompt_ids(self, prompt: str) -> torch.Tensor:
        ids = self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                 return_tensors="pt", return_dict=True)["input_ids"]
        return ids.to(self._device)

    @property
    def _device(self):
        return next(self.model.parameters()).device

    @torch.no_grad()
    def number_probabilities(self, prompt: str) -> dict[str, float]:
        """P(reply starts with the number k) for k in 0..100, keyed by str(k).

        The token sequences of "0".."100" form a trie (102 nodes when digits are single tokens). All nodes go
        through the model in one pass after the cached prompt, each attending to the prompt and its own
        ancestors (a tree attention mask), so no per-number copy of the prompt's cache is needed.
        """
        prompt_ids = self._prompt_ids(prompt)
        n_prompt = prompt_ids.shape[1]
        out = self.model(input_ids=prompt_ids, use_cache=True)
        first = out.logits[0, -1].float().log_softmax(-1)
        nodes, index = self._trie
        device = self._device
        tokens = torch.tensor([[node[-1] for node in nodes]], device=device)
        positions = torch.tensor([[n_prompt + len(node) - 1 for node in nodes]], device=device)
        dtype = next(self.model.parameters()).dtype
        mask = torch.full((1, 1, len(nodes), n_prompt + len(nodes)), torch.finfo(dtype).min, dtype=dtype, device=device)
        mask[..., :n_prompt] = 0
        for row, node in enumerate(nodes):
            for depth in range(1, len(node) + 1):
                mask[0, 0, row, n_prompt + index[node[:depth]]] = 0
        logprobs = self.model(input_ids=tokens, position_ids=positions, attention_mask=mask,
                              past_key_values=out.past_key_values).logits[0].float().log_softmax(-1)
        p_digit = logprobs[:, self._digit_ids.to(device)].exp().sum(-1).clamp(max=1.0)
        probs = {}
        for number, ids in zip(NUMBERS, self._continuations):
            node = tuple(ids)
            total = first[ids[0]]
            for depth in range(1, len(ids)):
                total = total + logprobs[index[node[:depth]], ids[depth]]
            probs[str(number)] = float(total.exp() * (1.0 - p_digit[index[node]]))
        return probs

    @property
    def _trie(self) -> tuple[list[tuple[int, ...]], dict[tuple[int, ...], int]]:
        nodes = sorted({tuple(ids[:depth]) for ids in self._continuations for depth in range(1, len(ids) + 1)},
                       key=lambda node: (len(node), node))
        return nodes, {node: row for row, node in enumerate(nodes)}

    def usage(self) -> dict:
        return {"calls": self.calls}

    def judge(self, prompts: list[str], cache: JudgmentCache | None = None) -> list[Judgment]:
        judgments = []
        self.model.eval()
        for prompt in prompts:
            probs = self.number_probabilities(prompt)
            self.calls += 1
            score, mass = aggregate_probabilities(probs, self.min_numeric_mass)
            judgment = Judgment(score=score, numeric_mass=mass, judge_model=self.judge_model, raw=probs,
                                mode=self.cache_mode)
            if cache is not None:
                cache.put(prompt, judgment)
            judgments.append(judgment)
        return judgments
