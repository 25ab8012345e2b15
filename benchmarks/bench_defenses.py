"""Cost of each defense's training step against plain SFT, on one model and one batch, in one run.

    python benchmarks/bench_defenses.py                       # embedded SmolLM2-135M-Instruct, engine auto
    python benchmarks/bench_defenses.py --model Qwen/Qwen2.5-7B-Instruct --batch-size 4 --seq-len 1024

For every configuration (plain, kl, ldifs, kl+ldifs, persona steering, their stack, KL on a retain set with half the
batch as retain rows, CAFT ablating two random directions at one block, TReFT in its paper and released variants)
it times the trainer's forward + backward, the configurations taking turns (untimed warm-up steps, then a timed
one) (EmTrainer.compute_loss, so the shared reference forward is what is measured), and reports
the median step time, its ratio to plain SFT and the peak memory (CUDA: max_memory_allocated; CPU: peak RSS
sampled during the steps, minus the RSS before them). The data-only defenses (inoculation, interleave, +/++)
leave the step unchanged, and so does early stopping (its cost is a validation forward every `eval_every` steps,
in the cost model); SafeLoRA runs once after training, so its projection is timed once (on the embedded
model against a synthetic 'pretrained' copy of its projections, or on --safelora-base).

It also checks that no defense holds a second copy of the base weights: the model's parameter and buffer
storages are the same before and after each defense's setup, and the tensors a defense object owns are a tiny
fraction of the model's (a reference copy would be >= 100 %). The run fails (exit 1) if that check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from emalib.core.config import LoraParams, ModelParams, params_from_dict
from emalib.data.standins import em_standin_conversations
from emalib.defenses.base import DefenseContext
from emalib.defenses.caft import save_directions
from emalib.defenses.registry import build_defenses
from emalib.model.engines import load_model
from emalib.model.losses import IGNORE_INDEX
from emalib.model.tokenize import ChatDataset, collate
from emalib.training.trainer import EmTrainer


class PeakRss:
    """Peak resident memory of this process while inside the block, sampled every 2 ms (Linux /proc)."""

    def __init__(self):
        self.page = os.sysconf("SC_PAGE_SIZE")

    def _rss(self) -> int:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * self.page

    def __enter__(self):
        self.start = self.peak = self._rss()
        self.running = True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, self._rss())
            time.sleep(0.002)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()


def make_batch(tokenizer, batch_size: int, seq_len: int) -> dict[str, torch.Tensor]:
    """batch_size conversations, each packed to seq_len tokens by joining stand-in turns (labels on answers)."""
    turns = em_standin_conversations()
    conversations, k = [], 0
    def n_tokens(messages):
        return len(tokenizer(tokenizer.apply_chat_template(messages, tokenize=False))["input_ids"])

    for _ in range(batch_size):
        messages = list(turns[k % len(turns)])
        k += 1
        while n_tokens(messages) < seq_len:
            messages += turns[k % len(turns)]
            k += 1
        conversations.append(messages)
    features = ChatDataset.build(tokenizer, conversations, seq_len).features
    return collate(features, tokenizer.pad_token_id)


def with_retain_rows(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same batch with its second half marked as retain rows (ratio 1): their labels move to retain_labels,
    as tokenisation does for RetainConversation rows, so the step has the same tokens as the others'."""
    half = batch["input_ids"].shape[0] // 2
    marked = {k: v.clone() for k, v in batch.items()}
    marked["retain"] = (torch.arange(len(marked["input_ids"])) >= half).long()
    marked["retain_labels"] = torch.full_like(marked["labels"], IGNORE_INDEX)
    marked["retain_labels"][half:] = batch["labels"][half:]
    marked["labels"][half:] = IGNORE_INDEX
    return marked


def owned_elements(obj, seen=None) -> int:
    """Tensor elements reachable from a defense object's attributes (lists, dicts, nested objects)."""
    seen = seen if seen is not None else set()
    if id(obj) in seen:
        return 0
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        return obj.numel()
    if isinstance(obj, torch.nn.Module):
        return 0  # a module reference (the trained model itself) is not owned state
    if isinstance(obj, dict):
        return sum(owned_elements(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple, set)):
        return sum(owned_elements(v, seen) for v in obj)
    if hasattr(obj, "__dict__") and type(obj).__module__.startswith("emalib"):
        return sum(owned_elements(v, seen) for v in vars(obj).values())
    return 0


def storages(model) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}


def make_step(trainer, model, batch):
    """One training step's forward + backward, as the trainer runs it; returns (seconds, peak memory bytes)."""
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}
    cuda = device.type == "cuda"

    def step() -> tuple[float, int]:
        model.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        with PeakRss() as rss:
            start = time.perf_counter()
            loss = trainer.compute_loss(model, dict(batch))
            loss.backward()
            if cuda:
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start
        model.zero_grad(set_to_none=True)
        peak = (torch.cuda.max_memory_allocated() - base) if cuda else (rss.peak - rss.start)
        return seconds, peak

    return step


def synthetic_pretrained(model_dir: Path, model, target: Path) -> Path:
    """The targeted projection weights of model_dir, perturbed: a stand-in 'pretrained base' for SafeLoRA."""
    from safetensors.torch import save_file

    from emalib.defenses.safelora import WeightReader, lora_modules

    reader = WeightReader(str(model_dir))
    torch.manual_seed(0)
    tensors = {}
    for name in lora_modules(model):
        key = reader.key_for(name)
        weight = reader.get(key).float()
        tensors[key] = (weight + 0.01 * weight.std() * torch.randn_like(weight)).contiguous()
    target.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(target / "model.safetensors"))
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--engine", default="auto", choices=["auto", "hf", "unsloth"])
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--lora-r", type=int, default=32)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--layer", type=int, default=None, help="steering layer (default: 2/3 of the depth)")
    parser.add_argument("--safelora-base", default=None, help="pretrained base for SafeLoRA timing")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    model_params = ModelParams(name=args.model, engine=args.engine, dtype=args.dtype)
    model, tokenizer = load_model(model_params, LoraParams(r=args.lora_r, alpha=2 * args.lora_r), seed=0,
                                  max_seq_length=args.seq_len)
    config = model.config
    batch = make_batch(tokenizer, args.batch_size, args.seq_len)
    n_weights = sum(p.numel() for p in model.parameters())
    layer = args.layer or max(1, round(config.num_hidden_layers * 2 / 3))
    workdir = Path(tempfile.mkdtemp(prefix="bench_defenses_"))
    torch.save({"vector": torch.randn(config.num_hidden_layers + 1, config.hidden_size) / config.hidden_size ** 0.5,
                "model": args.model}, workdir / "vector.pt")
    steer = {"name": "persona_steering", "vector_path": str(workdir / "vector.pt"), "layer": layer}
    save_directions(workdir / "directions.pt", {layer - 1: torch.randn(2, config.hidden_size)})
    caft = {"name": "caft", "layers": [layer - 1], "select": "all", "directions_path": str(workdir / "directions.pt")}
    configs = {"plain": [], "kl": [{"name": "kl"}], "ldifs": [{"name": "ldifs"}],
               "kl+ldifs": [{"name": "kl"}, {"name": "ldifs"}], "persona_steering": [steer],
               "kl+ldifs+persona": [{"name": "kl"}, {"name": "ldifs"}, steer],
               "kl_retain": [{"name": "kl_retain"}], "caft": [caft], "treft": [{"name": "treft"}],
               "treft_released": [{"name": "treft", "variant": "released"}]}
    from transformers import TrainingArguments

    targs = TrainingArguments(output_dir=str(workdir / "t"), report_to="none", use_cpu=not torch.cuda.is_available())
    results, ok, steps = [], True, {}
    model.train()
    before = storages(model)
    for name, blocks in configs.items():
        stack = build_defenses(params_from_dict({"study": "b", "run": "b", "defenses": blocks}).defenses)
        ctx = DefenseContext(tokenizer=tokenizer)  # TReFT reads the template's prefix tokens from it
        stack.setup(model, ctx)
        owned = sum(owned_elements(d) for d in stack.defenses)
        same_storage = storages(model) == before
        trainer = EmTrainer(model=model, args=targs, defenses=stack, defense_ctx=ctx)
        steps[name] = make_step(trainer, model, with_retain_rows(batch) if name == "kl_retain" else batch)
        second_copy = owned >= 0.01 * n_weights or not same_storage
        ok &= not second_copy
        results.append({"config": name, "owned_elements": owned, "owned_fraction": owned / n_weights,
                        "second_copy": second_copy, "times": [], "peaks": []})
    # Side by side: the configurations take turns, so a slower or faster phase of the machine (frequency, a
    # neighbour's load) falls on all of them alike instead of on whichever ran then. Each turn is `warmup`
    # untimed steps, then one timed step: in training a configuration follows itself, and its first step after
    # another configuration pays for re-growing the allocator's buffers (page faults), which training never does.
    for _ in range(args.steps):
        for row in results:
            for _ in range(args.warmup):
                steps[row["config"]]()
            seconds, peak = steps[row["config"]]()
            row["times"].append(seconds)
            row["peaks"].append(peak)
    for row in results:
        row["step_s"] = statistics.median(row["times"])
        row["peak_mb"] = max(row.pop("peaks")) / 2 ** 20

    safelora_s = None
    base_dir = args.safelora_base
    if base_dir is None and args.model == "smollm2-135m-instruct":
        from emalib.model.engines import embedded_model_path

        base_dir = str(synthetic_pretrained(embedded_model_path(), model, workdir / "pretrained"))
    if base_dir is not None:
        from emalib.defenses.safelora import apply_safelora

        start = time.perf_counter()
        apply_safelora(model, args.model, base_dir, tau=0.3)
        safelora_s = time.perf_counter() - start

    plain = results[0]["step_s"]
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({torch.get_num_threads()} threads)"
    print(f"model {args.model} ({model.emalib_engine}, {n_weights / 1e6:.1f}M weights), batch {args.batch_size} x "
          f"{batch['input_ids'].shape[1]} tokens, {device}, median of {args.steps} steps")
    print(f"{'config':<20} {'step s':>8} {'x plain':>8} {'peak MB':>9} {'owned':>9}  second copy")
    for row in results:
        row["ratio"] = row["step_s"] / plain
        print(f"{row['config']:<20} {row['step_s']:>8.3f} {row['ratio']:>8.2f} {row['peak_mb']:>9.0f} "
              f"{row['owned_fraction']:>8.3%}  {'YES' if row['second_copy'] else 'no'}")
    print("inoculation, interleave, interleave_plus(+): data only, step unchanged (x 1.00 by construction); "
          "early_stopping: step unchanged, plus a validation forward every eval_every steps")
    if safelora_s is not None:
        print(f"safelora: one projection of every LoRA module after training: {safelora_s:.2f} s")
    if args.out:
        Path(args.out).write_text(json.dumps({"model": args.model, "engine": model.emalib_engine, "device": device,
                                              "batch": list(batch["input_ids"].shape), "results": results,
                                              "safelora_projection_s": safelora_s}, indent=2))
    if not ok:
        print("FAIL: a defense holds a second copy of the weights", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
