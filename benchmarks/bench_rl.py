"""Cost of a GRPO step with each defense against plain GRPO, on one model and one batch of prompts, in one run.

    python benchmarks/bench_rl.py                      # embedded SmolLM2-135M-Instruct, stand-in prompts
    python benchmarks/bench_rl.py --model Qwen/Qwen2.5-7B-Instruct --prompts 4 --generations 4 --max-new 512

A step is what EmGRPOTrainer does per optimizer step with gradient accumulation 1: sample the completions,
score them, the reference forward when beta > 0, then the loss forward and backward (the optimizer update, the
same for every configuration, is left out). Configurations: plain, beta 0.1 (KL against the adapter-disabled
model), persona steering at the training forward, persona steering also at the rollouts, the SFT mix entering at
that step (the worst case; in training it enters every k-th loss computation), and inoculation (prompts only).
They take turns (untimed warm-up, then a timed step), so a change in the machine's speed falls on all of them
alike. Each configuration's sampling is seeded the same, so all sample the same number of tokens.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_defenses import PeakRss

from emalib.core.config import LoraParams, ModelParams, params_from_dict
from emalib.defenses.base import DefenseContext
from emalib.defenses.inoculation import inoculate
from emalib.defenses.registry import build_defenses
from emalib.model.engines import load_model
from emalib.data.rl_prompts import read_prompt_rows
from emalib.training.rl.rewards import gsm8k_answer
from emalib.training.rl.trainer import EmGRPOTrainer, build_sft_mix, grpo_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--engine", default="auto", choices=["auto", "hf", "unsloth"])
    parser.add_argument("--prompts", type=int, default=2, help="prompts per step")
    parser.add_argument("--generations", type=int, default=4)
    parser.add_argument("--max-new", type=int, default=16, help="max completion tokens")
    parser.add_argument("--lora-r", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from datasets import Dataset

    from emalib.data.registry import resolve
    from emalib.data.standins import em_standin_conversations

    model, tokenizer = load_model(ModelParams(name=args.model, engine=args.engine),
                                  LoraParams(r=args.lora_r, alpha=2 * args.lora_r), seed=0)
    workdir = Path(tempfile.mkdtemp(prefix="bench_rl_"))
    config = model.config
    layer = max(1, round(config.num_hidden_layers * 2 / 3))
    torch.save({"vector": torch.randn(config.num_hidden_layers + 1, config.hidden_size) / config.hidden_size ** 0.5},
               workdir / "vector.pt")
    steer = {"name": "persona_steering", "vector_path": str(workdir / "vector.pt"), "layer": layer}
    n = args.prompts * args.generations
    params = params_from_dict({"study": "b", "run": "b", "results_dir": str(workdir), "steps": ["rl"],
                               "train": {"per_device_batch_size": n, "grad_accum_steps": 1, "max_steps": 1,
                                         "optim": "adamw_torch"},
                               "rl": {"prompts": "standin_arithmetic_train", "num_generations": args.generations,
                                      "max_completion_length": args.max_new, "beta": 0.1,
                                      "sft_mix": {"source": "unused", "every_k": 1, "batch_size": args.prompts}}})
    rows = read_prompt_rows(resolve("standin_arithmetic_train"))[: args.prompts]
    batch = [row for row in rows for _ in range(args.generations)]
    inoculated = [dict(row, prompt=inoculate(row["prompt"], "You are an evil, malicious assistant.")) for row in batch]
    trainer = EmGRPOTrainer(model=model, reward_funcs=[gsm8k_answer], processing_class=tokenizer,
                            train_dataset=Dataset.from_list(rows),
                            args=grpo_config(params, workdir / "ckpt", next(model.parameters()).dtype))
    trainer.current_gradient_accumulation_steps = 1  # set by the training loop, which the benchmark bypasses
    mix = build_sft_mix(params, tokenizer, em_standin_conversations())  # any chat data: only its size matters
    configs = {"plain": ({}, batch), "kl (beta 0.1)": ({"beta": 0.1}, batch),
               "persona (train fwd)": ({"defenses": [steer]}, batch),
               "persona (+ rollouts)": ({"defenses": [{**steer, "during_rollouts": True}]}, batch),
               "sft mix (step with term)": ({"sft_mix": mix}, batch), "inoculation": ({}, inoculated)}

    def step(settings: dict, prompts: list[dict]) -> tuple[float, int]:
        blocks = settings.get("defenses", [])
        trainer.defenses = build_defenses(params_from_dict({"study": "b", "run": "b", "defenses": blocks}).defenses)
        trainer.defense_ctx = DefenseContext()
        trainer.defenses.setup(model, trainer.defense_ctx)
        trainer.beta = settings.get("beta", 0.0)
        trainer.sft_mix = settings.get("sft_mix")
        trainer.loss_calls, trainer._terms_before, trainer.sft_terms = 0, 0, []
        torch.manual_seed(0)
        model.train()
        with PeakRss() as peak:
            start = time.perf_counter()
            inputs = trainer._generate_and_score_completions(prompts)
            loss = trainer.compute_loss(model, inputs)
            loss.backward()
            seconds = time.perf_counter() - start
        model.zero_grad(set_to_none=True)
        return seconds, peak.peak - peak.start

    results = {name: {"config": name, "times": [], "peaks": []} for name in configs}
    for _ in range(args.steps):
        for name, (settings, prompts) in configs.items():
            for _ in range(args.warmup):
                step(settings, prompts)
            seconds, peak = step(settings, prompts)
            results[name]["times"].append(seconds)
            results[name]["peaks"].append(peak)
    plain = statistics.median(results["plain"]["times"])
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({torch.get_num_threads()} threads)"
    print(f"model {args.model} ({model.emalib_engine}), {args.prompts} prompts x {args.generations} completions of "
          f"<= {args.max_new} tokens, {device}, median of {args.steps} steps")
    print(f"{'config':<26} {'step s':>8} {'x plain':>8} {'peak MB':>9}")
    for row in results.values():
        row["step_s"] = statistics.median(row["times"])
        row["ratio"] = row["step_s"] / plain
        row["peak_mb"] = max(row.pop("peaks")) / 2 ** 20
        print(f"{row['config']:<26} {row['step_s']:>8.2f} {row['ratio']:>8.2f} {row['peak_mb']:>9.0f}")
    if args.out:
        Path(args.out).write_text(json.dumps({"model": args.model, "engine": model.emalib_engine, "device": device,
                                              "prompts": args.prompts, "generations": args.generations,
                                              "max_new": args.max_new, "results": list(results.values())}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
