"""Shared fixtures. The embedded model (SmolLM2-135M-Instruct) is converted once into EMALIB_CACHE and reused;
unit tests use a tiny randomly initialised Llama with the embedded tokenizer."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def mirror() -> Path:
    """The offline data mirror (CI: ../shared/data). Tests that need the paper's files skip without it."""
    path = Path(os.environ.get("EMALIB_DATA_MIRROR", SHARED_DATA))
    if not (path / "SHA256SUMS").is_file():
        pytest.skip("no data mirror (set EMALIB_DATA_MIRROR)")
    return path


@pytest.fixture
def with_mirror(mirror, monkeypatch):
    monkeypatch.setenv("EMALIB_DATA_MIRROR", str(mirror))
    return mirror


@pytest.fixture(scope="session")
def embedded_path() -> Path:
    from emalib.model.engines import embedded_model_path

    return embedded_model_path()


@pytest.fixture(scope="session")
def tokenizer(embedded_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(embedded_path)


def make_tiny_model(tokenizer, seed: int = 0, layers: int = 2):
    """A randomly initialised Llama small enough for unit tests, sharing the embedded model's tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                         tie_word_embeddings=True)
    return LlamaForCausalLM(config)


@pytest.fixture
def tiny_model(tokenizer):
    return make_tiny_model(tokenizer)


@pytest.fixture(scope="session")
def tiny_model_dir(tokenizer, tmp_path_factory) -> Path:
    """The tiny model saved to disk, so engine code can load it by path like a real checkpoint."""
    path = tmp_path_factory.mktemp("tiny-llama")
    make_tiny_model(tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


# ---------------------------------------------------------------------------------------------------------------
# Test tiers (README#tests). The default tier is every test without `integration` or `e2e`:
#   pytest -m "not integration and not e2e"      fast unit tests (tiny random models, files, maths)
#   pytest -m integration                          the embedded model, training, CLI subprocesses
#   pytest -m e2e                                  papermill notebooks, the llama.cpp server, Ray, Slurm, JupyterLab
# `make test` runs all three. A test's tier follows from the markers that say what it runs (pyproject.toml); a few
# tests that train a tiny model for several steps are marked `integration` themselves.
E2E_MARKERS = frozenset({"notebooks", "server", "study", "slurm", "lab"})
INTEGRATION_MARKERS = frozenset({"slow", "unsloth", "subprocess"})
E2E_FIXTURES = frozenset({"server_url"})  # the llama.cpp server (tests/test_openai_judge.py), used by other modules too


def pytest_collection_modifyitems(config, items):
    for item in items:
        markers = {marker.name for marker in item.iter_markers()}
        if markers & E2E_MARKERS or E2E_FIXTURES & set(item.fixturenames):
            item.add_marker(pytest.mark.e2e)
        elif markers & INTEGRATION_MARKERS:
            item.add_marker(pytest.mark.integration)
