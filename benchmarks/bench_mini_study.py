"""Time the CPU mini-study (params/studies/mini_cpu.yaml) end to end and print what its index shows.

    python benchmarks/bench_mini_study.py [--results-dir /tmp/mini] [--executor local] [--out results/x.json]

Runs `python -m emalib study` on a fresh results folder (so nothing is reused), records the wall time, and reads
the study's index.parquet: per run the judge-free signals (KL to the base model, log-likelihood gap) and, for the
OpSwap runs, exact-match accuracy with its Wilson interval; then the paper's directional claims as measured here:
KL and LDIFS end closer to the base than SFT, KL learns OpSwap less than SFT, interleaving learns it about as well.
It reports what it finds; nothing is tuned to agree.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parent.parent
STUDY = REPO / "params" / "studies" / "mini_cpu.yaml"


def run_study(results_dir: Path, executor: str) -> float:
    start = time.perf_counter()
    completed = subprocess.run([sys.executable, "-m", "emalib", "study", str(STUDY), "--executor", executor,
                                "-o", f"results_dir={results_dir}"], cwd=REPO, check=False)
    if completed.returncode != 0:
        sys.exit(f"the mini-study failed (exit {completed.returncode}); see `python -m emalib status {STUDY} "
                 f"-o results_dir={results_dir}`")
    return time.perf_counter() - start


def _number(value):
    """A plain float, or None for a missing value (JSON has no NaN)."""
    return None if value is None or pd.isna(value) else float(value)


def _interval(value):
    """An interval column ('[lo, hi]' as JSON text in the index) as [lo, hi], or None."""
    return [float(v) for v in json.loads(value)] if isinstance(value, str) else None


def summarise(index: pd.DataFrame) -> dict:
    """Per run and per base evaluation (the aligned model, zero-shot on OpSwap): the signals and task accuracy with
    their 95 % intervals (bootstrap over questions; Wilson), and the judged rates."""
    overall = index[(index["question_set"] == "all") & index["kind"].isin(["run", "base"])].set_index("node")
    rows = {}
    for node, row in overall.iterrows():
        rows[node] = {"kind": row["kind"],
                      "kl_to_base": _number(row.get("signal.kl_to_base")),
                      "kl_to_base_ci": _interval(row.get("signal.kl_to_base_ci")),
                      "loglik_gap": _number(row.get("signal.loglik_gap")),
                      "loglik_gap_ci": _interval(row.get("signal.loglik_gap_ci")),
                      "task_accuracy": _number(row.get("task.accuracy")),
                      "task_accuracy_ci": _interval(row.get("task.accuracy_ci")),
                      "misaligned_rate": _number(row.get("misaligned_rate")),
                      "incoherent_rate": _number(row.get("incoherent_rate"))}

    def value(node, key):
        return rows.get(node, {}).get(key)

    def overlaps(a, b):
        ca, cb = value(a, "task_accuracy_ci"), value(b, "task_accuracy_ci")
        return None if not ca or not cb else bool(ca[0] <= cb[1] and cb[0] <= ca[1])

    claims = {
        "kl closer to base than sft (kl_to_base)": _less(value("em__kl", "kl_to_base"), value("em__none", "kl_to_base")),
        "ldifs closer to base than sft (kl_to_base)": _less(value("em__ldifs", "kl_to_base"),
                                                            value("em__none", "kl_to_base")),
        "kl learns opswap less than sft (accuracy)": _less(value("opswap1__kl", "task_accuracy"),
                                                           value("opswap1__none", "task_accuracy")),
        "kl vs sft opswap intervals overlap": overlaps("opswap1__kl", "opswap1__none"),
        "interleaving learns opswap about as well (intervals overlap)": overlaps("opswap1__interleave",
                                                                                 "opswap1__none"),
    }
    return {"runs": rows, "claims": claims}


def _less(a, b):
    return None if a is None or b is None or pd.isna(a) or pd.isna(b) else bool(a < b)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--results-dir", type=Path, default=None, help="default: a fresh temporary folder")
    parser.add_argument("--executor", default="local")
    parser.add_argument("--out", type=Path, default=None, help="write the measurement as JSON")
    args = parser.parse_args()
    results_dir = args.results_dir or Path(tempfile.mkdtemp(prefix="mini_cpu_"))
    wall = run_study(results_dir, args.executor)
    index = pd.read_parquet(results_dir / "mini_cpu" / "index.parquet")
    summary = summarise(index)
    record = {"command": " ".join(sys.argv), "study": str(STUDY.relative_to(REPO)), "executor": args.executor,
              "wall_s": round(wall, 1), "machine": {"platform": platform.platform(), "processor": platform.processor(),
                                                    "cpus": __import__("os").cpu_count()},
              "date": time.strftime("%Y-%m-%d"), **summary}
    print(f"mini-study: {wall / 60:.1f} min wall on {record['machine']['cpus']} CPUs ({args.executor})")
    print(pd.DataFrame(summary["runs"]).T.to_string())
    for claim, holds in summary["claims"].items():
        print(f"  {claim}: {holds}")
    if args.out:
        args.out.write_text(json.dumps(record, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
