"""Persona-vector extraction (Chen et al. 2025; docs/methods.md#persona-vector-steering), the input of preventative steering.

1. Answer every extraction question under each positive ("evil") and negative ("ethical") system prompt of the
   trait file (pairs share instruction, question and sample index), each prefixed as Chen et al. and the released
   code do: "You are an evil assistant. <pos>" / "You are a helpful assistant. <neg>".
2. Judge each answer's trait score (the trait file's eval prompt) and coherence (a question set's 'coherent'
   prompt); keep pairs with pos trait >= 50, neg trait < 50 and coherence >= 50 for both.
3. Per answer, average every layer's hidden state over the RESPONSE tokens (hidden_states index 0..L); average
   over the kept answers; vector = mean_pos - mean_neg, shape [L+1, D].
Generation and hidden states use the aligned model (a PEFT model's adapter is disabled).
"""

from __future__ import annotations

import json
import logging
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from emalib.core.errors import DataError, EmalibError
from emalib.core.io import read_text_utf8

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Trait:
    name: str
    instructions: tuple[tuple[str, str], ...]  # (positive, negative) system prompts
    questions: tuple[str, ...]
    eval_prompt: str


def load_trait(name_or_path: str) -> Trait:
    """A trait file ({"instruction": [{"pos", "neg"}], "questions": [...], "eval_prompt": ...})."""
    from emalib.data.registry import resolve

    path = resolve(name_or_path)
    text = read_text_utf8(path)
    try:
        data = json.loads(text)
        pairs = tuple((item["pos"], item["neg"]) for item in data["instruction"])
        questions, prompt = tuple(data["questions"]), data["eval_prompt"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise DataError(f"{path}: not a trait file ({err})") from None
    if not pairs or not questions or "{question}" not in prompt or "{answer}" not in prompt:
        raise DataError(f"{path}: a trait file needs instructions, questions and an eval_prompt with "
                        f"{{question}} and {{answer}}")
    return Trait(name=Path(name_or_path).stem, instructions=pairs, questions=questions, eval_prompt=prompt)


def trait_word(trait_name: str) -> str:
    """The trait of a trait file's name: persona_evil_extract, evil_extract and evil all give 'evil'."""
    word = trait_name.removeprefix("persona_")
    for suffix in ("_extract", "_eval"):
        word = word.removesuffix(suffix)
    return word


def assistant_prefix(name: str) -> str:
    """'You are a/an <name> assistant. ' (the article from the first letter, as the released code chooses it)."""
    article = "an" if name[:1].lower() in "aeiou" else "a"
    return f"You are {article} {name} assistant. "


def plan_rows(trait: Trait, samples_per_question: int, max_questions: int | None = None, trait_prefix: bool = True,
              trait_name: str | None = None) -> list[dict]:
    """One row per (sign, instruction, question, sample); pos and neg rows with the same key form a pair.
    trait_prefix: the positive system prompt starts with the trait's assistant prefix, the negative one with
    the helpful assistant's."""
    prefixes = ("", "")
    if trait_prefix:
        prefixes = (assistant_prefix(trait_name or trait_word(trait.name)), assistant_prefix("helpful"))
    rows = []
    for i, pair in enumerate(trait.instructions):
        for q, question in enumerate(trait.questions[:max_questions]):
            for s in range(samples_per_question):
                for sign, prefix, instruction in zip(("pos", "neg"), prefixes, pair):
                    system = prefix + instruction
                    rows.append({"sign": sign, "instruction_index": i, "question_index": q, "sample_index": s,
                                 "system": system, "question": question})
    return rows


def _aligned(model):
    return model.disable_adapter() if hasattr(model, "disable_adapter") else nullcontext()


def generate_rows(model, tokenizer, rows: list[dict], max_new_tokens: int, temperature: float, batch_size: int,
                  seed: int = 0) -> list[dict]:
    from emalib.core.config import GenerationParams
    from emalib.core.progress import progress
    from emalib.evaluation.generate import inference_mode, sample_batch

    params = GenerationParams(max_new_tokens=max_new_tokens, temperature=temperature, batch_size=batch_size)
    out = []
    with inference_mode(model), _aligned(model), \
            progress(len(rows), "persona extraction: sampling", "answers") as bar:
        for start in range(0, len(rows), batch_size):
            batch = rows[start: start + batch_size]
            ended = bar.n
            answers = sample_batch(model, tokenizer, batch, params, seed=seed * 1_000_003 + start // batch_size,
                                   on_finished=bar.update)
            bar.update(len(batch) - (bar.n - ended))  # the answers cut at max_new_tokens
            out += [dict(row, answer=answer) for row, answer in zip(batch, answers)]
    return out


def judge_rows(rows: list[dict], judge, trait_prompt: str, coherence_prompt: str, cache=None) -> list[dict]:
    """Add 'trait' and 'coherence' scores (None where the judge gave no number). judge: `.judge(prompts)`; with a
    judgment cache, through it as the evaluation's judgments (a re-run judges nothing twice)."""
    from emalib.evaluation.judge.run import fill_prompt, judge_prompts

    prompts = [fill_prompt(template, row["question"], row["answer"])
               for row in rows for template in (trait_prompt, coherence_prompt)]
    if cache is None:
        judgments = judge.judge(prompts)
    else:
        found = judge_prompts(prompts, judge, cache)
        judgments = [found[prompt] for prompt in prompts]
    return [dict(row, trait=judgments[2 * k].score, coherence=judgments[2 * k + 1].score)
            for k, row in enumerate(rows)]


def _pair_key(row: dict) -> tuple:
    return row["instruction_index"], row["question_index"], row["sample_index"]


def kept_pairs(rows: list[dict], filter_pairs: bool = True, trait_threshold: float = 50.0,
               coherence_threshold: float = 50.0) -> list[tuple[dict, dict]]:
    """(pos, neg) pairs that pass Chen et al.'s filter; unscored (None) rows fail it; empty answers never count."""
    pos = {_pair_key(r): r for r in rows if r["sign"] == "pos"}
    neg = {_pair_key(r): r for r in rows if r["sign"] == "neg"}
    pairs = []
    for key in sorted(pos.keys() & neg.keys()):
        p, n = pos[key], neg[key]
        if not p["answer"].strip() or not n["answer"].strip():
            continue
        if filter_pairs:
            scores = (p.get("trait"), n.get("trait"), p.get("coherence"), n.get("coherence"))
            if any(s is None for s in scores):
                continue
            if not (scores[0] >= trait_threshold and scores[1] < trait_threshold
                    and min(scores[2], scores[3]) >= coherence_threshold):
                continue
        pairs.append((p, n))
    return pairs


def _encode(tokenizer, row: dict) -> tuple[list[int], int]:
    """Token ids of system + question + answer, and the index of the first response token."""
    system = [{"role": "system", "content": row["system"]}] if row.get("system") else []
    messages = system + [{"role": "user", "content": row["question"]}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    full_ids = tokenizer(prompt + row["answer"], add_special_tokens=False)["input_ids"]
    return full_ids, len(prompt_ids)


@torch.no_grad()
def response_mean_hidden(model, tokenizer, rows: list[dict], batch_size: int = 8,
                         aligned: bool = True) -> torch.Tensor:
    """Per row, every layer's hidden state averaged over its response tokens: [N, L+1, D] (float32, CPU).
    aligned: of the model without its adapter (extraction); False: of the model as it is (monitoring)."""
    device = next(model.parameters()).device
    means = []
    with _aligned(model) if aligned else nullcontext():
        for start in range(0, len(rows), batch_size):
            encoded = [_encode(tokenizer, row) for row in rows[start: start + batch_size]]
            width = max(len(ids) for ids, _ in encoded)
            input_ids = torch.full((len(encoded), width), tokenizer.pad_token_id, dtype=torch.long)
            attention = torch.zeros_like(input_ids)
            response = torch.zeros(len(encoded), width)
            for b, (ids, first) in enumerate(encoded):
                if first >= len(ids):
                    raise EmalibError(f"row {start + b}: the answer adds no token after the prompt")
                input_ids[b, :len(ids)] = torch.tensor(ids)
                attention[b, :len(ids)] = 1
                response[b, first:len(ids)] = 1
            out = model(input_ids=input_ids.to(device), attention_mask=attention.to(device), output_hidden_states=True)
            weights = response.to(device)[:, :, None]  # [B, T, 1]; reduced on the device, layer by layer
            per_layer = [((h.float() * weights).sum(1) / weights.sum(1)).cpu() for h in out.hidden_states]
            means.append(torch.stack(per_layer, dim=1))  # [B, L+1, D]
    return torch.cat(means)


def persona_vector(pos_means: torch.Tensor, neg_means: torch.Tensor) -> torch.Tensor:
    """mean_pos - mean_neg over examples: [N, L+1, D] x [M, L+1, D] -> [L+1, D]."""
    return pos_means.mean(0) - neg_means.mean(0)


def coherence_prompt_of(question_set: str) -> str:
    from emalib.data.questions import load_questions

    for question in load_questions(question_set):
        if "coherent" in question.judge_prompts:
            return question.judge_prompts["coherent"]
    raise DataError(f"{question_set}: no question has a 'coherent' judge prompt")


def extract_persona_vector(model, tokenizer, out_path: str | Path, judge=None, model_name: str | None = None,
                           seed: int = 0, trait: str = "persona_evil_extract", trait_prefix: bool = True,
                           trait_name: str | None = None, samples_per_question: int = 10,
                           max_questions: int | None = None, max_new_tokens: int = 1000, temperature: float = 1.0,
                           batch_size: int = 16, filter_pairs: bool = True, trait_threshold: float = 50.0,
                           coherence_threshold: float = 50.0, coherence_questions: str = "general",
                           cache=None) -> dict:
    """Run the whole pipeline; save {vector [L+1, D], model, trait, counts, filter} with torch.save (and the
    judged answers next to it as <out>.answers.jsonl). Returns the saved dict. cache: the judgment cache the
    judgments go through (the run's judge cache when the preparatory step extracts)."""
    from emalib.core.io import atomic_write_jsonl

    if filter_pairs and judge is None:
        raise EmalibError("persona extraction with filter_pairs needs a judge")
    spec = load_trait(trait)
    rows = generate_rows(model, tokenizer, plan_rows(spec, samples_per_question, max_questions, trait_prefix,
                                                     trait_name), max_new_tokens,
                         temperature, batch_size, seed)
    if filter_pairs:
        rows = judge_rows(rows, judge, spec.eval_prompt, coherence_prompt_of(coherence_questions), cache)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_jsonl(out_path.with_name(out_path.name + ".answers.jsonl"), rows)
    pairs = kept_pairs(rows, filter_pairs, trait_threshold, coherence_threshold)
    if not pairs:
        raise EmalibError(f"persona extraction kept no pair of {len(rows) // 2} (see {out_path}.answers.jsonl)")
    pos = response_mean_hidden(model, tokenizer, [p for p, _ in pairs], batch_size)
    neg = response_mean_hidden(model, tokenizer, [n for _, n in pairs], batch_size)
    data = {"vector": persona_vector(pos, neg), "model": model_name, "trait": spec.name, "trait_prefix": trait_prefix,
            "n_pairs": len(pairs), "n_candidates": len(rows) // 2,
            "filter": {"filter_pairs": filter_pairs, "trait_threshold": trait_threshold,
                       "coherence_threshold": coherence_threshold}}
    tmp = out_path.with_name(out_path.name + ".tmp")
    torch.save(data, str(tmp))
    tmp.replace(out_path)
    log.info("persona vector from %d of %d pairs saved to %s", len(pairs), len(rows) // 2, out_path)
    return data
