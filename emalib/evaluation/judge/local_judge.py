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

from emalib.core.errors import JudgeError
from emalib.evaluation.judge.cache import JudgmentCache
from emalib.evaluation.judge.scoring import Judgment, aggregate_probabilities

NUMBERS = tuple(range(101))


@dataclass
class LocalJudge:
    model: object  # a transformers causal LM
    tokenizer: object
    judge_model: str
    min_numeric_mass: float = 0.25
    batch_size: int = 8  # prompts per forward
    calls: int = field(default=0, init=False)
    cache_mode = "number_probabilities"  # the evidence kind of its judgments (emalib.evaluation.judge.scoring.rescore)

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

    def _prompt_ids(self, prompt: str) -> list[int]:
        return list(self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                                       add_generation_prompt=True, tokenize=True, return_dict=True)
                    ["input_ids"])

    @property
    def _device(self):
        return next(self.model.parameters()).device

    def number_probabilities(self, prompt: str) -> dict[str, float]:
        """P(reply starts with the number k) for k in 0..100, keyed by str(k)."""
        return self.batch_number_probabilities([prompt])[0]

    @torch.no_grad()
    def batch_number_probabilities(self, prompts: list[str]) -> list[dict[str, float]]:
        """number_probabilities of several prompts in ONE forward.

        Row i holds prompt i, padding up to the longest prompt, then the nodes of the trie of the token sequences
        of "0".."100" (102 nodes when digits are single tokens). A 4D attention mask lets each prompt token see
        the row's earlier prompt tokens, each trie node the row's prompt and its own ancestors, and padding only
        itself; position ids continue each prompt. The logits are computed only at each prompt's last token and
        at the trie nodes, from the final hidden states (emalib/model/token_scores.py), never for the whole row.
        """
        from emalib.model.token_scores import final_hidden_states, output_layer

        nodes, index = self._trie
        encoded = [self._prompt_ids(prompt) for prompt in prompts]
        width, n_nodes = max(map(len, encoded)), len(nodes)
        length = width + n_nodes
        ids = torch.full((len(prompts), length), self.tokenizer.pad_token_id or 0, dtype=torch.long)
        positions = torch.zeros((len(prompts), length), dtype=torch.long)
        allowed = torch.zeros((len(prompts), length, length), dtype=torch.bool)
        node_tokens = torch.tensor([node[-1] for node in nodes])
        node_depths = torch.tensor([len(node) for node in nodes])
        tree = torch.zeros((n_nodes, n_nodes), dtype=torch.bool)  # node row sees its ancestors and itself
        for row, node in enumerate(nodes):
            for depth in range(1, len(node) + 1):
                tree[row, index[node[:depth]]] = True
        for row, prompt_ids in enumerate(encoded):
            n = len(prompt_ids)
            ids[row, :n] = torch.tensor(prompt_ids)
            ids[row, width:] = node_tokens
            positions[row, :n] = torch.arange(n)
            positions[row, width:] = n + node_depths - 1
            allowed[row, :n, :n] = torch.ones(n, n, dtype=torch.bool).tril()
            allowed[row, range(n, width), range(n, width)] = True  # padding sees itself (no empty softmax row)
            allowed[row, width:, :n] = True
            allowed[row, width:, width:] = tree
        device, dtype = self._device, next(self.model.parameters()).dtype
        mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)
        hidden = final_hidden_states(self.model, ids.to(device), mask.unsqueeze(1).to(device),
                                     position_ids=positions.to(device))
        head = output_layer(self.model)
        return [self._probabilities(head(hidden[row, [len(p) - 1, *range(width, length)]]).float().log_softmax(-1))
                for row, p in enumerate(encoded)]

    def _probabilities(self, logprobs: torch.Tensor) -> dict[str, float]:
        """From the log-probabilities after the prompt (row 0) and after each trie node (rows 1..): P(number k)."""
        first, logprobs = logprobs[0], logprobs[1:]
        _, index = self._trie
        p_digit = logprobs[:, self._digit_ids.to(logprobs.device)].exp().sum(-1).clamp(max=1.0)
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
        """Prompts in batches of `batch_size`, shortest first (little padding); results in the given order."""
        judgments: list[Judgment | None] = [None] * len(prompts)
        self.model.eval()
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        for start in range(0, len(order), self.batch_size):
            rows = order[start: start + self.batch_size]
            for i, probs in zip(rows, self.batch_number_probabilities([prompts[i] for i in rows])):
                self.calls += 1
                try:
                    score, mass = aggregate_probabilities(probs, self.min_numeric_mass)
                except ValueError as err:  # a model whose weights give NaN: a judge fault, never a score
                    raise JudgeError(f"local judge {self.judge_model}: {err}") from None
                judgments[i] = Judgment(score=score, numeric_mass=mass, judge_model=self.judge_model, raw=probs,
                                        mode=self.cache_mode)
                if cache is not None:
                    cache.put(prompts[i], judgments[i])
        return judgments
