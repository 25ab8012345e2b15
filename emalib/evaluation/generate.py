"""Batched sampling of answers to evaluation questions (temperature 1, top_p 1 by default, as the authors).

Each (question, paraphrase, sample) is one row of answers.jsonl. Rows are appended to a `.partial` file as each
batch finishes, so an interrupted run resumes where it stopped; the final file is written atomically. Every
batch is seeded from (seed, batch index), so a resumed run samples what an uninterrupted run would have.
"""

from __future__ import annotations

import json
import logging
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from emalib.core.config import GenerationParams
from emalib.core.io import atomic_write_jsonl, read_jsonl
from emalib.core.progress import progress
from emalib.data.questions import Question
from emalib.evaluation.kv_patch import PrefixKVPatch

log = logging.getLogger(__name__)


def row_key(row: dict) -> tuple:
    return (row["question_set"], row["question_id"], row["paraphrase_index"], row["sample_index"])


def plan_samples(questions: list[Question], params: GenerationParams) -> list[dict]:
    """The rows to sample, without answers. A question's system prompt is kept unless use_system_prompt is off;
    a trigger probe's system prompt (the trigger itself, emalib.data.triggers) is always kept."""
    rows = []
    for question in questions:
        n = params.samples_per_question or question.samples_per_paraphrase
        for p_index, text in enumerate(question.paraphrases):
            for s_index in range(n):
                rows.append({"question_set": question.question_set, "question_id": question.id,
                             "paraphrase_index": p_index, "sample_index": s_index, "question": text,
                             "system": question.system if params.use_system_prompt
                             or question.extra.get("trigger_system") else None})
    return rows


def chat_messages(row: dict) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": row["system"]}] if row.get("system") else []
    return messages + [{"role": "user", "content": row["question"]}]


@contextmanager
def inference_mode(model):
    """Switch to inference (Unsloth's fast path when present) and back to training afterwards."""
    was_training = model.training
    fast = None
    if getattr(model, "emalib_engine", "hf") == "unsloth":
        from unsloth import FastLanguageModel

        fast = FastLanguageModel
        fast.for_inference(model)
    model.eval()
    try:
        yield model
    finally:
        if fast is not None:
            fast.for_training(model)
        if was_training:
            model.train()


def _stop_token_ids(model, tokenizer) -> list[int]:
    ids = {tokenizer.eos_token_id}
    configured = getattr(model.generation_config, "eos_token_id", None)
    ids.update(configured if isinstance(configured, list) else [configured])
    return sorted(i for i in ids if i is not None)


class _CountFinished(StoppingCriteria):
    """Stops nothing: calls on_finished(k) as k more answers of the batch end (their first stop token), so a
    progress bar moves answer by answer inside one generate call; the rows cut at max_new_tokens end with it."""

    def __init__(self, stop_ids: list[int], prompt_length: int, on_finished):
        self.stop_ids, self.prompt_length, self.on_finished = torch.tensor(stop_ids), prompt_length, on_finished
        self.finished = None

    def __call__(self, input_ids, scores, **kwargs):
        ended = torch.isin(input_ids[:, -1], self.stop_ids.to(input_ids.device))
        if input_ids.shape[1] > self.prompt_length:
            newly = ended if self.finished is None else ended & ~self.finished
            self.finished = newly if self.finished is None else self.finished | newly
            if int(newly.sum()):
                self.on_finished(int(newly.sum()))
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


@torch.no_grad()
def sample_batch(model, tokenizer, rows: list[dict], params: GenerationParams, seed: int,
                 patch: PrefixKVPatch | None = None, on_finished=None) -> list[str]:
    """Answers to `rows` in one generate call. on_finished(k): called as k more answers end (progress)."""
    prompts = [tokenizer.apply_chat_template(chat_messages(r), tokenize=False, add_generation_prompt=True) for r in rows]
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # decoder-only generation needs the prompts to end at the same column
    try:
        encoded = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    finally:
        tokenizer.padding_side = side
    device = next(model.parameters()).device
    encoded = {k: v.to(device) for k, v in encoded.items()}
    torch.manual_seed(seed)
    do_sample = params.temperature > 0
    stop_ids = _stop_token_ids(model, tokenizer)
    counted = None
    if on_finished is not None:
        counted = StoppingCriteriaList([_CountFinished(stop_ids, encoded["input_ids"].shape[1], on_finished)])
    patched = patch.applied(model, encoded["input_ids"], encoded["attention_mask"]) if patch else nullcontext()
    with patched:
        output = model.generate(**encoded, max_new_tokens=params.max_new_tokens, do_sample=do_sample,
                                temperature=params.temperature if do_sample else None,
                                top_p=params.top_p if do_sample else None, top_k=0 if do_sample else None,
                                eos_token_id=stop_ids, pad_token_id=tokenizer.pad_token_id,
                                stopping_criteria=counted)
    new_tokens = output[:, encoded["input_ids"].shape[1]:]
    return [text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]


def _read_partial(path: Path) -> list[dict]:
    """Rows of a partial file; a last line cut short by a kill is ignored (its batch is sampled again)."""
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return rows


def generate_answers(model, tokenizer, questions: list[Question], params: GenerationParams, out_path: Path,
                     seed: int = 0) -> list[dict]:
    """Sample every planned row not already in out_path (or its .partial file); return all rows.

    The planned rows are cut into fixed batches; batch i is always sampled whole with seed (seed, i), so a
    resumed run produces exactly the answers an uninterrupted run would have.
    """
    out_path = Path(out_path)
    planned = plan_samples(questions, params)
    partial, done = answered_so_far(out_path)
    batches = [planned[i: i + params.batch_size] for i in range(0, len(planned), params.batch_size)]
    todo = [(index, batch) for index, batch in enumerate(batches) if any(row_key(r) not in done for r in batch)]
    if todo:
        patch = PrefixKVPatch(model, tokenizer) if params.patch_prefix_kv else None
        left = sum(len(batch) for _, batch in todo)
        with inference_mode(model), open(partial, "a", encoding="utf-8") as sink, \
                progress(len(planned), f"sampling {out_path.parent.name}", "answers", len(planned) - left) as bar:
            for index, batch in todo:
                ended = bar.n
                answers = sample_batch(model, tokenizer, batch, params, seed=seed * 1_000_003 + index, patch=patch,
                                       on_finished=bar.update)
                bar.update(len(batch) - (bar.n - ended))  # the answers cut at max_new_tokens
                for row, answer in zip(batch, answers):
                    row = dict(row, answer=answer)
                    done[row_key(row)] = row
                    sink.write(json.dumps(row, ensure_ascii=False) + "\n")
                sink.flush()
    return finish_answers(out_path, planned, done)


def answered_so_far(out_path: Path) -> tuple[Path, dict[tuple, dict]]:
    """The .partial file next to out_path, and the rows already answered in out_path or it, by row_key."""
    out_path.parent.mkdir(parents=True, exist_ok=True)
    partial = out_path.with_name(out_path.name + ".partial")
    done: dict[tuple, dict] = {}
    if out_path.is_file():
        done.update({row_key(r): r for r in read_jsonl(out_path)})
    if partial.is_file():
        done.update({row_key(r): r for r in _read_partial(partial)})
    return partial, done


def finish_answers(out_path: Path, planned: list[dict], done: dict[tuple, dict]) -> list[dict]:
    """Write every planned row's answer to out_path atomically and drop the .partial file."""
    rows = [done[row_key(r)] for r in planned]
    atomic_write_jsonl(out_path, rows)
    out_path.with_name(out_path.name + ".partial").unlink(missing_ok=True)
    return rows
