"""`python -m emalib doctor`: the quickstart runs on this machine; the paper's configuration names what it lacks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from emalib.cli import main

REPO = Path(__file__).resolve().parent.parent


def test_quickstart_can_run_here(with_mirror, capsys):
    assert main(["doctor", str(REPO / "params/quickstart.yaml")]) == 0
    table = capsys.readouterr().out
    assert "engine" in table and "judge" in table and "MISSING" not in table


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks what a machine without CUDA lacks")
def test_paper_configuration_names_gpu_unsloth_and_judge_key(with_mirror, monkeypatch, capsys):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    assert main(["doctor", str(REPO / "params/paper/code.yaml")]) == 2
    captured = capsys.readouterr()
    lines = {line.split()[0]: line for line in captured.out.splitlines()}
    assert "MISSING" in lines["GPU"] and "7.6B parameters" in lines["GPU"]
    assert "MISSING" in lines["unsloth"] and "MISSING" in lines["judge"] and "OPENAI_API_KEY not set" in lines["judge"]
    error = captured.err.strip()
    assert len(error.splitlines()) == 1 and "code.yaml" in error
    assert all(name in error for name in ("GPU", "Unsloth", "judge key (OPENAI_API_KEY)"))
