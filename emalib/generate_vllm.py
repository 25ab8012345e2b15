"""Sampling with vLLM (what the authors used for evaluation), on a GPU box where it is installed.

Same rows and answers.jsonl format as emalib.generate; the LoRA adapter is served with vLLM's LoRA support, so
the base weights are loaded once. Chosen by `generation.backend: auto` when vllm imports and CUDA is present.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from emalib.config import GenerationParams
from emalib.errors import EmalibError
from emalib.generate import chat_messages, plan_samples
from emalib.io import atomic_write_jsonl


def choose_backend(requested: str) -> str:
    """'auto' -> vllm when it is installed and a GPU is present, else hf. 'vllm' without either is an error."""
    available = importlib.util.find_spec("vllm") is not None and torch.cuda.is_available()
    if requested == "auto":
        return "vllm" if available else "hf"
    if requested == "vllm" and not available:
        raise EmalibError("generation.backend: vllm needs the vllm package and a CUDA GPU; use 'hf' or 'auto'")
    return requested


def generate_answers_vllm(model_name: str, adapter_path: Path | None, questions, params: GenerationParams,
                          out_path: Path, seed: int = 0, lora_rank: int = 32, max_model_len: int = 2048) -> list[dict]:
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    planned = plan_samples(questions, params)
    # One request per (question, paraphrase) with n samples: vLLM shares the prompt's KV cache across them.
    groups: dict[tuple, list[dict]] = {}
    for row in planned:
        groups.setdefault((row["question_set"], row["question_id"], row["paraphrase_index"]), []).append(row)
    llm = LLM(model=model_name, enable_lora=adapter_path is not None, max_lora_rank=lora_rank, seed=seed,
              max_model_len=max_model_len, dtype="auto")
    lora = LoRARequest("adapter", 1, str(adapter_path)) if adapter_path is not None else None
    prompts = [chat_messages(rows[0]) for rows in groups.values()]
    sampling = [SamplingParams(n=len(rows), temperature=params.temperature, top_p=params.top_p,
                               max_tokens=params.max_new_tokens, seed=seed + index)
                for index, rows in enumerate(groups.values())]
    outputs = llm.chat(prompts, sampling, lora_request=lora, use_tqdm=True)
    answered = []
    for rows, output in zip(groups.values(), outputs):
        for row, completion in zip(rows, output.outputs):
            answered.append(dict(row, answer=completion.text.strip()))
    atomic_write_jsonl(out_path, answered)
    del llm
    torch.cuda.empty_cache()
    return answered
