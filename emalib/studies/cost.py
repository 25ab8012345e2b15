"""What a run needs on one GPU and how long it takes, from its params: memory of a training step (weights, LoRA and
optimizer state, activations with or without gradient checkpointing, the vocabulary-sized buffers), the largest
micro-batch that fits, and GPU hours from FLOPs at a stated utilisation (docs/methods.md#cost-model). Judge
calls and dollars come from emalib/studies/study_cost.py. `python -m emalib cost <params or study>` prints it.

The activation constants were measured on a CPU with benchmarks/bench_scale.py's random Qwen2 configurations
(fp32, sdpa attention, LoRA on the seven projections) and are checked there by tests/test_cost.py; on a GPU
Unsloth's kernels keep less, so the GPU figures are an upper estimate of the package's own buffers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from emalib.core.config import RunParams
from emalib.core.defense_specs import reference_forward_defenses
from emalib.core.errors import EmalibError

GIB = 2 ** 30
# Elements kept for the backward pass per token and decoder block: ACT_HIDDEN x hidden + ACT_MLP x intermediate
# (norm inputs and outputs, q/k/v and their rotary copies, attention output; gate, up, SiLU(gate), their product).
ACT_HIDDEN, ACT_MLP = 8.0, 4.5
# Elements of one chunk of a chunked vocabulary computation (emalib.model.losses.chunk_rows); fp32 temporaries of that size
# alive at once: one for the task loss (its log-softmax, exponentiated in place), three for KL (both log-softmaxes
# and the gradient).
CHUNK_ELEMENTS = {"cuda": 2 ** 26, "cpu": 2 ** 23}
CUDA_CONTEXT_GIB = 1.0  # CUDA context, cuBLAS workspace and allocator slack, not counted by the formulas
PEAK_TFLOPS = {"H100-80GB": 989.0, "A100-80GB": 312.0}  # dense bf16 tensor-core peak
HBM_TBPS = {"H100-80GB": 3.35, "A100-80GB": 2.0}  # memory bandwidth: a decoding step reads every weight once
CANDIDATE_TOKENS = 300  # mean tokens of an Interleaving+ candidate (a WildGuardMix prompt and answer), assumed


@dataclass(frozen=True)
class Architecture:
    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    tied: bool = False

    @property
    def kv_dim(self) -> int:
        return self.hidden // self.heads * self.kv_heads

    @property
    def block_params(self) -> int:
        d, i, kv = self.hidden, self.intermediate, self.kv_dim
        return d * (d + 2 * kv) + (d + 2 * kv) + d * d + 3 * d * i + 2 * d  # q,k,v (+ bias), o, MLP, two norms

    @property
    def params(self) -> int:
        return self.layers * self.block_params + self.vocab * self.hidden * (1 if self.tied else 2) + self.hidden

    def lora_params(self, r: int, targets: tuple[str, ...]) -> int:
        d, i, kv = self.hidden, self.intermediate, self.kv_dim
        shapes = {"q_proj": (d, d), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (d, d), "gate_proj": (d, i),
                  "up_proj": (d, i), "down_proj": (i, d)}
        return self.layers * sum(r * (n_in + n_out) for name, (n_in, n_out) in shapes.items() if name in targets)


# Public configs (config.json on the Hub) of the paper's models, so a cost needs no download.
KNOWN = {"Qwen/Qwen2.5-7B-Instruct": Architecture(152_064, 3584, 18_944, 28, 28, 4),
         "Qwen/Qwen2.5-32B-Instruct": Architecture(152_064, 5120, 27_648, 64, 40, 8)}


def architecture(name: str) -> Architecture:
    """The model's shape: from KNOWN, else from a local config.json (a path or the embedded model)."""
    if name in KNOWN:
        return KNOWN[name]
    from emalib.model.engines import embedded_model_path

    folder = embedded_model_path() if name == "smollm2-135m-instruct" else Path(name)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise EmalibError(f"{name}: shape unknown (not in emalib.studies.cost.KNOWN and no {config_file})")
    c = json.loads(config_file.read_text(encoding="utf-8"))
    return Architecture(c["vocab_size"], c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"],
                        c["num_attention_heads"], c.get("num_key_value_heads", c["num_attention_heads"]),
                        bool(c.get("tie_word_embeddings", False)))


def step_memory(arch: Architecture, batch: int, length: int, act_bytes: int, defenses: set[str],
                checkpointing: bool, device: str = "cuda", engine: str = "hf") -> dict[str, float]:
    """Bytes a training step adds on top of the resident weights and optimizer state, by kind.

    tokens N = batch x length. activations: L x N x (8 D + 4.5 I) elements, or with gradient checkpointing L x N x D
    (block inputs) plus one block's full set during its recomputation. logits: the policy's logits and their
    gradient (2 N V; the chunked task loss writes the gradient, `emalib.model.losses`); KL adds the reference logits and
    the KL gradient (2 N V); LDIFS the reference's hidden states ((L + 1) N D) and four fp32 feature copies of the
    five compared layers. TReFT keeps every layer's k_proj and v_proj outputs (2 L N kv_dim) until its term is
    computed (its initial-model prefix forwards are one-off and cached). chunk: the fp32 temporaries of one chunk (at
    most N V elements each).
    Without KL on the transformers engine the task loss comes from the final hidden states
    (`emalib.model.hidden_loss`): no logits; a chunk's logits, fp32 log-probabilities and their gradient, and the hidden
    states' gradient (N D).
    """
    n, d = batch * length, arch.hidden
    per_block = n * (ACT_HIDDEN * d + ACT_MLP * arch.intermediate) * act_bytes
    activations = (arch.layers * n * d * act_bytes + per_block) if checkpointing else arch.layers * per_block
    chunk = min(CHUNK_ELEMENTS[device], n * arch.vocab) * 4
    kl = bool({"kl", "kl_retain"} & defenses)  # both read the policy's and the reference's logits
    if not kl and engine == "hf":
        out = {"activations": activations, "logits": n * d * act_bytes, "chunk": 3 * chunk}
    else:
        logits_buffers = 2 + (2 if kl else 0)
        out = {"activations": activations, "logits": logits_buffers * n * arch.vocab * act_bytes,
               "chunk": (3 if kl else 1) * chunk}
    if "ldifs" in defenses:
        out["ldifs"] = (arch.layers + 1) * n * d * act_bytes + 4 * min(5, arch.layers) * n * d * 4
    if "treft" in defenses:
        out["treft"] = 2 * arch.layers * n * arch.kv_dim * act_bytes
    return out


def resident_memory(arch: Architecture, r: int, targets: tuple[str, ...], weight_bytes: float,
                    optimizer_bytes: int) -> dict[str, float]:
    """Bytes held for the whole run: base weights, LoRA weights and gradients in fp32 (peft keeps adapters in fp32),
    and the optimizer's two moments per LoRA weight (4 bytes each for AdamW, 1 for 8-bit AdamW)."""
    lora = arch.lora_params(r, targets)
    return {"weights": arch.params * weight_bytes, "lora_and_grads": lora * 8, "optimizer": lora * 2 * optimizer_bytes}


def _weight_bytes(arch: Architecture, dtype_bytes: int, four_bit: bool) -> float:
    if not four_bit:
        return dtype_bytes
    # 4-bit NF4 blocks (0.5 byte + ~0.03 of constants) for the blocks' linear layers; embeddings and head in bf16.
    embed = arch.vocab * arch.hidden * (1 if arch.tied else 2)
    return (0.53 * (arch.params - embed) + 2 * embed) / arch.params


def _engine(requested: str, cpu: bool) -> str:
    """The engine on the machine costed: `auto` is Unsloth on a GPU (emalib.model.engines.choose_engine)."""
    if requested != "auto":
        return requested
    return "hf" if cpu else "unsloth"


def training_memory(params: RunParams, batch: int, gpu: str = "cuda") -> dict[str, float]:
    """GiB of a training step of the run at a micro-batch of `batch` sequences of max_seq_length tokens, by kind,
    and their total (the CUDA context included on a GPU)."""
    arch = architecture(params.model.name)
    cpu = gpu == "cpu"
    act_bytes = 4 if cpu or params.model.dtype == "float32" else 2
    checkpointing = params.model.gradient_checkpointing and not cpu
    defenses = {d.name for d in params.defenses}
    weight_bytes = _weight_bytes(arch, act_bytes, params.model.load_in_4bit and not cpu)
    optimizer_bytes = 1 if params.train.optim.endswith("8bit") and not cpu else 4
    parts = {**resident_memory(arch, params.lora.r, tuple(params.lora.target_modules), weight_bytes, optimizer_bytes),
             **step_memory(arch, batch, params.train.max_seq_length, act_bytes, defenses, checkpointing,
                           "cpu" if cpu else "cuda", _engine(params.model.engine, cpu))}
    for block in params.defenses:
        if block.name == "caft":  # per ablated block: the fp32 copy autograd keeps and the cast-back output
            parts["caft"] = len(block.layers) * batch * params.train.max_seq_length * arch.hidden * (4 + act_bytes)
    gib = {k: v / GIB for k, v in parts.items()}
    gib["total"] = sum(gib.values()) + (0 if cpu else CUDA_CONTEXT_GIB)
    return gib


def largest_micro_batch(params: RunParams, gpu_gib: float) -> int:
    """The largest micro-batch (<= the configured one) whose step fits gpu_gib; 0 if none does."""
    fitting = [b for b in range(1, params.train.per_device_batch_size + 1)
               if training_memory(params, b)["total"] <= gpu_gib]
    return max(fitting, default=0)


def training_tokens(params: RunParams) -> tuple[int, bool]:
    """(tokens the run trains on, whether counted from its data): characters / 4 + 20 template tokens per example,
    x epochs; 6,000 examples of 300 tokens (the EM sets' size) when the data cannot be read here."""
    from emalib.data.chat import read_chat_jsonl, select_examples
    from emalib.data.registry import resolve

    try:
        rows = select_examples(read_chat_jsonl(resolve(params.train.dataset)), params.train.max_examples, params.seed)
        per_epoch, counted = sum(sum(len(m["content"]) for m in row) // 4 + 20 for row in rows), True
    except (EmalibError, OSError):
        per_epoch, counted = 6000 * 300, False
    for block in params.defenses:
        if block.name == "kl_retain":  # its retain rows go through both forwards, assumed as long as task rows
            per_epoch *= 1 + block.ratio
    return int(per_epoch * params.train.epochs), counted


def training_flops(arch: Architecture, tokens: int, length: int, defenses: set[str], checkpointing: bool) -> float:
    """Forward 2P + attention 2 L T D per token (the causal half of 4 L T D, T = max_seq_length as a bound); LoRA
    training with frozen weights costs about twice the forward more (input gradients, no weight gradients);
    checkpointing recomputes one forward; a defense with a reference forward (KL, LDIFS: its descriptor) adds one."""
    forward = 2 * arch.params + 2 * arch.layers * length * arch.hidden
    passes = 3 + (1 if checkpointing else 0) + (1 if reference_forward_defenses() & defenses else 0)
    return passes * forward * tokens


def validation_flops(arch: Architecture, params: RunParams, tokens: int) -> float:
    """Early stopping's validation forwards: one forward (no backward) over the validation split every eval_every
    optimizer steps, for every step the run may take (an upper bound: the run may stop sooner). The split's tokens
    are the training tokens per epoch x fraction / (1 - fraction), or counted from a validation file."""
    block = next((d for d in params.defenses if d.name == "early_stopping"), None)
    if block is None or not tokens:
        return 0.0
    per_epoch = tokens / params.train.epochs
    validation = per_epoch * block.validation_fraction / (1 - block.validation_fraction)
    if block.validation_dataset is not None:
        validation = _counted_tokens(block.validation_dataset) or validation
    forward = 2 * arch.params + 2 * arch.layers * params.train.max_seq_length * arch.hidden
    return (_optimizer_steps(params) // block.eval_every) * validation * forward


def _optimizer_steps(params: RunParams) -> int:
    """train.max_steps, else the steps of `epochs` over the training examples (6,000 when unreadable here)."""
    from emalib.data.chat import read_chat_jsonl, select_examples
    from emalib.data.registry import resolve

    if params.train.max_steps:
        return params.train.max_steps
    try:
        examples = len(select_examples(read_chat_jsonl(resolve(params.train.dataset)), params.train.max_examples,
                                       params.seed))
    except (EmalibError, OSError):
        examples = 6000
    per_step = params.train.per_device_batch_size * params.train.grad_accum_steps
    return -(-int(examples * params.train.epochs) // per_step)


def _counted_tokens(dataset: str) -> int | None:
    from emalib.data.chat import read_chat_jsonl
    from emalib.data.registry import resolve

    try:
        return sum(sum(len(m["content"]) for m in row) // 4 + 20 for row in read_chat_jsonl(resolve(dataset)))
    except (EmalibError, OSError):
        return None


def _hours(flops: float, gpu: str, utilisation: float) -> float:
    return flops / (PEAK_TFLOPS[gpu] * 1e12 * utilisation) / 3600


def scoring_flops(arch: Architecture, params: RunParams) -> float:
    """Interleaving+ scoring: every candidate through the aligned model and each adapter, forward only."""
    total = 0.0
    for block in params.defenses:
        if block.name in ("interleave_plus", "interleave_plusplus"):
            adapters = len(block.adapters) - (0 if block.use_all_adapters else 1)
            total += (block.max_candidates or 100_000) * (1 + adapters) * CANDIDATE_TOKENS * 2 * arch.params
    return total


def generation_hours(arch: Architecture, params: RunParams, answers: int, gpu: str, efficiency: float = 0.5) -> float:
    """Decoding is bound by memory bandwidth: each step of a batch of `generation.batch_size` answers reads the
    weights once, at `efficiency` of the GPU's bandwidth; max_new_tokens steps per batch (an upper bound)."""
    batches = -(-answers // params.generation.batch_size)
    step_seconds = arch.params * 2 / (HBM_TBPS[gpu] * 1e12 * efficiency)
    return batches * params.generation.max_new_tokens * step_seconds / 3600


def run_cost(params: RunParams, gpu: str = "H100-80GB", gpu_gib: float = 80.0, utilisation: float = 0.35) -> dict:
    """Memory at the configured micro-batch, the largest micro-batch that fits, and GPU hours by stage."""
    from emalib.studies.study_cost import answer_count

    arch = architecture(params.model.name)
    batch = params.train.per_device_batch_size
    memory = training_memory(params, batch)
    no_checkpointing = training_memory(params.model_copy(update={"model": params.model.model_copy(
        update={"gradient_checkpointing": False})}), batch)
    tokens, counted = training_tokens(params) if "train" in params.steps else (0, False)
    defenses = {d.name for d in params.defenses}
    flops = training_flops(arch, tokens, params.train.max_seq_length, defenses, params.model.gradient_checkpointing)
    flops += validation_flops(arch, params, tokens)  # early stopping's evaluations count as training time
    try:
        answers = answer_count(params) * (2 if params.evaluate_base else 1)
    except EmalibError:
        answers = None
    evaluating = bool({"evaluate", "evaluate_base"} & set(params.steps)) and answers is not None
    hours = {"train": _hours(flops, gpu, utilisation),
             "interleave_scoring": _hours(scoring_flops(arch, params), gpu, utilisation) if "interleave_selection"
             in params.steps else 0.0,
             "generation": generation_hours(arch, params, answers, gpu) if evaluating else 0.0}
    return {"run": params.run, "model": params.model.name, "params_billion": round(arch.params / 1e9, 2),
            "memory_gib": {k: round(v, 2) for k, v in memory.items()},
            "memory_without_checkpointing_gib": round(no_checkpointing["total"], 1),
            "fits": memory["total"] <= gpu_gib, "largest_micro_batch": largest_micro_batch(params, gpu_gib),
            "train_tokens": tokens, "tokens_counted_from_data": counted, "answers": answers,
            "gpu_hours": {k: round(v, 2) for k, v in hours.items()}}


def format_cost(costs: list[dict], judge: dict | None, gpu: str, gpu_gib: float, utilisation: float) -> str:
    """A table of the runs' memory and hours, then the totals and the judge's calls and dollars."""
    lines = [f"GPU {gpu} ({gpu_gib:g} GiB), {utilisation:.0%} of peak bf16 FLOPs; memory at the configured "
             f"micro-batch, GiB (docs/methods.md#cost-model)",
             f"{'run':<28} {'model':<26} {'step GiB':>8} {'no ckpt':>8} {'fits':>5} {'max mb':>6} {'tokens':>10} "
             f"{'train h':>8} {'score h':>8} {'gen h':>7}"]
    for c in costs:
        h = c["gpu_hours"]
        lines.append(f"{c['run'][:28]:<28} {c['model'][-26:]:<26} {c['memory_gib']['total']:>8.1f} "
                     f"{c['memory_without_checkpointing_gib']:>8.1f} {'yes' if c['fits'] else 'NO':>5} "
                     f"{c['largest_micro_batch']:>6} {c['train_tokens']:>9}{'' if c['tokens_counted_from_data'] else '*'} "
                     f"{h['train']:>8.2f} {h['interleave_scoring']:>8.2f} "
                     f"{h['generation']:>7.2f}")
    total = sum(sum(c["gpu_hours"].values()) for c in costs)
    lines.append(f"total GPU hours: {total:.1f}   (* tokens assumed: the training data cannot be read here)")
    trained = [c for c in costs if c["train_tokens"]] or costs
    if trained:
        parts = ", ".join(f"{k} {v:.2f}" for k, v in trained[0]["memory_gib"].items() if k != "total")
        lines.append(f"memory of {trained[0]['run']} (GiB): {parts}")
    if judge is not None:
        lines.append("judge: " + ", ".join(f"{k} {v}" for k, v in judge.items()))
    return "\n".join(lines)
