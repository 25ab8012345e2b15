"""Executing a study's nodes: one after another here, as Ray tasks, or as Slurm jobs through submitit.

Whatever the executor, a node is one call of `run_node`: the papermill execution of its params file
(`emalib.runs.notebooks.run_notebooks`), bracketed by status records in results/<study>/_study/status/<node>.json
(running / done / failed with the one-line error and the failed notebook), written while the node holds its run
folder's lock (emalib.runs.run_lock); a 'running' record whose process is gone reads as 'dead'. Dependencies are the
engines' own:
the order here, object refs handed to dependent tasks in Ray, `afterok` job dependencies in Slurm. A node whose
status is done is never resubmitted, and inside an unfinished node every step whose notebook finished is skipped
(run_notebooks), so restarting a killed study redoes nothing that was finished.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import shutil
import socket
import sys
import time
from pathlib import Path

from emalib.core.errors import EmalibError
from emalib.core.io import atomic_write_json
from emalib.studies.study import STUDY_FOLDER, Study, write_node_params

log = logging.getLogger(__name__)
EXECUTORS = ("local", "ray", "slurm")


def status_path(study_dir: Path, node_id: str) -> Path:
    return Path(study_dir) / STUDY_FOLDER / "status" / f"{node_id}.json"


def read_status(study_dir: Path, node_id: str) -> dict:
    """A node's last record; a 'running' one whose process is gone (a killed study) reads as 'dead'."""
    from emalib.runs.run_lock import record_alive

    path = status_path(study_dir, node_id)
    try:
        record = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {"state": "pending"}
    except json.JSONDecodeError:
        return {"state": "pending"}  # a record cut short by a kill: the node is simply run again
    if record.get("state") == "running" and not record_alive(record, Path(study_dir) / node_id):
        return {**record, "state": "dead", "error": f"pid {record.get('pid')} on {record.get('host')} ended "
                                                    "without recording how (killed?); run the study to resume"}
    return record


def _record(study_dir: Path, node_id: str, state: str, **fields) -> None:
    atomic_write_json(status_path(study_dir, node_id), {"state": state, "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
                                                        "host": socket.gethostname(), "pid": os.getpid(), **fields})


def run_node(node_id: str, params_file: str, study_dir: str, cwd: str) -> str:
    """Execute one node (in this process, a Ray worker or a Slurm job) and record how it ended."""
    from papermill.exceptions import PapermillExecutionError

    from emalib.core.config import load_params
    from emalib.core.names import inside
    from emalib.runs.notebooks import run_notebooks
    from emalib.runs.run_lock import run_lock

    os.chdir(cwd)  # params hold paths relative to the project folder the study was started from
    try:
        params = load_params(params_file)
        run_dir = inside(params.run_dir, params.results_dir)
    except EmalibError as err:
        _record_failure(Path(study_dir), node_id, err)
        raise
    # The node's records are written holding its folder's lock, so that `status` on another host can ask the lock
    # whether a 'running' node still runs. A folder busy with another live run raises here and leaves its record.
    with run_lock(run_dir):
        _record(Path(study_dir), node_id, "running")
        try:
            params = run_notebooks(params_file)
        except (EmalibError, PapermillExecutionError) as err:
            _record_failure(Path(study_dir), node_id, err)
            raise
        _record(Path(study_dir), node_id, "done", run_dir=str(params.run_dir))
    return node_id


def _record_failure(study_dir: Path, node_id: str, err: Exception) -> None:
    """A 'failed' record with the one-line error and the failed notebook, if one was kept."""
    message = f"{err.ename}: {err.evalue}" if hasattr(err, "ename") else str(err)
    failed = sorted(study_dir.glob(f"{node_id}/*.failed.ipynb"))
    _record(study_dir, node_id, "failed", error=message.splitlines()[0] if message else "",
            notebook=str(failed[-1]) if failed else None)


def pending_nodes(study: Study) -> list[str]:
    return [node_id for node_id in study.nodes if read_status(study.study_dir, node_id)["state"] != "done"]


def check_executor(executor: str) -> None:
    """Refuse, before anything is written, an executor this machine cannot use: one line saying what to install,
    or that there is no Slurm cluster here."""
    if executor not in EXECUTORS:
        raise EmalibError(f"executor must be one of {', '.join(EXECUTORS)}, got {executor!r}")
    needs = {"ray": ("ray", "Ray"), "slurm": ("submitit", "submitit")}.get(executor)
    if needs is None:
        return
    module, name = needs
    try:
        importlib.import_module(module)
    except ImportError:
        raise EmalibError(f"--executor {executor}: {name} is not installed (pip install 'emalib[cluster]')") from None
    if executor == "slurm" and shutil.which("srun") is None:  # what submitit looks for
        raise EmalibError("--executor slurm: no Slurm cluster found (srun is not on PATH); use --executor local "
                          "or ray here")


def execute(study: Study, executor: str = "local", **options) -> dict[str, str]:
    """Run every node not yet done, in dependency order; returns {node: final state}."""
    check_executor(executor)
    files = write_node_params(study)
    todo = pending_nodes(study)
    log.info("study %s: %d of %d nodes to run (%s)", study.name, len(todo), len(study.nodes), executor)
    if todo:
        {"local": _execute_local, "ray": _execute_ray, "slurm": _execute_slurm}[executor](study, todo, files,
                                                                                          **options)
    return {node_id: read_status(study.study_dir, node_id)["state"] for node_id in study.nodes}


def _progress(total: int, description: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=description, unit="run")


def _args(study: Study, node_id: str, files: dict[str, Path]) -> tuple[str, str, str, str]:
    return node_id, str(files[node_id].resolve()), str(study.study_dir.resolve()), str(Path.cwd())


def _execute_local(study: Study, todo: list[str], files: dict[str, Path]) -> None:
    failed: set[str] = set()
    with _progress(len(todo), f"{study.name} (local)") as bar:
        for node_id in todo:
            blocked = [d for d in study.nodes[node_id].deps if d in failed]
            if blocked:
                failed.add(node_id)
                _record(study.study_dir, node_id, "blocked", error=f"depends on failed {', '.join(blocked)}")
            else:
                try:
                    run_node(*_args(study, node_id, files))
                except Exception as err:  # noqa: BLE001 (recorded by run_node; the independent nodes go on)
                    failed.add(node_id)
                    log.error("%s failed: %s", node_id, str(err).splitlines()[0] if str(err) else type(err).__name__)
            bar.update(1)


def _execute_ray(study: Study, todo: list[str], files: dict[str, Path], address: str | None = None,
                 num_gpus_per_run: float = 0.0) -> None:
    """A Ray task per node; a dependent task receives its dependencies' refs, so Ray starts it after them and
    fails it without running when one of them failed."""
    import ray

    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False)

    def node_task(node_id, params_file, study_dir, cwd, *done_dependencies):
        return run_node(node_id, params_file, study_dir, cwd)

    remote = ray.remote(num_cpus=1, num_gpus=num_gpus_per_run, max_retries=0)(node_task)
    refs: dict[str, object] = {}
    for node_id in todo:
        after = [refs[d] for d in study.nodes[node_id].deps if d in refs]
        refs[node_id] = remote.remote(*_args(study, node_id, files), *after)
    waiting = {ref: node_id for node_id, ref in refs.items()}
    with _progress(len(todo), f"{study.name} (ray)") as bar:
        while waiting:
            ready, _ = ray.wait(list(waiting), num_returns=1)
            node_id = waiting.pop(ready[0])
            try:
                ray.get(ready[0])
            except Exception:  # noqa: BLE001 (the node recorded its own failure; a dependent never started)
                if read_status(study.study_dir, node_id)["state"] in ("pending", "dead"):
                    _record(study.study_dir, node_id, "blocked", error="a dependency failed")
            bar.update(1)


def _execute_slurm(study: Study, todo: list[str], files: dict[str, Path], partition: str | None = None,
                   timeout_min: int = 24 * 60, cpus_per_task: int = 2, gpus_per_node: int = 0,
                   mem_gb: float | None = None, slurm_parameters: dict | None = None) -> None:
    """One Slurm job per node through submitit; a dependent job waits with `afterok` on its dependencies' jobs
    and is cancelled by Slurm when one of them fails (`kill_on_invalid_dep`)."""
    import submitit

    folder = study.study_dir / STUDY_FOLDER / "slurm"
    executor = submitit.AutoExecutor(folder=str(folder / "%j"), cluster="slurm", slurm_python=sys.executable)
    base = {"timeout_min": timeout_min, "cpus_per_task": cpus_per_task, "name": f"emalib-{study.name}"}
    if partition:
        base["slurm_partition"] = partition
    if gpus_per_node:
        base["gpus_per_node"] = gpus_per_node
    if mem_gb:
        base["mem_gb"] = mem_gb
    jobs: dict[str, object] = {}
    for node_id in todo:
        after = [jobs[d].job_id for d in study.nodes[node_id].deps if d in jobs]
        extra = dict(slurm_parameters or {})
        if after:
            extra.update(dependency="afterok:" + ":".join(after), kill_on_invalid_dep="yes")
        executor.update_parameters(**base, slurm_additional_parameters=extra)
        jobs[node_id] = executor.submit(run_node, *_args(study, node_id, files))
        _record(study.study_dir, node_id, "queued", job_id=jobs[node_id].job_id)
    with _progress(len(todo), f"{study.name} (slurm)") as bar:
        for node_id, job in jobs.items():
            try:
                job.result()
            except Exception:  # noqa: BLE001 (failed or cancelled: the status file says which)
                if read_status(study.study_dir, node_id)["state"] in ("queued", "dead"):
                    _record(study.study_dir, node_id, "blocked", error=f"Slurm job {job.job_id} ended in "
                                                                        f"{job.state}", job_id=job.job_id)
            bar.update(1)
