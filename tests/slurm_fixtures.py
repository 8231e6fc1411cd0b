"""Fixtures for tests marked ``slurm``: the one-machine development cluster.

``slurm_cluster`` (session scope) runs ``slurm/dev-cluster up`` once, builds the
DeepSpeed JIT op the jobs need, and points ``SLURM_CONF`` at the cluster for the rest
of the session; the cluster is left running afterwards (``slurm/dev-cluster down``
stops it). Where the cluster cannot be brought up (not root, Slurm or munge not
installed, a daemon that does not start) the tests are skipped with the reason,
except in CI (``CI=true``), where that is a failure.

Import it from ``conftest.py`` (``from tests.slurm_fixtures import slurm_cluster``).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import pytest

from .prerequisites import skip_unless_ci

REPO = Path(__file__).resolve().parents[1]
DEV_CLUSTER = REPO / "slurm" / "dev-cluster"
DEFAULT_STATE = "/var/tmp/scilm-dev-cluster"
UP_TIMEOUT_S = 180


@dataclass(frozen=True)
class SlurmCluster:
    """The running development cluster."""

    conf: Path
    state: Path
    partition: str = "dev"
    nodes: tuple[str, ...] = ("node1", "node2")


def _unavailable(reason: str) -> NoReturn:
    skip_unless_ci(f"development Slurm cluster unavailable: {reason}")


def _tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def _build_deepspeed_comm_op() -> None:
    """Compile (or find in the torch extensions cache) DeepSpeed's CPU communication op
    before any job runs: the time-limit test gives its job allocations of 1-2 minutes, and
    a first JIT build (~90 s) inside one would use it up."""
    code = "from deepspeed.comm.torch import build_shm_op; build_shm_op()"
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600
    )
    assert done.returncode == 0, _tail(done.stderr + done.stdout)


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    """Bring the development cluster up (idempotent) and export SLURM_CONF."""
    state = Path(os.environ.get("SCILM_DEV_CLUSTER_DIR", DEFAULT_STATE))
    try:
        proc = subprocess.run(
            [str(DEV_CLUSTER), "up"],
            capture_output=True,
            text=True,
            timeout=UP_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        _unavailable(f"{DEV_CLUSTER} up: {exc}")
    if proc.returncode != 0:
        _unavailable(
            f"`slurm/dev-cluster up` exited {proc.returncode}:\n{_tail(proc.stderr + proc.stdout)}"
        )
    cluster = SlurmCluster(conf=state / "slurm.conf", state=state)
    _build_deepspeed_comm_op()
    patch = pytest.MonkeyPatch()
    patch.setenv("SLURM_CONF", str(cluster.conf))
    try:
        yield cluster
    finally:
        patch.undo()
