"""Real jobs through submitit on the single-node Slurm cluster of scripts/slurm_local.sh (see slurm_fixture.py)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
from slurm_fixture import make_executor, slurm_cluster_fixture, wait_for  # noqa: F401  (registers slurm_cluster)

pytestmark = pytest.mark.slurm


# Job functions: top level, so that the job imports them from this module (tests/ is on its PYTHONPATH).
def sum_of_squares(n: int) -> int:
    return sum(i * i for i in range(n))


def write_text(path: str, text: str) -> dict:
    Path(path).write_text(text)
    return {"job_id": os.environ.get("SLURM_JOB_ID"), "host": socket.gethostname().split(".")[0]}


def triple(x: int) -> int:
    return 3 * x


def fail(message: str) -> None:
    raise ValueError(message)


def test_single_jobs(slurm_cluster, tmp_path):
    executor = make_executor(tmp_path / "logs")
    target = tmp_path / "out" / "hello.txt"
    target.parent.mkdir()
    squares = executor.submit(sum_of_squares, 1000)
    writer = executor.submit(write_text, str(target), "written on a Slurm node")
    wait_for([squares, writer])
    assert squares.result() == sum(i * i for i in range(1000))
    info = writer.result()
    assert target.read_text() == "written on a Slurm node"
    assert info == {"job_id": writer.job_id, "host": slurm_cluster["node"]}


def test_job_array(slurm_cluster, tmp_path):
    executor = make_executor(tmp_path / "logs", slurm_array_parallelism=slurm_cluster["cpus"])
    jobs = executor.map_array(triple, [1, 2, 3])
    assert len({job.job_id.split("_")[0] for job in jobs}) == 1  # one array, three tasks
    wait_for(jobs)
    assert [job.result() for job in jobs] == [3, 6, 9]


def test_failing_job(slurm_cluster, tmp_path):
    import submitit

    executor = make_executor(tmp_path / "logs")
    job = executor.submit(fail, "boom from the job")
    wait_for([job])
    with pytest.raises(submitit.core.utils.FailedJobError, match="boom from the job"):
        job.result()
    assert "ValueError: boom from the job" in str(job.exception())
    assert "ValueError: boom from the job" in job.stderr()
