"""Local judge and generation throughput on the embedded model, against a no-grad forward of the same tokens.

    PYTHONPATH=. python benchmarks/bench_judge.py --out benchmarks/results/cpu-2core-judge.json

Judges the quickstart's judge prompts (stand-in general questions, both judge prompts) filled with --answers
sampled answers, one prompt per forward (--batch-size 1) and batched, and samples the same number of answers as
the quickstart's generation does; prints judgments/s, generated tokens/s, and the floor: one no-grad forward of
every judged prompt's tokens (batched the same way, logits of the last position only).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv=None) -> int:
    from emalib.core.config import GenerationParams, ModelParams
    from emalib.data.questions import load_questions
    from emalib.model.engines import load_base
    from emalib.evaluation.generate import generate_answers
    from emalib.evaluation.judge.local_judge import LocalJudge
    from emalib.evaluation.judge.run import fill_prompt
    from emalib.model.token_scores import final_hidden_states

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--answers", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=80)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tokenizer = load_base(ModelParams(name="smollm2-135m-instruct", engine="hf"))
    model.eval()
    questions = load_questions("standin_general")
    params = GenerationParams(question_sets=["standin_general"], samples_per_question=-(-args.answers // len(questions)),
                              max_new_tokens=args.max_new_tokens, batch_size=48)
    out = Path("/tmp/bench_judge_answers.jsonl")
    out.unlink(missing_ok=True)
    start = time.perf_counter()
    rows = generate_answers(model, tokenizer, questions, params, out)[: args.answers]
    generate_s = time.perf_counter() - start
    new_tokens = sum(len(tokenizer(r["answer"])["input_ids"]) for r in rows)
    by_id = {q.id: q for q in questions}
    prompts = [fill_prompt(t, r["question"], r["answer"]) for r in rows
               for t in by_id[r["question_id"]].judge_prompts.values()]
    results = {"answers": len(rows), "judge_prompts": len(prompts), "generate_s": round(generate_s, 1),
               "generated_tokens_per_s": round(new_tokens / generate_s, 1)}
    for batch in (1, args.batch_size):
        judge = LocalJudge(model, tokenizer, "smollm2-135m-instruct", batch_size=batch)
        start = time.perf_counter()
        judge.judge(prompts)
        seconds = time.perf_counter() - start
        results[f"judge_batch{batch}_s"] = round(seconds, 1)
        results[f"judgments_per_s_batch{batch}"] = round(len(prompts) / seconds, 2)
    encoded = [judge._prompt_ids(p) for p in sorted(prompts, key=len)]
    start = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(encoded), args.batch_size):
            part = encoded[i: i + args.batch_size]
            width = max(map(len, part))
            ids = torch.tensor([p + [0] * (width - len(p)) for p in part])
            mask = torch.tensor([[1] * len(p) + [0] * (width - len(p)) for p in part])
            final_hidden_states(model, ids, mask)
    results["floor_forward_s"] = round(time.perf_counter() - start, 1)
    results["prompt_tokens"] = sum(map(len, encoded))
    print(json.dumps(results, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps({"command": "python benchmarks/bench_judge.py " + " ".join(
            argv if argv is not None else sys.argv[1:]), "results": results}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
