"""The development Slurm cluster (slurm/dev-cluster): two nodes, submitit, srun --mpi=pmix."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.slurm_fixtures import REPO, SlurmCluster, slurm_cluster  # noqa: F401

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(120)]

# sacct needs accounting, which the development cluster does not have, so
# submitit never learns a job's state; a job that dies without writing its
# result would make job.results() wait forever. Poll squeue ourselves instead.
_FINISHED = {
    "BOOT_FAIL",
    "CANCELLED",
    "COMPLETED",
    "DEADLINE",
    "FAILED",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "PREEMPTED",
    "TIMEOUT",
}


def _squeue_state(job_id: str) -> str:
    out = subprocess.run(
        ["squeue", "-h", "-t", "all", "-j", job_id, "-o", "%T"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.split()
    return out[0] if out else "UNKNOWN"


def _rank_info() -> dict:
    """Runs in each Slurm task."""
    import submitit

    env = submitit.JobEnvironment()
    return {
        "rank": env.global_rank,
        "num_tasks": env.num_tasks,
        "node": os.environ["SLURMD_NODENAME"],
        "hostnames": env.hostnames,
    }


def test_two_nodes_up(slurm_cluster: SlurmCluster) -> None:  # noqa: F811
    out = subprocess.run(
        ["sinfo", "-h", "-N", "-p", slurm_cluster.partition, "-o", "%N %T"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout
    states = dict(line.split() for line in out.splitlines() if line.strip())
    assert sorted(states) == sorted(slurm_cluster.nodes)
    # idle; mixed if something else happens to be running on it
    assert set(states.values()) <= {"idle", "mixed"}, states


def test_submitit_two_nodes_one_task_each(
    slurm_cluster: SlurmCluster,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import submitit

    # The tasks unpickle _rank_info by importing tests.test_dev_cluster.
    pythonpath = [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(pythonpath))
    executor = submitit.AutoExecutor(folder=tmp_path / "%j", cluster="slurm")
    executor.update_parameters(
        slurm_partition=slurm_cluster.partition,
        nodes=2,
        tasks_per_node=1,
        cpus_per_task=1,
        timeout_min=5,
        name="test-dev-cluster",
    )
    job = executor.submit(_rank_info)
    deadline = time.monotonic() + 60
    while not job.done():
        state = _squeue_state(job.job_id)
        if state in _FINISHED and not job.done():
            time.sleep(2)  # the result files may still be on their way
            if not job.done():
                logs = "\n".join(str(p.read_text()) for p in sorted(tmp_path.rglob("*_log.err")))
                pytest.fail(f"job {job.job_id} ended {state} without results:\n{logs}")
        if time.monotonic() > deadline:
            subprocess.run(["scancel", job.job_id], check=False)
            pytest.fail(f"job {job.job_id} not done after 60 s (squeue: {state})")
        time.sleep(0.5)
    results = job.results()
    assert sorted(r["rank"] for r in results) == [0, 1]
    assert {r["num_tasks"] for r in results} == {2}
    nodes = [r["node"] for r in results]
    assert len(set(nodes)) == 2, nodes
    assert set(nodes) == set(slurm_cluster.nodes)
    assert results[0]["hostnames"] == list(slurm_cluster.nodes)


@pytest.mark.parametrize("nodes", [1, 2], ids=["one-node", "two-nodes"])
def test_srun_pmix_mpi4py_world_of_two(slurm_cluster: SlurmCluster, nodes: int) -> None:  # noqa: F811
    code = (
        "import os; from mpi4py import MPI; c = MPI.COMM_WORLD; "
        "print(c.Get_rank(), c.Get_size(), c.allreduce(c.Get_rank() + 1), "
        "os.environ['SLURMD_NODENAME'])"
    )
    srun = ["srun", "-p", slurm_cluster.partition, f"-N{nodes}", "-n2", "--mpi=pmix"]
    proc = subprocess.run(
        [*srun, sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    rows = sorted(line.split() for line in proc.stdout.splitlines() if line.strip())
    assert [r[:3] for r in rows] == [["0", "2", "3"], ["1", "2", "3"]], proc.stdout
    assert len({r[3] for r in rows}) == nodes
