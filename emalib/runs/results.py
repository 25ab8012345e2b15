"""The run folder and its manifest (git sha, package versions, data sha256s, device, seed, timings).

results/<study>/<run>/params.yaml is written when a run starts. A later start with different params under the
same name is refused, so one folder never mixes the outputs of two configurations.
"""

from __future__ import annotations

import functools
import hashlib
import json
import platform
import re
import subprocess
import time
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path

import yaml

from emalib.core.config import RunParams, dump_params
from emalib.core.errors import ParamsError
from emalib.core.io import atomic_write_json, atomic_write_text, read_json_object
from emalib.core.names import inside
from emalib.core.write_targets import check_write_targets

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
    import torch  # here, so that reading results and expanding studies does not load torch

    if torch.cuda.is_available():
        return {"type": "cuda", "name": torch.cuda.get_device_name(0), "count": torch.cuda.device_count()}
    return {"type": "cpu", "name": platform.processor() or platform.machine(), "threads": torch.get_num_threads()}


# What an evaluation of the model without adapter depends on: runs that agree on these share one base folder.
BASE_EVALUATION_KEYS = ("seed", "model", "generation", "judge", "metrics", "task_eval")


def base_evaluation_config(params: RunParams) -> dict:
    tree = params.model_dump(mode="json")
    return {key: tree[key] for key in BASE_EVALUATION_KEYS}


def base_run_name(params: RunParams) -> str:
    """The folder (within the study) of the base model's evaluation: named by the model and a hash of everything
    the evaluation depends on, so evaluations with other question sets or judges never overwrite each other."""
    return _base_run_name(json.dumps(base_evaluation_config(params), sort_keys=True))


@functools.lru_cache(maxsize=4096)
def _base_run_name(config_json: str) -> str:
    """Cached by the config: the YAML dump the hash is taken of (kept, so existing folders keep their names) costs
    a millisecond, and a study asks once per run."""
    config = json.loads(config_json)
    text = yaml.safe_dump(config, sort_keys=True)
    model = re.sub(r"[^a-z0-9]+", "-", Path(config["model"]["name"]).name.lower()).strip("-")
    return f"base-{model}-{hashlib.sha256(text.encode()).hexdigest()[:8]}"


def run_record(params: RunParams, run_dir: Path) -> str:
    """What a folder records as its params: the whole config, or for a base evaluation's folder only what that
    evaluation depends on (every run that shares the evaluation writes the same record)."""
    if Path(run_dir).name == base_run_name(params):
        return yaml.safe_dump(base_evaluation_config(params), sort_keys=True)
    return dump_params(params)


def prepare_run_dir(params: RunParams, run_dir: Path | None = None, strict: bool = True,
                    resolved: str | None = None) -> Path:
    """Create the run folder and record the resolved params; refuse to reuse a folder made with other params.

    resolved: what to record and compare instead of the whole params (a base evaluation records only what it
    depends on). strict=False keeps the first record without comparing. The params' own folder is checked to
    resolve inside results_dir (a symbolic link could lead elsewhere); a folder passed in is the caller's choice.
    The paths the params name that the run writes are checked first (emalib.core.write_targets).
    """
    check_write_targets(params, f"run {params.study}/{params.run}")
    run_dir = Path(run_dir) if run_dir is not None else inside(params.run_dir, params.results_dir)
    resolved = resolved if resolved is not None else run_record(params, run_dir)
    existing = run_dir / "params.yaml"
    if strict:
        refuse_other_params(run_dir, resolved)
    make_run_folder(run_dir, params.results_dir)
    try:
        if not existing.is_file():
            atomic_write_text(existing, resolved)
    except OSError as err:  # read-only, full, ...
        raise ParamsError(f"results_dir {params.results_dir!r}: cannot write {existing} "
                          f"({err.strerror or type(err).__name__})") from None
    return run_dir


def make_run_folder(run_dir: Path, results_dir: str | Path) -> None:
    """Create run_dir, a failure (results_dir is a file, read-only, a system folder such as /proc) in one line."""
    try:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ParamsError(f"results_dir {str(results_dir)!r}: cannot create {err.filename or run_dir} "
                          f"({err.strerror or type(err).__name__})") from None


def refuse_other_params(run_dir: Path, resolved: str) -> None:
    """ParamsError when run_dir/params.yaml records other params than `resolved` (reads only: `run` asks before it
    takes the folder's lock, so a refused run leaves the folder as it was)."""
    existing = Path(run_dir) / "params.yaml"
    if existing.is_file() and existing.read_text() != resolved:
        raise ParamsError(f"{existing}: this run folder was made with different params; pick another "
                          f"'run' name or delete the folder")


def check_results_dir(params: RunParams) -> None:
    """Refuse, without writing anything, a run folder that cannot be made because a file stands in its path
    (results_dir, or the study folder, is a file)."""
    folder = Path(params.run_dir)
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if folder.exists() and not folder.is_dir():
        raise ParamsError(f"results_dir {params.results_dir!r}: {folder} is a file, not a folder")


def read_manifest(run_dir: Path) -> dict:
    """A run's manifest.json ({} before it has one); a damaged one is one DataError line naming it."""
    path = Path(run_dir) / "manifest.json"
    return read_json_object(path) if path.is_file() else {}


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
    """Record the wall-clock seconds of a step under manifest['timings_s'][step], and the CPU seconds (user + system,
    all threads of this process) under manifest['cpu_s'][step]: on a machine shared with other jobs the wall clock
    grows with their load, the CPU time much less."""
    start, cpu = time.perf_counter(), time.process_time()
    yield
    update_manifest(run_dir, timings_s={step: round(time.perf_counter() - start, 2)},
                    cpu_s={step: round(time.process_time() - cpu, 2)})
