"""One run at a time in a run folder: a second run on a busy folder is refused in one line; a run killed with
SIGKILL (a real process) leaves no lock that blocks the next run; `status` of a killed study shows its node dead,
not running. The runs are real `python -m emalib` processes, stopped as soon as the lock is seen held, before
any model is loaded."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from emalib.runs.run_lock import OWNER_NAME, RunFolderBusy, lock_held, read_owner, run_lock

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


def env(cache: Path) -> dict[str, str]:
    return dict(os.environ, EMALIB_CACHE=str(cache), EMALIB_PROGRESS="0")


def start(args: list[str | Path], cwd: Path, cache: Path, log: Path) -> subprocess.Popen:
    """A CLI process in its own process group (its notebook kernel goes with it when the group is killed)."""
    with open(log, "w") as out:
        return subprocess.Popen([sys.executable, "-m", "emalib", *map(str, args)], cwd=cwd, env=env(cache),
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def kill(process: subprocess.Popen) -> None:
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=60)


def wait_until(condition, what: str, process: subprocess.Popen | None = None, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while not condition():
        if process is not None and process.poll() is not None:
            raise AssertionError(f"the process ended (exit {process.returncode}) before {what}")
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting until {what}")
        time.sleep(0.2)


def cli(*args: str | Path, cwd: Path, cache: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "emalib", *map(str, args)], cwd=cwd, env=env(cache),
                          capture_output=True, text=True, timeout=300, check=False)


def smoke_params(tmp_path: Path) -> Path:
    tree = yaml.safe_load((REPO / "params" / "smoke.yaml").read_text())
    tree.update(results_dir=str(tmp_path / "results"), steps=["train"], evaluate_base=False)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return path


def test_a_second_run_is_refused_and_a_killed_runs_lock_does_not_block_the_next(tmp_path, cache):
    params = smoke_params(tmp_path)
    run_dir = tmp_path / "results" / "smoke" / "sft"
    first = start(["run", params], tmp_path, cache, tmp_path / "first.log")
    try:
        wait_until(lambda: read_owner(run_dir).get("pid") == first.pid, "the first run holds the folder", first)
        second = cli("run", params, cwd=tmp_path, cache=cache)
        lines = second.stderr.strip().splitlines()
        assert second.returncode == 2 and len(lines) == 1, second.stderr[-3000:]
        assert lines[0] == (f"error: {run_dir}: another run is working in this folder (pid {first.pid} on "
                            f"{read_owner(run_dir)['host']}, since {read_owner(run_dir)['started']}); wait for it "
                            "to end or stop it")
        assert first.poll() is None  # the refused run did not disturb the working one
    finally:
        kill(first)
    assert read_owner(run_dir)["pid"] == first.pid  # the killed run's record is left behind: a trace, not a lock
    third = start(["run", params], tmp_path, cache, tmp_path / "third.log")
    try:
        wait_until(lambda: read_owner(run_dir).get("pid") == third.pid, "the next run holds the folder", third)
    finally:
        kill(third)
    log = (tmp_path / "third.log").read_text()
    assert "taking the folder over from a run that ended without releasing it" in log
    assert f"pid {first.pid}" in log


HOLDER = textwrap.dedent("""
    import sys, time
    from emalib.runs.run_lock import run_lock
    with run_lock(sys.argv[1]):
        print("held", flush=True)
        time.sleep(600)
""")


def test_the_lock_is_exclusive_reentrant_and_released_by_the_kernel_on_sigkill(tmp_path):
    run_dir = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert lock_held(run_dir)
        busy = rf"{run_dir}: another run is working in this folder \(pid {holder.pid} on "
        with pytest.raises(RunFolderBusy, match=busy), run_lock(run_dir):
            pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=60)
    assert not lock_held(run_dir)
    with run_lock(run_dir):
        assert read_owner(run_dir)["pid"] == os.getpid()
        with run_lock(run_dir):  # a study node's run inside the node: the same process holds it already
            assert lock_held(run_dir)
        assert lock_held(run_dir)
    assert not lock_held(run_dir) and not (run_dir / OWNER_NAME).exists()


def status_lines(study_file: Path, cwd: Path, cache: Path) -> list[str]:
    completed = cli("status", study_file, cwd=cwd, cache=cache)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return completed.stdout.strip().splitlines()


def test_status_of_a_killed_study_shows_its_node_dead_not_running(tmp_path, cache):
    base = yaml.safe_load((REPO / "params" / "smoke.yaml").read_text())
    base.update(results_dir=str(tmp_path / "results"), steps=["train"], evaluate_base=False)
    study_file = tmp_path / "study.yaml"
    study_file.write_text(yaml.safe_dump({"study": "killed", "base": base, "axes": {"defense": {"none": {}}},
                                          "base_evaluation": False}))
    record_path = tmp_path / "results" / "killed" / "_study" / "status" / "none.json"

    def record() -> dict:
        try:
            return json.loads(record_path.read_text())
        except (OSError, ValueError):
            return {}

    study = start(["study", study_file], tmp_path, cache, tmp_path / "study.log")
    try:
        wait_until(lambda: record().get("state") == "running", "the node runs", study)
        assert status_lines(study_file, tmp_path, cache)[0].startswith("running  run      none")
        # As seen from another host (Slurm, Ray): the process table cannot tell, the run folder's lock does.
        record_path.write_text(json.dumps({**record(), "host": "another-host"}))
        assert status_lines(study_file, tmp_path, cache)[0].startswith("running  run      none")
    finally:
        kill(study)
    line = status_lines(study_file, tmp_path, cache)[0]
    assert line.startswith("dead     run      none") and "pid" in line and "on another-host" in line
    record_path.write_text(json.dumps({**record(), "host": os.uname().nodename}))
    line = status_lines(study_file, tmp_path, cache)[0]
    assert line.startswith("dead     run      none")
    assert line.endswith(f"pid {study.pid} on {os.uname().nodename} ended without recording how (killed?); run "
                         "the study to resume")
