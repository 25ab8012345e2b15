#!/usr/bin/env bash
# The first thing to run on a new GPU box: `emalib doctor` on the params, then benchmarks/bench_gpu.py (under 10
# minutes on one H100), its results written to benchmarks/results/gpu-<GPU name>-<date>.json.
#
#   scripts/gpu_check.sh [PARAMS] [bench_gpu.py options]    PARAMS: default params/paper/code.yaml
#   scripts/gpu_check.sh params/paper/code.yaml --tiny      the tiny mode (about a minute, also on a CPU)
#
# doctor's missing pieces (a judge key, data on an offline node) are printed but do not stop the check: it
# measures training, which needs neither. Exit code: bench_gpu.py's (0 passed, 1 a check failed, 2 bad input).
# Environment: PYTHON (python).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
case "${1:-}" in -h|--help) sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;; esac
PARAMS="${1:-params/paper/code.yaml}"
[ $# -gt 0 ] && shift
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

echo "== python -m emalib doctor $PARAMS"
"$PYTHON" -m emalib doctor "$PARAMS" || echo "(doctor: the pieces above marked MISSING; the GPU check goes on)"

gpu=$("$PYTHON" -c "import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')" \
      | tr -cs 'A-Za-z0-9.' '-' | sed 's/-*$//' | tr 'A-Z' 'a-z')
out="benchmarks/results/gpu-${gpu}-$(date -u +%Y-%m-%d).json"
echo "== python benchmarks/bench_gpu.py --params $PARAMS $* --out $out"
"$PYTHON" benchmarks/bench_gpu.py --params "$PARAMS" "$@" --out "$out"
