"""The CUDA path's defects that can be checked on CPU: Unsloth imported first, multi-process refused."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# A stand-in for the real `unsloth` package (which needs CUDA): it records which of the libraries it patches were
# already imported when it was, then refuses to load a model so that the entry point stops there.
STANDIN_UNSLOTH = '''
import json, os, sys
with open(os.environ["UNSLOTH_RECORD"], "w") as f:
    json.dump([name for name in ("transformers", "peft", "trl") if name in sys.modules], f)

class StandinStop(Exception):
    pass

class FastLanguageModel:
    @staticmethod
    def from_pretrained(*args, **kwargs):
        raise StandinStop("stand-in unsloth: no model")
'''

ENTRY_POINTS = {
    "train": "pipeline.train(params)",
    "evaluate_base": "pipeline.evaluate(params, base=True)",
}


@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
def test_unsloth_is_imported_before_transformers_and_peft(entry, tmp_path, with_mirror):
    standin = tmp_path / "standin" / "unsloth"
    standin.mkdir(parents=True)
    (standin / "__init__.py").write_text(STANDIN_UNSLOTH)
    record = tmp_path / "record.json"
    script = (
        "from emalib.core.config import load_params\n"
        "from emalib.runs import pipeline\n"
        f"params = load_params('params/quickstart.yaml', ['model.engine=unsloth', 'results_dir={tmp_path / 'r'}'])\n"
        f"try:\n    {ENTRY_POINTS[entry]}\n"
        "except Exception as err:\n    assert type(err).__name__ == 'StandinStop', repr(err)\n")
    env = dict(os.environ, UNSLOTH_RECORD=str(record),
               PYTHONPATH=os.pathsep.join([str(tmp_path / "standin"), str(REPO), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-c", script], check=False, cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(record.read_text()) == []  # nothing Unsloth patches was imported before it


@pytest.mark.parametrize("world_size", ["2", "8"])
def test_multi_process_launch_is_refused_in_one_line(world_size, tmp_path, monkeypatch, capsys):
    from emalib.cli import main

    monkeypatch.setenv("WORLD_SIZE", world_size)  # what torchrun and accelerate launch set in every process
    results = tmp_path / "results"
    code = main(["run", str(REPO / "params/quickstart.yaml"), "-o", f"results_dir={results}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert f"WORLD_SIZE={world_size}" in err and "one run per GPU" in err and "emalib study" in err
    assert not results.exists()  # refused before anything was written


def test_pipeline_train_refuses_a_multi_process_launch(tmp_path, monkeypatch):
    from emalib.core.config import load_params
    from emalib.core.errors import EmalibError
    from emalib.runs import pipeline

    params = load_params(REPO / "params/quickstart.yaml", [f"results_dir={tmp_path / 'r'}"])
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(EmalibError, match="WORLD_SIZE=2"):
        pipeline.train(params)
    assert not (tmp_path / "r").exists()
    monkeypatch.setenv("WORLD_SIZE", "1")  # a single-process launch is an ordinary run
    from emalib.core.launch import refuse_multi_process

    refuse_multi_process()
