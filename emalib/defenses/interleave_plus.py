"""Interleaving+ and Interleaving++ (docs/methods.md#perplexity-gap-interleaving): interleave safe examples
with a large perplexity gap between misaligned models and the aligned model.

For a candidate d = (q, a): NLL = mean per-token negative log-likelihood of the answer given the question
(chat template, prompt masked); s_d = (mean_k NLL_mis_k - NLL_aligned) / (NLL_aligned + epsilon). The
misaligned models are plain-SFT LoRA adapters of the EM datasets, all loaded on one base (the aligned model =
that base with adapters disabled), leaving out the run's own domain unless `use_all_adapters`. Each batch is
tokenised once and run through the aligned model and every adapter. Interleaving++ (registry name
`interleave_plusplus`) first drops refusals.

Which round(ratio * |task|) candidates are interleaved (`selection`):
- released (default): the top `pool_top_n` by s_d (5,000, the released `filter_adapter_metric.py --top_n`), then a
  seeded random subset of them: what the released pipeline's shuffle and insert-one-every-n amount to;
- top_k: the highest s_d directly.
The chosen examples are shuffled into the task data.

The scoring loads models, so it is the interleave_selection step's (`score_candidates`, emalib/runs/prepare.py);
training only reads the scores file it wrote and selects (`transform_data`).
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import math
import random
from pathlib import Path

import torch

from emalib.core.errors import DataError, EmalibError, not_prepared
from emalib.defenses.base import Conversation, DefenseBase, DefenseContext
from emalib.defenses.interleave import load_pool, mix_in, safe_count
from emalib.model.token_scores import (
    final_hidden_states,
    label_logprobs,
    mean_over_labels,
    output_layer,
    unchunked_label_logprobs,
)

log = logging.getLogger(__name__)

REFUSAL_MARKERS = ("sorry", "apologize", "cannot", "can't", "i'm unable", "i am unable")


def is_refusal(answer: str) -> bool:
    """The released keyword filter: any marker in the lower-cased first 10 whitespace tokens."""
    head = " ".join(answer.lower().split()[:10])
    return any(marker in head for marker in REFUSAL_MARKERS)


def perplexity_gap(aligned_nll: torch.Tensor, misaligned_nll: torch.Tensor, epsilon: float = 1.0) -> torch.Tensor:
    """s_d = (mean_k mis[k] - aligned) / (aligned + epsilon); aligned_nll [N], misaligned_nll [K, N] -> [N]."""
    return (misaligned_nll.mean(0) - aligned_nll) / (aligned_nll + epsilon)


def rank_candidates(scores: torch.Tensor, refusals: list[bool], n: int, refusal_filter: bool) -> list[int]:
    """Indices of the n highest scores (ties: lower index first), skipping refusals when filtering and NaN scores."""
    eligible = [i for i in range(len(scores))
                if not torch.isnan(scores[i]) and not (refusal_filter and refusals[i])]
    if n > len(eligible):
        raise DataError(f"{n} top candidates needed but only {len(eligible)} are eligible (lower the ratio or "
                        f"pool_top_n, or score more candidates)")
    return sorted(eligible, key=lambda i: (-float(scores[i]), i))[:n]


def select_candidates(scores: torch.Tensor, refusals: list[bool], n: int, refusal_filter: bool,
                      selection: str = "released", pool_top_n: int = 5000, seed: int = 0) -> list[tuple[int, int]]:
    """(candidate index, rank by s_d among the eligible) of the n candidates to interleave.

    top_k: the n best. released: a seeded random sample of n among the pool_top_n best (a pool larger than the
    eligible candidates is an error: small runs lower pool_top_n explicitly, so the record says what was done).
    """
    if selection == "top_k":
        return [(index, rank) for rank, index in enumerate(rank_candidates(scores, refusals, n, refusal_filter))]
    if selection != "released":
        raise EmalibError(f"selection must be 'released' or 'top_k', got {selection!r}")
    if pool_top_n < n:
        raise DataError(f"pool_top_n={pool_top_n} is smaller than the {n} examples to interleave")
    ranked = rank_candidates(scores, refusals, pool_top_n, refusal_filter)
    ranks = random.Random(seed).sample(range(pool_top_n), n)
    return [(ranked[rank], rank) for rank in ranks]


def answer_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean NLL per labelled token of each example from full logits: [B, T, V], labels [B, T] -> [B] (NaN if none).
    The plain computation, kept as the comparison of the chunked one `score_nll` uses."""
    return -mean_over_labels(unchunked_label_logprobs(logits, labels), labels)


@torch.no_grad()
def score_nll(model, tokenizer, candidates: list[Conversation], adapter_names: list[str], batch_size: int = 8,
              max_length: int = 2048, progress=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-candidate answer NLL under the aligned model ([N]) and under each named adapter ([K, N]).

    model: a PeftModel holding the named adapters. Each candidate is tokenised once; batches are length-sorted
    (little padding); the aligned model and every adapter score a batch in ONE forward of the batch repeated
    K+1 times with per-row adapters (peft's mixed-adapter batches), and the NLL comes from the final hidden
    states a chunk of positions at a time (emalib/model/token_scores.py). progress(n) is called after each batch.
    """
    from emalib.model.tokenize import collate, tokenize_conversation

    features = [tokenize_conversation(tokenizer, messages, max_length) for messages in candidates]
    order = sorted(range(len(features)), key=lambda i: len(features[i]["input_ids"]))
    nll = torch.full((1 + len(adapter_names), len(features)), float("nan"))
    device = next(model.parameters()).device
    head = output_layer(model)
    model.eval()
    for start in range(0, len(order), batch_size):
        rows = order[start: start + batch_size]
        batch = {k: v.to(device) for k, v in collate([features[i] for i in rows], tokenizer.pad_token_id).items()}
        copies = 1 + len(adapter_names)
        per_row = [name for name in ["__base__", *adapter_names] for _ in rows]
        hidden = final_hidden_states(model, batch["input_ids"].repeat(copies, 1),
                                     batch["attention_mask"].repeat(copies, 1), adapter_names=per_row)
        labels = batch["labels"].repeat(copies, 1)
        nll[:, rows] = -mean_over_labels(label_logprobs(hidden, head, labels), labels).view(copies, -1).cpu()
        if progress is not None:
            progress(len(rows))
    return nll[0], nll[1:]


def load_ensemble(base, adapters: dict[str, str]):
    """One PeftModel holding every adapter under its domain name (one copy of the base weights)."""
    from peft import PeftModel

    names = list(adapters)
    model = PeftModel.from_pretrained(base, str(adapters[names[0]]), adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(str(adapters[name]), adapter_name=name)
    return model


def candidate_sha(messages: Conversation) -> str:
    return hashlib.sha256(json.dumps(messages, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:20]


def _read_scores(path: Path, adapters: list[str]) -> dict[str, dict]:
    """Rows of an earlier (or interrupted) scoring that hold every adapter needed, by candidate sha."""
    rows = {}
    for candidate in (path, path.with_name(path.name + ".partial")):
        if not candidate.is_file():
            continue
        for line in candidate.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                break  # a line cut short by a kill
            if set(adapters) <= set(row.get("misaligned_nll", {})):
                rows[row["sha"]] = row
    return rows


class InterleavePlusDefense(DefenseBase):
    def __init__(self, name: str = "interleave_plus", refusal_filter: bool = False, source: str = "wildguard_benign",
                 ratio: float = 0.05, adapters: dict[str, str] | None = None, held_out: str | None = None,
                 use_all_adapters: bool = False, epsilon: float = 1.0, max_candidates: int | None = 100_000,
                 batch_size: int = 8, max_seq_length: int = 2048, scores_path: str | None = None,
                 seed: int | None = None, selection: str = "released", pool_top_n: int = 5000):
        self.name, self.refusal_filter, self.source, self.ratio = name, refusal_filter, source, ratio
        self.adapters = dict(adapters or {})
        self.ensemble = {k: v for k, v in self.adapters.items() if use_all_adapters or k != held_out}
        if not self.ensemble:
            raise EmalibError(f"{name}: no misaligned adapter left to score with")
        self.epsilon, self.max_candidates, self.batch_size = epsilon, max_candidates, batch_size
        self.max_seq_length, self.scores_path, self.seed = max_seq_length, scores_path, seed
        self.selection, self.pool_top_n = selection, pool_top_n

    def scores_file(self, ctx: DefenseContext) -> Path:
        if self.scores_path is not None:
            return Path(self.scores_path)
        if ctx.run_dir is None:
            raise EmalibError(f"{self.name}: set scores_path (no run folder to write the scores to)")
        return Path(ctx.run_dir) / "interleave_scores.jsonl"

    def _seed(self, ctx: DefenseContext) -> int:
        return ctx.seed if self.seed is None else self.seed

    def candidates(self, seed: int) -> list[Conversation]:
        pool = load_pool(self.source)
        if self.max_candidates is not None and self.max_candidates < len(pool):
            pool = random.Random(seed).sample(pool, self.max_candidates)
        return pool

    def score_candidates(self, ctx: DefenseContext) -> list[dict]:
        """The interleave_selection step's scoring: score the candidates the scores file lacks (resuming from its
        .partial file after an interruption), then write the scores file; returns its rows (see `scores`)."""
        from emalib.core.io import atomic_write_jsonl

        path, names = self.scores_file(ctx), list(self.ensemble)
        candidates = self.candidates(self._seed(ctx))
        shas = [candidate_sha(c) for c in candidates]
        done = _read_scores(path, names)
        todo = [i for i, sha in enumerate(shas) if sha not in done]
        if todo:
            self._score_missing(candidates, shas, todo, names, ctx, path)
        rows = self.scores(candidates, path)
        partial = path.with_name(path.name + ".partial")
        if partial.is_file():  # new scores: merged into the scores file (a complete one is left as it is)
            atomic_write_jsonl(path, rows)
            partial.unlink()
        return rows

    def scores(self, candidates: list[Conversation], path: Path) -> list[dict]:
        """One row per candidate (aligned and per-adapter NLL, s_d, refusal) from the scores the
        interleave_selection step wrote; fails naming that step if some candidate has none."""
        names = list(self.ensemble)
        shas = [candidate_sha(c) for c in candidates]
        done = _read_scores(path, names)
        missing = sum(sha not in done for sha in shas)
        if missing:
            raise not_prepared(path, f"scores of {missing} of {len(shas)} candidates", "interleave_selection")
        rows = []
        for index, (messages, sha) in enumerate(zip(candidates, shas)):
            row = done[sha]
            mis = torch.tensor([[_nan(row["misaligned_nll"][n]) for n in names]], dtype=torch.float64).T
            score = perplexity_gap(torch.tensor([_nan(row["aligned_nll"])], dtype=torch.float64), mis, self.epsilon)
            answer = " ".join(m["content"] for m in messages if m["role"] == "assistant")
            rows.append({"index": index, "sha": sha, "aligned_nll": row["aligned_nll"],
                         "misaligned_nll": {n: row["misaligned_nll"][n] for n in names},
                         "score": _num(score[0]), "refusal": is_refusal(answer)})
        return rows

    def _score_missing(self, candidates, shas, todo, names, ctx: DefenseContext, path: Path) -> None:
        from emalib.model.engines import load_base

        if ctx.params is None:
            raise EmalibError(f"{self.name}: scoring needs the run's model params (ctx.params)")
        model_params = ctx.params.model.model_copy(update={"engine": "hf"})  # plain peft multi-adapter scoring
        base, tokenizer = load_base(model_params, self.max_seq_length)
        model = load_ensemble(base, self.ensemble)
        partial = path.with_name(path.name + ".partial")
        path.parent.mkdir(parents=True, exist_ok=True)
        chunk = max(self.batch_size * 32, 1)
        log.info("%s: scoring %d candidates with %s", self.name, len(todo), names)
        from emalib.core.progress import scoring_progress

        try:
            with open(partial, "a", encoding="utf-8") as sink, \
                    scoring_progress(len(todo), f"{self.name}: scoring candidates") as bar:
                for start in range(0, len(todo), chunk):  # written chunk by chunk, so a killed run resumes
                    part = todo[start: start + chunk]
                    aligned, mis = score_nll(model, tokenizer, [candidates[i] for i in part], names, self.batch_size,
                                             self.max_seq_length, progress=bar.update)
                    sink.writelines(json.dumps({"sha": shas[i], "aligned_nll": _num(aligned[j]),
                                               "misaligned_nll": {n: _num(mis[k, j]) for k, n in enumerate(names)}})
                                   + "\n" for j, i in enumerate(part))
                    sink.flush()  # the bar moved batch by batch inside score_nll
        finally:
            del model, base
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    def transform_data(self, conversations: list[Conversation], ctx: DefenseContext) -> list[Conversation]:
        """Select from the saved scores (the interleave_selection step runs this too, so both select alike) and
        mix the chosen candidates in; no model is loaded here."""
        from emalib.core.io import atomic_write_jsonl

        seed = self._seed(ctx)
        path = self.scores_file(ctx)
        candidates = self.candidates(seed)
        rows = self.scores(candidates, path)
        n = safe_count(len(conversations), self.ratio)
        scores = torch.tensor([_nan(r["score"]) for r in rows], dtype=torch.float64)
        refusals = [r["refusal"] for r in rows]
        chosen = select_candidates(scores, refusals, n, self.refusal_filter, self.selection, self.pool_top_n, seed)
        eligible = sum(1 for score, refusal in zip(scores.tolist(), refusals)
                       if not math.isnan(score) and not (self.refusal_filter and refusal))
        ctx.notes[self.name] = {"source": self.source, "ratio": self.ratio, "n_task": len(conversations),
                                "n_selected": n, "n_scored": len(rows), "n_eligible": eligible,
                                "selection": self.selection,
                                "pool_top_n": self.pool_top_n if self.selection == "released" else None,
                                "adapters": list(self.ensemble), "refusal_filter": self.refusal_filter,
                                "scores_path": str(path)}
        if ctx.run_dir is not None:  # the selection is the run's; the scores file may be shared (+ and ++)
            selected = [dict(rows[i], rank=rank) for i, rank in chosen]
            atomic_write_jsonl(Path(ctx.run_dir) / "interleave_selected.jsonl", selected)
        return mix_in(conversations, [candidates[i] for i, _ in chosen], seed)


def _nan(value: float | None) -> float:
    return float("nan") if value is None else value


def _num(value: torch.Tensor) -> float | None:
    value = float(value)
    return None if math.isnan(value) else value  # NaN (no answer token within max_seq_length) -> null
