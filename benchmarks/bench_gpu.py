"""The first thing to run on a new GPU box (under 10 minutes on one H100): does the paper's training path run here,
and how far is the cost model from what it measures.

    python benchmarks/bench_gpu.py --params params/paper/code.yaml --out benchmarks/results/gpu-h100.json
    python benchmarks/bench_gpu.py --tiny       # a tiny random architecture: a CPU runs it in about a minute
    python benchmarks/bench_gpu.py --table FILE # reprint the tables of a results file
    scripts/gpu_check.sh                        # `emalib doctor`, then this, results named after the GPU

Part 1 (scale): a randomly initialised model with the architecture of the params' model (Qwen2.5-7B-Instruct's
public config.json is written below: nothing is downloaded), saved to a temporary folder and loaded through the
package's engine (`load_model`: Unsloth on CUDA) with the params' LoRA, bf16 and gradient checkpointing. On
micro-batches of 4 x 2,048 random tokens (the first quarter a prompt without loss) it measures plain SFT and every
defense that changes the training step (a loss term, a reference forward or a forward hook: KL, LDIFS, persona
steering, and any defense registered later): the step time (forward + backward as `EmTrainer.compute_loss` runs it,
median of --steps after a warm-up, the optimizer's state already made) and the peak memory, each beside the cost
model's prediction (`emalib.studies.cost.training_memory`) and its relative error: the step's own memory
(activations, logits, chunks, LoRA gradients) and, on CUDA, everything allocated (weights and optimizer included).

Part 2 (embedded): SmolLM2-135M-Instruct through the Unsloth engine, a few optimizer steps of `train_adapter` (the
real trainer, the params' optimizer) with plain SFT and each defense that runs without prepared artifacts, every
loss term logged and checked finite, and no import-order warning (Unsloth is imported before transformers, peft
and trl, as the package's entry points do). Then sampling through `generate_answers_vllm` with the plain run's
adapter when vLLM and CUDA are present, else skipped with the reason.

Writes --out (JSON) and prints the tables; exit code 1 when a check failed (an error, a non-finite loss term, an
import-order warning). Nothing here needs the network.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import logging
import math
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

# Qwen/Qwen2.5-7B-Instruct's public config.json (the keys that shape the model); tests/test_bench_gpu.py checks
# its shape against emalib.studies.cost.KNOWN.
PUBLIC_CONFIGS = {
    "Qwen/Qwen2.5-7B-Instruct": {
        "model_type": "qwen2", "vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944,
        "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
        "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "hidden_act": "silu",
        "tie_word_embeddings": False, "use_sliding_window": False, "max_window_layers": 28,
        "bos_token_id": 151643, "eos_token_id": 151645},
}
# --tiny: the same family, small enough for a CPU; the vocabulary is the embedded tokenizer's, so any engine
# accepts the tokenizer saved beside it.
TINY_CONFIG = {"model_type": "qwen2", "vocab_size": 49152, "hidden_size": 64, "intermediate_size": 176,
               "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2,
               "max_position_embeddings": 2048, "tie_word_embeddings": False}
IMPORT_ORDER_MARKERS = ("imported before unsloth", "should be imported before")


class _ImportOrderLog(logging.Handler):
    """Keeps every log record that says Unsloth came too late (emalib.model.engines' and Unsloth's own)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        text = record.getMessage()
        if any(marker in text.lower() for marker in IMPORT_ORDER_MARKERS):
            self.messages.append(text)


def import_unsloth_first(recorder: _ImportOrderLog) -> dict:
    """Import Unsloth through the package's entry-point hook before this script imports transformers or peft."""
    from emalib.model.engines import import_engine_first

    early = [name for name in ("transformers", "peft", "trl") if name in sys.modules]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import_engine_first("unsloth")
    recorder.messages += [str(w.message) for w in caught
                          if any(marker in str(w.message).lower() for marker in IMPORT_ORDER_MARKERS)]
    return {"imported_before_unsloth": early}


def defense_kinds() -> dict[str, str]:
    """Every registered defense by what it changes: 'step' (a loss term, a reference forward or a forward hook),
    'data' (the training data only) or 'after' (the adapter between or after steps: its step is plain SFT's)."""
    from emalib.defenses.base import DefenseBase
    from emalib.defenses.registry import DEFENSES

    kinds = {}
    for name, factory in DEFENSES.items():
        cls = getattr(factory, "func", factory)  # Interleaving+ and ++ are partials of one class
        hooked = getattr(cls, "forward_context", DefenseBase.forward_context) is not DefenseBase.forward_context
        if getattr(cls, "has_loss", True) or getattr(cls, "needs_reference", False) or hooked:
            kinds[name] = "step"
        elif getattr(cls, "transform_data", DefenseBase.transform_data) is not DefenseBase.transform_data:
            kinds[name] = "data"
        else:
            kinds[name] = "after"
    return kinds


def defense_block(name: str, folder: Path, layers: int, hidden: int, model: str) -> dict:
    """A config block with the defense's defaults, and what it needs prepared made up: a random persona vector or
    CAFT directions at the paper's steering layer (2/3 of the depth on a smaller model), the offline mirror's
    WildGuard sample as a data source."""
    import torch

    from emalib.core.defense_specs import block_of

    block = {"name": name}
    fields = block_of(name).model_fields
    layer = 20 if layers >= 20 else max(1, layers * 2 // 3)
    torch.manual_seed(0)
    if "vector_path" in fields:
        path = folder / f"{name}_vector.pt"
        torch.save({"vector": torch.randn(layers + 1, hidden) / hidden ** 0.5, "model": model}, path)
        block.update(vector_path=str(path), layer=layer)
    if "directions_path" in fields:
        from emalib.defenses.caft import save_directions

        path = save_directions(folder / f"{name}_directions.pt", {layer - 1: torch.randn(2, hidden)})
        block.update(layers=[layer - 1], select="all", directions_path=str(path))
    if "source" in fields:
        block["source"] = "wildguard_benign_sample"
    return block


def save_random_model(config: dict, folder: Path, dtype, device: str) -> Path:
    """A randomly initialised model of `config` and the embedded tokenizer (the batches are random ids), as a
    checkpoint folder any engine loads."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from emalib.model.engines import embedded_model_path

    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config), dtype=dtype)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(embedded_model_path()).save_pretrained(folder)
    del model
    _free()
    return folder


def _free() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def bench_params(name: str, model: dict, base, blocks: list[dict], train: dict, results_dir: str = "results"):
    """RunParams with the base params' LoRA and optimizer, the given model, training shape and defenses."""
    from emalib.core.config import params_from_dict

    return params_from_dict({"study": "bench_gpu", "run": name.replace("+", "_"), "results_dir": results_dir,
                             "model": model, "lora": base.lora.model_dump(),
                             "train": {"optim": base.train.optim, **train}, "defenses": blocks})


def predicted_gib(params, batch: int, cuda: bool) -> dict:
    """The cost model's step memory (what the step adds, LoRA gradients included: the backward makes them) and,
    on CUDA, the whole allocation (its total without the CUDA context, which the allocator does not count)."""
    from emalib.studies.cost import CUDA_CONTEXT_GIB, training_memory

    memory = training_memory(params, batch, "cuda" if cuda else "cpu")
    resident = ("weights", "lora_and_grads", "optimizer", "total")
    step = sum(v for k, v in memory.items() if k not in resident) + memory["lora_and_grads"] / 2
    return {"step": step, "total": memory["total"] - CUDA_CONTEXT_GIB if cuda else None}


def _error(measured: float | None, predicted: float | None) -> float | None:
    if measured is None or predicted is None or measured <= 0:
        return None
    return round((predicted - measured) / measured, 3)


def scale_part(args, base, workdir: Path) -> dict:
    import torch
    from bench_defenses import make_batch, make_step, with_retain_rows
    from pydantic import ValidationError
    from transformers import TrainingArguments

    from emalib.core.errors import EmalibError
    from emalib.defenses.base import DefenseContext
    from emalib.defenses.registry import build_defenses
    from emalib.model.engines import choose_engine, load_model
    from emalib.training.trainer import EmTrainer

    cuda = torch.cuda.is_available()
    config = TINY_CONFIG if args.tiny else PUBLIC_CONFIGS.get(base.model.name)
    if config is None:
        raise EmalibError(f"{args.params}: model.name {base.model.name} has no public config in "
                          f"benchmarks/bench_gpu.py (known: {', '.join(PUBLIC_CONFIGS)}); use --tiny or add it")
    engine = args.scale_engine or choose_engine(base.model.engine)
    dtype = "bfloat16" if cuda else "float32"
    start = time.perf_counter()
    folder = save_random_model(config, workdir / "random-model", getattr(torch, dtype), "cuda" if cuda else "cpu")
    model_block = {"name": str(folder), "engine": engine, "dtype": dtype, "gradient_checkpointing": True,
                   "load_in_4bit": base.model.load_in_4bit}
    train = {"per_device_batch_size": args.batch_size, "max_seq_length": args.seq_len}
    plain = bench_params("plain", model_block, base, [], train)
    model, tokenizer = load_model(plain.model, plain.lora, seed=0, max_seq_length=args.seq_len)
    model.train()
    setup_s = time.perf_counter() - start
    # Stand-in conversations packed to seq_len (labels on the answers), in the embedded tokenizer's ids, which
    # every vocabulary here holds.
    batch = make_batch(tokenizer, args.batch_size, args.seq_len)
    targs = TrainingArguments(output_dir=str(workdir / "t"), report_to="none", use_cpu=not cuda)
    optimizer = _optimizer(model, base.train.optim)
    layers, hidden = config["num_hidden_layers"], config["hidden_size"]
    configs = {"plain": []} | {name: [defense_block(name, workdir, layers, hidden, base.model.name)]
                               for name, kind in defense_kinds().items() if kind == "step"}
    rows = {}
    for index, (name, blocks) in enumerate(configs.items()):
        try:
            params = bench_params(name, model_block, base, blocks, train)
        except (EmalibError, ValidationError) as err:  # a defense registered with fields this script cannot fill
            rows[name] = {"skipped": f"{type(err).__name__}: {err}".splitlines()[0][:300]}
            continue
        try:
            stack, ctx = build_defenses(params.defenses), DefenseContext(params=params, tokenizer=tokenizer)
            stack.setup(model, ctx)
            trainer = EmTrainer(model=model, args=targs, defenses=stack, defense_ctx=ctx)
            if index == 0:  # one optimizer step first: its state is resident during every measured step
                device = next(model.parameters()).device
                trainer.compute_loss(model, {k: v.to(device) for k, v in batch.items()}).backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            marked = with_retain_rows(batch) if name == "kl_retain" else batch  # its KL rows, as bench_defenses
            rows[name] = _measure(make_step(trainer, model, marked), args, cuda)
            prediction = predicted_gib(params, args.batch_size, cuda)
            rows[name].update(predicted_step_gib=round(prediction["step"], 3),
                              step_error=_error(rows[name]["step_gib"], prediction["step"]))
            if cuda:
                rows[name].update(predicted_total_gib=round(prediction["total"], 3),
                                  total_error=_error(rows[name]["total_gib"], prediction["total"]))
        except Exception as err:  # noqa: BLE001 (an out-of-memory or engine error is a result of this check)
            rows[name] = {"error": f"{type(err).__name__}: {err}"[:400]}
            _free()
    del model, optimizer
    _free()
    return {"model": "tiny random qwen2" if args.tiny else base.model.name, "config": config, "engine": engine,
            "dtype": dtype, "gradient_checkpointing": cuda, "optimizer": _opt_name(base.train.optim), "lora": base.lora.model_dump(mode="json"),
            "batch": [args.batch_size, args.seq_len], "setup_s": round(setup_s, 1), "rows": rows}


def _opt_name(optim: str) -> str:
    import torch

    return "bitsandbytes AdamW8bit" if optim.endswith("8bit") and torch.cuda.is_available() else "torch AdamW"


def _optimizer(model, optim: str):
    """The params' optimizer over the LoRA weights (8-bit AdamW needs CUDA, as in training)."""
    import torch

    trained = [p for p in model.parameters() if p.requires_grad]
    if optim.endswith("8bit") and torch.cuda.is_available():
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(trained, lr=1e-4)
    return torch.optim.AdamW(trained, lr=1e-4)


def _measure(step, args, cuda: bool) -> dict:
    """Warm-up steps, then --steps timed ones: median seconds, the step's peak memory and (CUDA) all allocated."""
    import torch

    for _ in range(args.warmup):
        step()
    times, peaks, totals = [], [], []
    for _ in range(args.steps):
        seconds, peak = step()
        times.append(seconds)
        peaks.append(peak)
        if cuda:
            totals.append(torch.cuda.max_memory_allocated())
    row = {"step_s": round(statistics.median(times), 3), "times": [round(t, 3) for t in times],
           "step_gib": round(max(peaks) / 2 ** 30, 3)}
    if cuda:
        row.update(total_gib=round(max(totals) / 2 ** 30, 3),
                   reserved_gib=round(torch.cuda.max_memory_reserved() / 2 ** 30, 3))
    return row


def embedded_part(args, base, workdir: Path) -> dict:
    """A few training steps of the embedded model on the Unsloth engine with plain SFT and each defense."""
    import torch
    from pydantic import ValidationError

    from emalib.core.errors import EmalibError
    from emalib.data.standins import em_standin_conversations
    from emalib.defenses.base import DefenseContext
    from emalib.defenses.registry import build_defenses
    from emalib.model.engines import EMBEDDED_MODEL, embedded_model_path, load_model
    from emalib.training.trainer import train_adapter

    model_block = {"name": EMBEDDED_MODEL, "engine": "unsloth",
                   "dtype": "auto" if torch.cuda.is_available() else "float32"}
    length = 96 if args.tiny else 512
    train = {"per_device_batch_size": 1 if args.tiny else 4, "grad_accum_steps": 1, "max_steps": args.train_steps,
             "max_seq_length": length, "logging_steps": 1, "warmup_steps": 0}
    kinds = defense_kinds()
    shape = json.loads((embedded_model_path() / "config.json").read_text())
    rows = {}
    for name in ["plain", *[n for n, kind in kinds.items() if kind != "after"]]:
        run_dir = workdir / "embedded" / name
        try:  # what a defense needs prepared (an interleaving pool, adapters to score with) may not be here
            blocks = [] if name == "plain" else [defense_block(name, workdir, shape["num_hidden_layers"],
                                                                shape["hidden_size"], EMBEDDED_MODEL)]
            params = bench_params(name, model_block, base, blocks, train, str(workdir / "embedded"))
            stack = build_defenses(params.defenses)
            ctx = DefenseContext(seed=0, run_dir=run_dir, params=params)
            conversations = stack.transform_data(em_standin_conversations()[:32], ctx)
        except (EmalibError, ValidationError, OSError) as err:
            rows[name] = {"skipped": f"{type(err).__name__}: {err}".splitlines()[0][:300]}
            continue
        model = None
        try:
            start = time.perf_counter()
            model, tokenizer = load_model(params.model, params.lora, seed=0, max_seq_length=length)
            summary = train_adapter(model, tokenizer, conversations, params, run_dir, stack, ctx)
            terms: dict[str, list[float]] = {}
            for entry in summary["log_history"]:
                for key, value in entry.items():
                    if key == "loss" or key.startswith("loss/"):
                        terms.setdefault(key, []).append(value)
            rows[name] = {"steps": summary["global_step"], "seconds": round(time.perf_counter() - start, 1),
                          "loss_terms": terms,
                          "finite": bool(terms) and all(math.isfinite(v) for vs in terms.values() for v in vs),
                          "adapter": str(run_dir / "adapter")}
        except Exception as err:  # noqa: BLE001 (reported, and the check fails)
            rows[name] = {"error": f"{type(err).__name__}: {err}"[:400]}
        del model
        _free()
    for name, kind in kinds.items():
        if kind == "after":
            rows[name] = {"skipped": "acts on the adapter after optimizer steps (its step is plain SFT's); "
                                     "bench_defenses.py times SafeLoRA's projection"}
    return rows


def vllm_part(adapter: str | None, lora_r: int, workdir: Path) -> dict:
    import torch

    if importlib.util.find_spec("vllm") is None:
        return {"skipped": "vllm is not installed"}
    if not torch.cuda.is_available():
        return {"skipped": "vllm needs CUDA"}
    if adapter is None:
        return {"skipped": "the plain run trained no adapter"}
    from emalib.core.config import GenerationParams
    from emalib.data.questions import load_questions
    from emalib.evaluation.generate_vllm import generate_answers_vllm
    from emalib.model.engines import embedded_model_path

    start = time.perf_counter()
    try:
        answers = generate_answers_vllm(str(embedded_model_path()), Path(adapter), load_questions("standin_general")[:4],
                                        GenerationParams(samples_per_question=4, max_new_tokens=64),
                                        workdir / "vllm_answers.jsonl", seed=0, lora_rank=lora_r)
    except Exception as err:  # noqa: BLE001
        return {"error": f"{type(err).__name__}: {err}"[:400]}
    return {"answers": len(answers), "non_empty": sum(bool(a["answer"]) for a in answers),
            "seconds": round(time.perf_counter() - start, 1)}


def failures(result: dict) -> list[str]:
    """What makes the check fail: errors, non-finite or missing loss terms, import-order warnings."""
    found = [f"scale: {result['scale']['error']}"] if "error" in result["scale"] else []
    found += [f"scale {name}: {row['error']}" for name, row in result["scale"]["rows"].items() if "error" in row]
    for name, row in result["embedded"]["rows"].items():
        if "error" in row:
            found.append(f"embedded {name}: {row['error']}")
        elif "skipped" not in row and not row["finite"]:
            found.append(f"embedded {name}: a loss term is not finite or none was logged")
    found += [f"import order: {message}" for message in result["embedded"]["import_order_warnings"]]
    if result["embedded"]["imported_before_unsloth"]:
        found.append(f"import order: {result['embedded']['imported_before_unsloth']} imported before unsloth")
    if "error" in result["vllm"]:
        found.append(f"vllm: {result['vllm']['error']}")
    return found


def _gib(value) -> str:
    return "" if value is None else f"{value:.2f}"


def _pct(value) -> str:
    return "" if value is None else f"{value:+.0%}"


def print_scale(device: str, scale: dict) -> None:
    print(f"\n{device}: {scale['model']} (random weights), engine {scale['engine']}, {scale['dtype']}, "
          f"batch {scale['batch'][0]} x {scale['batch'][1]}, gradient checkpointing "
          f"{'on' if scale['gradient_checkpointing'] else 'off'}, {scale['optimizer']}")
    print(f"{'config':<18} {'step s':>7} {'x plain':>7} {'step GiB':>9} {'predicted':>9} {'error':>6} "
          f"{'all GiB':>8} {'predicted':>9} {'error':>6}")
    plain = scale["rows"].get("plain", {}).get("step_s")
    for name, row in scale["rows"].items():
        if "error" in row or "skipped" in row:
            print(f"{name:<18} {'ERROR ' + row['error'] if 'error' in row else 'skipped: ' + row['skipped']}")
            continue
        ratio = f"{row['step_s'] / plain:.2f}" if plain else ""
        print(f"{name:<18} {row['step_s']:>7.2f} {ratio:>7} {_gib(row['step_gib']):>9} "
              f"{_gib(row['predicted_step_gib']):>9} {_pct(row['step_error']):>6} {_gib(row.get('total_gib')):>8} "
              f"{_gib(row.get('predicted_total_gib')):>9} {_pct(row.get('total_error')):>6}")


def print_tables(result: dict) -> None:
    scale = result["scale"]
    if "error" in scale:
        print(f"\n{result['device']}: scale part failed: {scale['error']}")
    else:
        print_scale(result["device"], scale)
    embedded = result["embedded"]
    print(f"\nembedded model, engine unsloth: import-order warnings {len(embedded['import_order_warnings'])}, "
          f"imported before unsloth: {embedded['imported_before_unsloth'] or 'nothing'}")
    for name, row in embedded["rows"].items():
        if "loss_terms" in row:
            last = ", ".join(f"{k} {v[-1]:.3f}" for k, v in row["loss_terms"].items())
            print(f"{name:<20} {row['steps']} steps {row['seconds']:>6.1f} s  {'finite' if row['finite'] else 'NOT FINITE'}"
                  f"  last: {last}")
        else:
            print(f"{name:<20} {'ERROR ' + row['error'] if 'error' in row else 'skipped: ' + row['skipped']}")
    print(f"\nvllm sampling: {json.dumps(result['vllm'])}")


def parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", default="params/paper/code.yaml", help="the model, LoRA and optimizer to check")
    parser.add_argument("--tiny", action="store_true", help="a tiny random architecture and short runs (CPU, tests)")
    parser.add_argument("--scale-engine", choices=["hf", "unsloth"], default=None,
                        help="Part 1's engine (default: the params' engine on this machine)")
    parser.add_argument("--batch-size", type=int, default=None, help="Part 1 micro-batch (default 4; tiny 2)")
    parser.add_argument("--seq-len", type=int, default=None, help="Part 1 tokens per sequence (default 2048; tiny 128)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per configuration (default 3; tiny 1)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--train-steps", type=int, default=None, help="Part 2 optimizer steps (default 5; tiny 2)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's; tiny 1, since on a shared CPU idle threads spin)")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--table", default=None, help="print the tables of a results file and exit")
    args = parser.parse_args(argv)
    for key, full, tiny in (("batch_size", 4, 2), ("seq_len", 2048, 128), ("steps", 3, 1), ("train_steps", 5, 2),
                            ("threads", None, 1)):
        if getattr(args, key) is None:
            setattr(args, key, tiny if args.tiny else full)
    return args


def main(argv=None) -> int:
    args = parse(argv)
    if args.table:
        print_tables(json.loads(Path(args.table).read_text()))
        return 0
    recorder = _ImportOrderLog()
    logging.getLogger().addHandler(recorder)
    order = import_unsloth_first(recorder)  # before anything below imports transformers or peft
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from bench_scale import machine

    from emalib.core.config import load_params
    from emalib.core.errors import EmalibError

    try:
        base = load_params(args.params)
    except EmalibError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({torch.get_num_threads()} threads)"
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_gpu_") as tmp:
        workdir = Path(tmp)
        try:
            scale = scale_part(args, base, workdir)
        except EmalibError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        except Exception as err:  # noqa: BLE001 (the random model did not save or load: reported, Part 2 still runs)
            scale = {"error": f"{type(err).__name__}: {err}"[:400], "rows": {}}
        _free()  # the random model's memory, before the embedded model and vLLM
        rows = embedded_part(args, base, workdir)
        sampling = vllm_part(rows.get("plain", {}).get("adapter"), base.lora.r, workdir)
    kinds = defense_kinds()
    result = {"command": "python benchmarks/bench_gpu.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "device": device, "machine": machine(), "params": args.params, "tiny": args.tiny,
              "defenses": {name: {"kind": kind, "scale": "measured" if kind == "step" else "step is plain SFT's",
                                  "embedded": "trained" if "loss_terms" in rows.get(name, {}) else
                                  rows.get(name, {}).get("skipped", "error")} for name, kind in kinds.items()},
              "scale": scale, "embedded": {"rows": rows, "import_order_warnings": recorder.messages, **order},
              "vllm": sampling}
    result["seconds"] = round(time.perf_counter() - started, 1)
    result["failures"] = failures(result)
    print_tables(result)
    print(f"\n{result['seconds']:.0f} s; " + ("all checks passed" if not result["failures"]
                                             else "FAILED:\n  " + "\n  ".join(result["failures"])))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return 1 if result["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
