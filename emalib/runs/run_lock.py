"""One run at a time in a run folder, and whether the process behind a study node's "running" record still lives.

`python -m emalib run` and every node of a study hold their run folder's lock while they work in it; a second run
on the folder is refused in one line (exit 2) that names the holder, rather than made to wait behind a run that
may take hours. The lock is filelock's FileLock on <run>/.lock, an OS lock that the kernel releases when its
process ends, however it ends: a run killed with SIGKILL leaves no lock behind, and the next run takes the folder
over; so no lock goes stale and no heartbeat has to age one out (on a file system without flock, filelock falls back
to a marker file that it breaks once the pid it records is gone from this host). Who holds the lock is written
beside it, in <run>/.lock.json (pid, host, start); a record found there when the lock is free is the trace of a
run that was killed, and is logged when taken over.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from emalib.core.errors import EmalibError
from emalib.core.io import atomic_write_json

log = logging.getLogger(__name__)
LOCK_NAME = ".lock"
OWNER_NAME = ".lock.json"
# A short wait before refusing: `status` probes a lock for a moment, which must not make a starting run fail.
WAIT_S = 2.0
_held: dict[str, object] = {}  # resolved folder -> the lock this process holds on it (a study node's nested run)


class RunFolderBusy(EmalibError):
    """Another live run holds the run folder."""


def read_owner(run_dir: str | Path) -> dict:
    import json

    try:
        return json.loads((Path(run_dir) / OWNER_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}  # none, or cut short by a kill


def describe_owner(owner: dict) -> str:
    if not owner:
        return "its pid is not recorded"
    return f"pid {owner.get('pid')} on {owner.get('host')}, since {owner.get('started')}"


@contextmanager
def run_lock(run_dir: str | Path) -> Iterator[None]:
    """Hold run_dir's lock for the block (re-entered freely by the process that holds it); RunFolderBusy when a
    live run holds it."""
    from filelock import FileLock, Timeout

    run_dir = Path(run_dir)
    key = str(run_dir.resolve())
    if key in _held:
        yield
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(run_dir / LOCK_NAME), timeout=WAIT_S)
    try:
        lock.acquire()
    except Timeout:
        raise RunFolderBusy(f"{run_dir}: another run is working in this folder ({describe_owner(read_owner(run_dir))}"
                            "); wait for it to end or stop it") from None
    try:
        previous = read_owner(run_dir)
        if previous:
            log.warning("%s: taking the folder over from a run that ended without releasing it (%s): killed?",
                        run_dir, describe_owner(previous))
        atomic_write_json(run_dir / OWNER_NAME, {"pid": os.getpid(), "host": socket.gethostname(),
                                                 "started": time.strftime("%Y-%m-%dT%H:%M:%S")})
        _held[key] = lock
        yield
    finally:
        _held.pop(key, None)
        (run_dir / OWNER_NAME).unlink(missing_ok=True)
        lock.release()


def lock_held(run_dir: str | Path) -> bool:
    """Whether some live process holds run_dir's lock (a probe: taken and given back at once when free)."""
    from filelock import FileLock, Timeout

    path = Path(run_dir) / LOCK_NAME
    if str(Path(run_dir).resolve()) in _held:
        return True
    if not path.is_file():
        return False  # a holder creates it first
    probe = FileLock(str(path), timeout=0)
    try:
        probe.acquire()
    except Timeout:
        return True
    probe.release()
    return False


def process_alive(pid: int, since: float | None = None) -> bool:
    """Whether process `pid` of this host runs (a zombie does not; nor a newer process that reused the pid of one
    recorded at time `since`, epoch seconds)."""
    import psutil

    try:
        process = psutil.Process(pid)
        started = process.create_time()
        return process.status() != psutil.STATUS_ZOMBIE and (since is None or started <= since + 1)
    except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):
        return False


def record_alive(record: dict, run_dir: str | Path) -> bool:
    """Whether the process that wrote a study node's 'running' record (pid, host, time) still runs: asked of the
    process table on its own host, of the run folder's lock elsewhere (a shared file system: Slurm, Ray)."""
    if record.get("host") == socket.gethostname() and isinstance(record.get("pid"), int):
        try:
            since = time.mktime(time.strptime(record.get("time", ""), "%Y-%m-%dT%H:%M:%S"))
        except ValueError:
            since = None
        return process_alive(record["pid"], since)
    return lock_held(run_dir)
