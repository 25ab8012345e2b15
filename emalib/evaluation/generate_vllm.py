"""Sampling with vLLM (what the authors used for evaluation), on a GPU box where it is installed.

Same rows and answers.jsonl format as emalib.evaluation.generate; the LoRA adapter is served with vLLM's LoRA support, so
the base weights are loaded once. Chosen by `generation.backend: auto` when vllm imports and CUDA is present.
Resumable like the HF path: answers are appended to answers.jsonl.partial chunk by chunk.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch

from emalib.core.config import GenerationParams
from emalib.core.errors import EmalibError
from emalib.core.progress import Progress, progress
from emalib.evaluation.generate import answered_so_far, chat_messages, finish_answers, plan_samples, row_key


def choose_backend(requested: str) -> str:
    """'auto' -> vllm when it is installed and a GPU is present, else hf. 'vllm' without either is an error."""
    available = importlib.util.find_spec("vllm") is not None and torch.cuda.is_available()
    if requested == "auto":
        return "vllm" if available else "hf"
    if requested == "vllm" and not available:
        raise EmalibError("generation.backend: vllm needs the vllm package and a CUDA GPU; use 'hf' or 'auto'")
    return requested


REQUESTS_PER_CHUNK = 256  # (question, paraphrase) requests per vLLM call: written as each finishes, for resuming


def generate_answers_vllm(model_name: str, adapter_path: Path | None, questions, params: GenerationParams,
                          out_path: Path, seed: int = 0, lora_rank: int = 32, max_model_len: int = 2048) -> list[dict]:
    """Like emalib.evaluation.generate.generate_answers: rows already in out_path or its .partial file are kept, the
    others sampled in chunks appended to the .partial file. Request i (one per question and paraphrase, n
    samples) always has seed seed + i, so a resumed run samples what an uninterrupted one would have."""
    out_path = Path(out_path)
    planned = plan_samples(questions, params)
    partial, done = answered_so_far(out_path)
    # One request per (question, paraphrase) with n samples: vLLM shares the prompt's KV cache across them.
    groups: dict[tuple, list[dict]] = {}
    for row in planned:
        groups.setdefault((row["question_set"], row["question_id"], row["paraphrase_index"]), []).append(row)
    todo = [(index, rows) for index, rows in enumerate(groups.values()) if any(row_key(r) not in done for r in rows)]
    if todo:
        from vllm import LLM, SamplingParams
        from vllm.lora.request import LoRARequest

        llm = LLM(model=model_name, enable_lora=adapter_path is not None, max_lora_rank=lora_rank, seed=seed,
                  max_model_len=max_model_len, dtype="auto")
        lora = LoRARequest("adapter", 1, str(adapter_path)) if adapter_path is not None else None
        left = sum(len(rows) for _, rows in todo)
        with open(partial, "a", encoding="utf-8") as sink, \
                progress(len(planned), f"sampling {out_path.parent.name}", "answers", len(planned) - left) as bar:
            for start in range(0, len(todo), REQUESTS_PER_CHUNK):
                chunk = todo[start: start + REQUESTS_PER_CHUNK]
                ended, answers = bar.n, sum(len(rows) for _, rows in chunk)
                sampling = [SamplingParams(n=len(rows), temperature=params.temperature, top_p=params.top_p,
                                           max_tokens=params.max_new_tokens, seed=seed + index)
                            for index, rows in chunk]
                outputs = llm.chat([chat_messages(rows[0]) for _, rows in chunk], sampling, lora_request=lora,
                                   use_tqdm=forwarding_tqdm(bar, ended + answers))
                bar.update(ended + answers - bar.n)  # whatever vLLM's bar did not count (older versions: requests)
                for (_, rows), output in zip(chunk, outputs):
                    for row, completion in zip(rows, output.outputs):
                        row = dict(row, answer=completion.text.strip())
                        done[row_key(row)] = row
                        sink.write(json.dumps(row, ensure_ascii=False) + "\n")
                sink.flush()
        del llm
        torch.cuda.empty_cache()
    return finish_answers(out_path, planned, done)


def forwarding_tqdm(bar: Progress, limit: int):
    """A factory for vLLM's `use_tqdm`, which builds its progress bar with it (and, in some versions, iterates the
    prompts through it). The bars it makes draw nothing themselves: they move `bar` by the answers vLLM reports
    finished, never past `limit` (the chunk's last answer), so the CLI's console shows sampling answer by answer as
    it does for the HF path."""
    from tqdm import tqdm

    class Forwarding(tqdm):
        def update(self, n=1):
            n = min(n, limit - bar.n)
            if n > 0:
                bar.update(n)
            return super().update(n)

    return lambda *args, **kwargs: Forwarding(*args, **{**kwargs, "disable": True})
