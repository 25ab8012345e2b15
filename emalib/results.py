"""The run folder and its manifest (git sha, package versions, data sha256s, device, seed, timings).

results/<study>/<run>/params.yaml is written when a run starts. A later start with different params under the
same name is refused, so one folder never mixes the outputs of two configurations.
"""

from __future__ import annotations

import json
import platform
import subprocess
import time
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path

import torch

from emalib.config import RunParams, dump_params
from emalib.errors import ParamsError
from emalib.io import atomic_write_json, atomic_write_text

PACKAGES = ("emalib", "torch", "transformers", "peft", "trl", "accelerate", "unsloth", "unsloth_zoo", "openai",
            "papermill", "vllm")


def package_versions() -> dict[str, str]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def git_revision() -> dict[str, str | bool | None]:
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                    capture_output=True, text=True, check=True).stdout.strip())
    except (OSError, subprocess.CalledProcessError):
        return {"sha": None, "dirty": None}
    return {"sha": sha, "dirty": dirty}


def device_info() -> dict[str, str | int]:
    if torch.cuda.is_available():
        return {"type": "cuda", "name": torch.cuda.get_device_name(0), "count": torch.cuda.device_count()}
    return {"type": "cpu", "name": platform.processor() or platform.machine(), "threads": torch.get_num_threads()}


def prepare_run_dir(params: RunParams, run_dir: Path | None = None, strict: bool = True) -> Path:
    """Create the run folder and record the resolved params; refuse to reuse a folder made with other params.

    strict=False (the shared 'base' folder of a study, evaluated from any run's params) keeps the first params.
    """
    run_dir = Path(run_dir or params.run_dir)
    resolved = dump_params(params)
    existing = run_dir / "params.yaml"
    if strict and existing.is_file() and existing.read_text() != resolved:
        raise ParamsError(f"{existing}: this run folder was made with different params; pick another "
                          f"'run' name or delete the folder")
    run_dir.mkdir(parents=True, exist_ok=True)
    if not existing.is_file():
        atomic_write_text(existing, resolved)
    return run_dir


def read_manifest(run_dir: Path) -> dict:
    path = Path(run_dir) / "manifest.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def update_manifest(run_dir: Path, **fields) -> dict:
    """Merge fields into manifest.json (dict fields are merged one level deep), written atomically."""
    manifest = read_manifest(run_dir)
    manifest.setdefault("created", time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    for key, value in fields.items():
        if isinstance(value, dict) and isinstance(manifest.get(key), dict):
            manifest[key] = {**manifest[key], **value}
        else:
            manifest[key] = value
    manifest.update(git=git_revision(), packages=package_versions(), device=device_info())
    atomic_write_json(Path(run_dir) / "manifest.json", manifest)
    return manifest


@contextmanager
def timed(run_dir: Path, step: str):
    """Record the wall-clock seconds of a step under manifest['timings_s'][step]."""
    start = time.perf_counter()
    yield
    update_manifest(run_dir, timings_s={step: round(time.perf_counter() - start, 2)})
