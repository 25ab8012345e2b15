"""A real single-node Slurm cluster for tests: the session fixture `slurm_cluster` runs scripts/slurm_local.sh
(first use installs Debian's slurm-wlm + munge, needs root; later uses take well under a second) and yields
{"node", "cpus", "partition"}. Without Slurm here (no apt, not root, foreign slurm.conf, ...) or without
submitit, tests using it are skipped with the reason; EMALIB_REQUIRE_SLURM=1 turns those skips into failures
(for a CI that must exercise Slurm). The cluster is left running for later sessions:
`scripts/slurm_local.sh stop` stops it.

Use in a test module (the fixture has to be imported into the module's namespace):

    from slurm_fixture import make_executor, slurm_cluster_fixture, wait_for  # noqa: F401

    def test_something(slurm_cluster, tmp_path):
        executor = make_executor(tmp_path / "logs")
        job = executor.submit(some_top_level_function, 1)
        wait_for([job])
        assert job.result() == ...

Job functions must be importable by the job's Python (submitit pickles them by reference): make_executor puts
tests/ and the repository root on the job's PYTHONPATH, so top-level functions of a tests/ module work.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

TESTS_DIR = Path(__file__).resolve().parent
REPO = TESTS_DIR.parent
SCRIPT = REPO / "scripts" / "slurm_local.sh"
SCRIPT_TIMEOUT_S = 600  # a cold apt-get install on a slow mirror; warm starts take seconds
PARTITION = "debug"


def _skip(reason: str) -> None:
    if os.environ.get("EMALIB_REQUIRE_SLURM") == "1":
        pytest.fail(f"EMALIB_REQUIRE_SLURM=1 but {reason}", pytrace=False)
    pytest.skip(reason)


# Registered as "slurm_cluster"; the function's own name differs so that importing it (the module namespace is
# where pytest finds fixtures) does not clash with the test parameter of that name (ruff F811).
@pytest.fixture(scope="session", name="slurm_cluster")
def slurm_cluster_fixture() -> dict:
    try:
        import submitit  # noqa: F401
    except ImportError:
        _skip("submitit is not installed")
    if not sys.platform.startswith("linux"):
        _skip("the local Slurm cluster needs Linux")
    # Output to files, not pipes: if the timeout kills bash, a still-running child (apt-get) holding a pipe
    # would otherwise keep subprocess.run waiting.
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        try:
            proc = subprocess.run(["bash", str(SCRIPT)], stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                  timeout=SCRIPT_TIMEOUT_S, text=True, check=False)
            returncode = proc.returncode
        except subprocess.TimeoutExpired:
            returncode = None
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if returncode is None:
        _skip(f"{SCRIPT.name} did not finish in {SCRIPT_TIMEOUT_S} s")
    if returncode != 0:
        lines = stderr.strip().splitlines()
        _skip(f"no local Slurm cluster: {lines[-1] if lines else f'{SCRIPT.name} exited {returncode}'}")
    ready = re.search(r"^slurm ready: (\S+) (\d+) cpus$", stdout, re.MULTILINE)
    assert ready, f"{SCRIPT.name} exited 0 without its ready line:\n{stdout}\n{stderr}"
    return {"node": ready[1], "cpus": int(ready[2]), "partition": PARTITION}


def make_executor(folder: str | Path, **params):
    """A submitit executor for the local cluster. Defaults (small: 1 CPU, 1 GB, 5 min) can be overridden by
    submitit's parameter names (cpus_per_task=..., slurm_array_parallelism=...)."""
    import submitit

    # The job runs this very interpreter (the project venv, same machine), so submitit and emalib import there.
    executor = submitit.AutoExecutor(folder=folder, cluster="slurm", slurm_python=sys.executable)
    pythonpath = os.pathsep.join([str(TESTS_DIR), str(REPO)])
    defaults = {"slurm_partition": PARTITION, "cpus_per_task": 1, "mem_gb": 1, "timeout_min": 5,
                "slurm_setup": [f'export PYTHONPATH="{pythonpath}${{PYTHONPATH:+:$PYTHONPATH}}"']}
    executor.update_parameters(**{**defaults, **params})
    return executor


def wait_for(jobs, timeout_s: float = 120.0, poll_s: float = 0.5) -> None:
    """Wait, bounded, until every job is done. submitit's own wait() has no bound, and with no accounting
    (no sacct) it knows a job is done only from its result file: a job killed before writing one would hang it.
    On timeout the jobs are cancelled and an AssertionError shows their state and log tails."""
    jobs = list(jobs)
    deadline = time.monotonic() + timeout_s
    while not all(job.done() for job in jobs):
        if time.monotonic() > deadline:
            report = []
            for job in jobs:
                tail = "\n".join((job.stderr() or "").splitlines()[-5:])
                report.append(f"job {job.job_id} done={job.done()} stderr tail:\n{tail}")
                job.cancel(check=False)
            raise AssertionError(f"Slurm jobs not done after {timeout_s:.0f} s\n" + "\n".join(report))
        time.sleep(poll_s)
