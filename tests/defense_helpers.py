"""Helpers shared by tests/test_defenses_*.py (tiny random-init models, batches, data files)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch


@pytest.fixture(autouse=True)
def single_thread():
    """One intra-op thread: on a small shared CPU box, tiny models run ~30x faster than with contended threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_llama(vocab: int = 128, layers: int = 4, hidden: int = 32, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0)
    return LlamaForCausalLM(config).eval()


def peft_wrap(model, r: int = 4, targets=("q_proj", "v_proj"), random_b: bool = True):
    """A LoRA adapter; random_b=False keeps PEFT's init (B = 0, so the adapter starts as the identity)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=r, lora_alpha=2 * r, use_rslora=True, target_modules=list(targets), lora_dropout=0.0,
                        task_type="CAUSAL_LM", init_lora_weights=not random_b)
    return get_peft_model(model, config)


def padded_batch(vocab: int = 128, lengths=(7, 4), seed: int = 1) -> dict[str, torch.Tensor]:
    """Right-padded ids with a prompt/response split: labels on the last half of each row."""
    generator = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for row, n in enumerate(lengths):
        ids[row, :n] = torch.randint(1, vocab, (n,), generator=generator)
        mask[row, :n] = 1
        labels[row, n // 2:n] = ids[row, n // 2:n]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def write_chat_jsonl(path: Path, conversations) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"messages": m}) + "\n" for m in conversations))
    return path


def hook_count(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def save_weight_pair(folder: Path):
    """SafeLoRA's two checkpoints: 'aligned' = a tiny model, 'base' = the same with perturbed q/v projections,
    saved as safetensors in folder/aligned and folder/base. Returns (aligned, base, aligned dir, base dir)."""
    import copy

    aligned = tiny_llama(seed=0)
    base = copy.deepcopy(aligned)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in base.named_parameters():
            if name.endswith(("q_proj.weight", "v_proj.weight")):
                param.add_(0.3 * torch.randn_like(param))
    aligned.save_pretrained(folder / "aligned")
    base.save_pretrained(folder / "base")
    return aligned, base, folder / "aligned", folder / "base"
