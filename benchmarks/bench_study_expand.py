"""`python -m emalib study <file> --dry-run` at 100, 1,000 and 10,000 cells: wall time and seconds per cell.

The grid is the CPU mini-study's base (params/studies/mini_cpu.yaml) over two axes: a seed axis and a learning-rate
axis, plus a defense axis of two labels: none, and Interleaving++ scoring with the matching no-defense cell's adapter
(`${run_dir:...}`), so the dependency graph has an edge per Interleaving++ cell. Each size is a fresh subprocess (the command a
user runs, Python start-up and imports included); near-linear expansion shows as a flat seconds-per-cell column.

    python benchmarks/bench_study_expand.py [--sizes 100 1000 10000] [--out benchmarks/results/study_expand.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent


def study_tree(cells: int, results_dir: str) -> dict:
    """A study of `cells` runs: seeds x learning rates x {none, ipp}, each ipp cell depending on its none cell."""
    base = yaml.safe_load((REPO / "params" / "studies" / "mini_cpu.yaml").read_text())["base"]
    base["results_dir"] = results_dir
    per_axis = cells // 2
    seeds = max(d for d in range(1, math.isqrt(per_axis) + 1) if per_axis % d == 0)
    rates = per_axis // seeds
    return {
        "study": "expand",
        "base": base,
        "axes": {
            "seed": {f"s{i}": {"seed": i} for i in range(seeds)},
            "lr": {f"lr{i}": {"train": {"learning_rate": 1e-5 * (i + 1)}} for i in range(rates)},
            "defense": {"none": {},
                        "ipp": {"steps": ["interleave_selection", "train", "evaluate"],
                                "defenses": [{"name": "interleave_plusplus", "source": "wildguard_benign_sample",
                                              "ratio": 0.05, "use_all_adapters": True, "adapters": {
                                                  "em": "${run_dir:seed.${axis.seed},lr.${axis.lr},defense.none}"
                                                        "/adapter"}}]}},
        },
    }


def time_dry_run(cells: int, folder: Path) -> dict:
    study_file = folder / f"study_{cells}.yaml"
    study_file.write_text(yaml.safe_dump(study_tree(cells, str(folder / "results")), sort_keys=False))
    start = time.perf_counter()
    completed = subprocess.run([sys.executable, "-m", "emalib", "study", str(study_file), "--dry-run"],
                               cwd=folder, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    if completed.returncode != 0:
        raise SystemExit(f"{cells} cells: exit {completed.returncode}\n{completed.stderr[-2000:]}")
    listed = sum(1 for line in completed.stdout.splitlines() if line.startswith("run "))
    assert listed == cells, (listed, cells)
    return {"cells": cells, "nodes": len(completed.stdout.splitlines()) - 1, "seconds": round(seconds, 2),
            "ms_per_cell": round(1000 * seconds / cells, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 1000, 10000])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for cells in args.sizes:
            rows.append(time_dry_run(cells, Path(tmp)))
            print(f"{rows[-1]['cells']:>6} cells  {rows[-1]['nodes']:>6} nodes  {rows[-1]['seconds']:>8.2f} s  "
                  f"{rows[-1]['ms_per_cell']:>7.2f} ms/cell", flush=True)
    record = {"machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                          "python": platform.python_version()},
              "command": "python benchmarks/bench_study_expand.py --sizes " + " ".join(map(str, args.sizes)),
              "rows": rows}
    if args.out:
        args.out.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
