"""Peak memory and time at Qwen2.5's vocabulary and the paper's sequence length, chunked beside unchunked, in one run.

    python benchmarks/bench_scale.py --out benchmarks/results/cpu-2core-qwen2-random.json

The model has the real Qwen2.5 architecture and vocabulary (151,936) but a few small layers, randomly initialised
(no download): what is measured is the vocabulary-sized tensors, which do not shrink with the model. LoRA as the
paper's (rs-LoRA r=32 on the seven projections), fp32 on a CPU. Every measurement runs in a fresh subprocess
(`--one NAME`); its memory is the peak resident memory during the measured call minus the resident memory just
before it (Linux VmHWM, reset through /proc/self/clear_refs), after one untimed warm-up call, so weights, LoRA
and the optimizer state are not in it. Measured, each chunked (the package's) beside unchunked (full logits and
autograd through log_softmax, as before), the saving being a ratio from the same run:

- train:<defenses>: one training step (forward, backward and AdamW over the LoRA weights) of plain SFT, KL,
  LDIFS and KL+LDIFS, batch --batch-size x --seq-len, as `EmTrainer.compute_loss` computes it;
  train:plain:checkpointing adds gradient checkpointing (the paper's runs use Unsloth's);
- score: Interleaving+ scoring of --score-batch candidates of --score-len tokens by the aligned model and
  --adapters adapters (unchunked: one forward with full logits per model, as the released code);
- signals: the judge-free signals of a batch of --score-batch x --score-len (aligned and adapter forwards);
- generate: sampling --gen-tokens tokens for --score-batch prompts of --score-len tokens (transformers computes
  the last position's logits only; beside it, the prefill forward with full logits).

`python -m emalib cost` predicts the train:* memories from the same configuration (tests/test_cost.py checks its
formulas against a configuration measured inside the test).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

TRAIN = {"plain": [], "kl": [{"name": "kl"}], "ldifs": [{"name": "ldifs"}], "kl+ldifs": [{"name": "kl"}, {"name": "ldifs"}]}


def measurement_names() -> list[str]:
    names = [f"train:{d}:{m}" for d in TRAIN for m in ("chunked", "unchunked")]
    names += ["train:plain:checkpointing", "train:plain:logits"]  # logits: the task loss from logits, chunked
    return names + [f"{what}:{m}" for what in ("score", "signals", "generate") for m in ("chunked", "unchunked")]


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as handle:
        return int(re.search(rf"{field}:\s+(\d+)", handle.read()).group(1))


def measure(call, repeats: int = 1) -> dict:
    """Warm-up call, then peak extra resident memory (MiB) and seconds of the next `repeats` calls."""
    call()
    before = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")  # VmHWM := VmRSS
    start = time.perf_counter()
    for _ in range(repeats):
        call()
    seconds = (time.perf_counter() - start) / repeats
    return {"extra_mib": round((_status_kib("VmHWM") - before) / 1024, 1), "seconds": round(seconds, 2),
            "rss_before_mib": round(before / 1024, 1)}


def qwen2_config(args):
    from transformers import Qwen2Config

    return Qwen2Config(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                       num_hidden_layers=args.layers, num_attention_heads=args.heads,
                       num_key_value_heads=args.kv_heads, max_position_embeddings=max(args.seq_len, 4096),
                       tie_word_embeddings=False, attn_implementation="sdpa")


def lora_model(args, adapters: int = 1):
    """A random Qwen2 with the paper's LoRA (adapter 'task'), plus adapters-1 more for scoring."""
    from peft import get_peft_model
    from transformers import Qwen2ForCausalLM

    from emalib.core.config import LoraParams
    from emalib.model.engines import _peft_config

    torch.manual_seed(0)
    peft_config = _peft_config(LoraParams())
    peft_config.init_lora_weights = False  # adapters that change the outputs, as trained ones do
    model = get_peft_model(Qwen2ForCausalLM(qwen2_config(args)), peft_config, adapter_name="task")
    for k in range(1, adapters):
        model.add_adapter(f"domain{k}", peft_config)
    return model


def random_batch(args, batch: int, length: int, prompt: int) -> dict[str, torch.Tensor]:
    from emalib.model.losses import IGNORE_INDEX

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, args.vocab, (batch, length), generator=g)
    labels = ids.clone()
    labels[:, :prompt] = IGNORE_INDEX  # the prompt: no task loss, as train_on_responses_only
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def train_call(args, defenses: str, mode: str):
    import emalib.defenses.kl
    import emalib.training.trainer
    from emalib.core.config import params_from_dict
    from emalib.defenses.base import DefenseContext
    from emalib.defenses.registry import build_defenses
    from emalib.model.losses import token_cross_entropy_sum, token_kl
    from emalib.training.reference import reference_forward
    from emalib.training.trainer import EmTrainer
    from transformers import TrainingArguments

    if mode in ("unchunked", "logits"):  # the task loss from the full logits instead of the final hidden states
        emalib.training.trainer.loss_from_hidden = lambda model, stack: False
    if mode == "unchunked":  # the plain autograd computations, as the package computed them before chunking
        emalib.training.trainer.token_cross_entropy_sum = partial(token_cross_entropy_sum, chunked=False)
        emalib.defenses.kl.token_kl = partial(token_kl, chunked=False)
        emalib.training.trainer.reference_forward = partial(reference_forward, logits=True)  # LDIFS: full logits
    model = lora_model(args)
    if mode == "checkpointing":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.train()
    stack = build_defenses(params_from_dict({"study": "b", "run": "b", "defenses": TRAIN[defenses]}).defenses)
    ctx = DefenseContext()
    stack.setup(model, ctx)
    targs = TrainingArguments(output_dir="/tmp/bench_scale", report_to="none", use_cpu=True)
    trainer = EmTrainer(model=model, args=targs, defenses=stack, defense_ctx=ctx)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    batch = random_batch(args, args.batch_size, args.seq_len, args.seq_len // 4)

    def step():
        trainer.compute_loss(model, dict(batch)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def score_call(args, mode: str):
    from emalib.defenses.interleave_plus import answer_nll, score_nll

    model = lora_model(args, adapters=args.adapters).eval()
    names = ["task", *[f"domain{k}" for k in range(1, args.adapters)]]
    batch = random_batch(args, args.score_batch, args.score_len, args.score_len // 4)
    if mode == "chunked":
        tokenizer = _FixedTokenizer(batch)
        return lambda: score_nll(model, tokenizer, list(range(args.score_batch)), names, args.score_batch,
                                 args.score_len)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}

    @torch.no_grad()
    def unchunked():  # one forward per model, full logits, as the released scorer
        with model.disable_adapter():
            answer_nll(model(**inputs).logits, batch["labels"])
        for name in names:
            model.set_adapter(name)
            answer_nll(model(**inputs).logits, batch["labels"])

    return unchunked


class _FixedTokenizer:
    """score_nll tokenises candidates; here candidate i is row i of a random batch (no real text needed)."""

    pad_token_id = 0

    def __init__(self, batch):
        self.batch = batch


def signals_call(args, mode: str):
    from emalib.evaluation.signals import logprob_and_kl, masked_token_kl, per_token_logprob

    model = lora_model(args).eval()
    batch = random_batch(args, args.score_batch, args.score_len, args.score_len // 4)
    if mode == "chunked":
        return lambda: logprob_and_kl(model, batch)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}

    @torch.no_grad()
    def unchunked():
        with model.disable_adapter():
            base_logits = model(**inputs).logits
        logits = model(**inputs).logits
        per_token_logprob(logits, batch["labels"])
        masked_token_kl(logits, base_logits, batch["labels"])

    return unchunked


def generate_call(args, mode: str):
    model = lora_model(args).eval()
    batch = random_batch(args, args.score_batch, args.score_len, 0)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if mode == "chunked":
        return torch.no_grad()(lambda: model.generate(**inputs, max_new_tokens=args.gen_tokens, do_sample=True,
                                                      min_new_tokens=args.gen_tokens, pad_token_id=0))
    return torch.no_grad()(lambda: model(**inputs).logits)


def run_one(args, name: str) -> dict:
    torch.set_num_threads(args.threads)
    what, *rest = name.split(":")
    if what == "train":
        call = train_call(args, *rest)
    else:
        call = {"score": score_call, "signals": signals_call, "generate": generate_call}[what](args, rest[0])
    return measure(call)


def _patch_tokenization():
    """For score:chunked: candidate i of _FixedTokenizer's batch tokenises to its row (no tokenizer exists)."""
    import emalib.model.tokenize as tokenize

    def by_row(tokenizer, messages, max_length, responses_only=True):
        row = messages
        return {"input_ids": tokenizer.batch["input_ids"][row].tolist(), "labels": tokenizer.batch["labels"][row].tolist()}

    tokenize.tokenize_conversation = by_row


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "")
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(os.sysconf("SC_PAGE_SIZE")
                                                                        * os.sysconf("SC_PHYS_PAGES") / 2 ** 30, 1),
            "python": platform.python_version(), "torch": torch.__version__}


def predicted_mib(config: dict, name: str) -> float | None:
    """The cost model's prediction (emalib.studies.cost.step_memory, CPU) for a train:* measurement, else None."""
    from emalib.studies.cost import Architecture, step_memory

    what, *rest = name.split(":")
    if what != "train" or rest[1] in ("unchunked", "logits"):
        return None
    arch = Architecture(config["vocab"], config["hidden"], config["intermediate"], config["layers"], config["heads"],
                        config["kv_heads"])
    defenses = {d["name"] for d in TRAIN[rest[0]]}
    parts = step_memory(arch, config["batch_size"], config["seq_len"], 4, defenses, rest[1] == "checkpointing", "cpu")
    return sum(parts.values()) / 2 ** 20


def print_table(results: dict, config: dict) -> None:
    print(f"{'measurement':<22} {'chunked MiB':>12} {'s':>7} {'unchunked MiB':>14} {'s':>7} {'memory x':>9} "
          f"{'time x':>7} {'cost model MiB':>15}")
    for name in dict.fromkeys(n.rsplit(":", 1)[0] for n in results):
        chunked, plain = results.get(f"{name}:chunked"), results.get(f"{name}:unchunked")
        if chunked is None or plain is None:
            continue
        predicted = predicted_mib(config, f"{name}:chunked")
        print(f"{name:<22} {chunked['extra_mib']:>12.0f} {chunked['seconds']:>7.1f} {plain['extra_mib']:>14.0f} "
              f"{plain['seconds']:>7.1f} {plain['extra_mib'] / max(chunked['extra_mib'], 1):>9.1f} "
              f"{plain['seconds'] / chunked['seconds']:>7.2f} {'' if predicted is None else f'{predicted:.0f}':>15}")
    if "train:plain:checkpointing" in results:
        r = results["train:plain:checkpointing"]
        print(f"{'train:plain+checkpt':<22} {r['extra_mib']:>12.0f} {r['seconds']:>7.1f} {'':>14} {'':>7} {'':>9} "
              f"{'':>7} {predicted_mib(config, 'train:plain:checkpointing'):>15.0f}")


def parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--intermediate", type=int, default=2816)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--score-batch", type=int, default=8)
    parser.add_argument("--score-len", type=int, default=512)
    parser.add_argument("--adapters", type=int, default=3, help="misaligned adapters scoring each candidate")
    parser.add_argument("--gen-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", default=None, help="comma-separated measurement-name prefixes")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--table", default=None, help="print the table of a results JSON written by --out")
    parser.add_argument("--out", default=None)
    return parser.parse_args(argv)


def _without_out(argv: list[str]) -> list[str]:
    """The command line minus --out (the measuring subprocesses write nothing)."""
    kept, skip = [], False
    for arg in argv:
        if skip or arg.startswith("--out="):
            skip = False
            continue
        if arg == "--out":
            skip = True
            continue
        kept.append(arg)
    return kept


def main(argv=None) -> int:
    args = parse(argv)
    if args.table:
        recorded = json.loads(Path(args.table).read_text())
        print_table({k: v for k, v in recorded["results"].items() if "error" not in v}, recorded["config"])
        return 0
    if args.one:
        if args.one.startswith("score"):
            _patch_tokenization()
        print(json.dumps(run_one(args, args.one)))
        return 0
    argv = list(argv if argv is not None else sys.argv[1:])
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": str(args.threads)}
    names = [n for n in measurement_names() if args.only is None or n.startswith(tuple(args.only.split(",")))]
    results = {}
    for name in names:
        done = subprocess.run([sys.executable, __file__, *_without_out(argv), "--one", name],
                              env=env, capture_output=True, text=True)
        if done.returncode != 0:
            results[name] = {"error": done.stderr.strip().splitlines()[-1][:300]}
        else:
            results[name] = json.loads(done.stdout.strip().splitlines()[-1])
        print(name, results[name], flush=True)
    config = {k: v for k, v in vars(args).items() if k not in ("one", "out", "only", "table")}
    print_table({k: v for k, v in results.items() if "error" not in v}, config)
    if args.out:
        Path(args.out).write_text(json.dumps({"command": "python benchmarks/bench_scale.py " + " ".join(argv),
                                              "machine": machine(), "config": config, "results": results},
                                             indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
