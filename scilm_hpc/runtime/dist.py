"""Rank discovery and small collectives for jobs that are not torch.distributed.

A job asks ``communicator()`` who it is. Under submitit (local processes or
Slurm tasks) ranks come from submitit's job environment and talk through files
in a rendezvous directory on the shared filesystem; under ``mpirun`` / ``srun
--mpi=pmix`` they use mpi4py; otherwise the job is a single rank.
"""

from __future__ import annotations

import os
import pickle
import shutil
import time
from pathlib import Path
from typing import Any, Protocol

MPI_SIZE_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE", "MPI_LOCALNRANKS")


class Communicator(Protocol):
    """The few collectives prepare and evaluate need."""

    rank: int
    world_size: int

    def bcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""

    def gather(self, obj: Any) -> list[Any] | None:
        """Every rank's ``obj`` in rank order on rank 0; None elsewhere."""

    def close(self) -> None:
        """Release resources once every rank is done communicating."""


class SingleProcess:
    """One rank, no communication."""

    rank = 0
    world_size = 1

    def bcast(self, obj: Any) -> Any:
        return obj

    def gather(self, obj: Any) -> list[Any] | None:
        return [obj]

    def close(self) -> None:
        pass


class MPICommunicator:
    """mpi4py's COMM_WORLD."""

    def __init__(self) -> None:
        from mpi4py import MPI

        self._comm = MPI.COMM_WORLD
        self.rank = self._comm.Get_rank()
        self.world_size = self._comm.Get_size()

    def bcast(self, obj: Any) -> Any:
        return self._comm.bcast(obj, root=0)

    def gather(self, obj: Any) -> list[Any] | None:
        return self._comm.gather(obj, root=0)

    def close(self) -> None:
        self._comm.Barrier()


class FileCommunicator:
    """Collectives through pickles in a directory every rank can see.

    Each message is written to a temporary name and renamed, so a reader never
    sees a partial file. Waiting is bounded by ``timeout_s``.
    """

    def __init__(
        self, directory: Path, rank: int, world_size: int, timeout_s: float = 600.0
    ) -> None:
        self.dir = Path(directory)
        self.rank = rank
        self.world_size = world_size
        self.timeout_s = timeout_s
        self._seq = 0
        self.dir.mkdir(parents=True, exist_ok=True)

    def _put(self, name: str, obj: Any) -> None:
        tmp = self.dir / f".{name}.{self.rank}.tmp"
        tmp.write_bytes(pickle.dumps(obj))
        os.replace(tmp, self.dir / name)

    def _take(self, name: str) -> Any:
        path = self.dir / name
        deadline = time.monotonic() + self.timeout_s
        delay = 0.005
        while not path.exists():
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"rank {self.rank}: no '{name}' in {self.dir} after "
                    f"{self.timeout_s:.0f} s (cluster.collective_timeout_s); another rank "
                    f"failed or hangs, or is that much slower (then raise the timeout)"
                )
            time.sleep(delay)
            delay = min(delay * 2, 0.2)
        return pickle.loads(path.read_bytes())

    def bcast(self, obj: Any) -> Any:
        self._seq += 1
        name = f"{self._seq:04d}-bcast"
        if self.rank == 0:
            self._put(name, obj)
            return obj
        return self._take(name)

    def gather(self, obj: Any) -> list[Any] | None:
        self._seq += 1
        self._put(f"{self._seq:04d}-gather-{self.rank}", obj)
        if self.rank != 0:
            return None
        return [self._take(f"{self._seq:04d}-gather-{r}") for r in range(self.world_size)]

    def close(self) -> None:
        self._seq += 1
        done = f"{self._seq:04d}-done"
        self._put(f"{done}-{self.rank}", None)
        if self.rank == 0:
            for r in range(self.world_size):
                self._take(f"{done}-{r}")
            shutil.rmtree(self.dir, ignore_errors=True)


def submitit_rank() -> tuple[int, int, str] | None:
    """(global rank, number of tasks, job id) inside a submitit job, else None."""
    if "SUBMITIT_EXECUTOR" not in os.environ:
        return None
    import submitit

    env = submitit.JobEnvironment()
    return env.global_rank, env.num_tasks, str(env.job_id)


def mpi_launched() -> bool:
    """Whether an MPI launcher (mpirun, srun --mpi=pmix) started this process."""
    return mpi_world_size() > 1 or "PMIX_RANK" in os.environ


def mpi_world_size() -> int:
    """World size announced by an MPI launcher's environment (1 without one)."""
    for var in MPI_SIZE_VARS:
        if var in os.environ:
            return int(os.environ[var])
    return 1


def communicator(rendezvous_parent: Path, timeout_s: float = 600.0) -> Communicator:
    """The communicator for this process.

    Args:
        rendezvous_parent: directory on a filesystem shared by all ranks, under which
            file-based ranks meet (``.rendezvous-JOBID``).
        timeout_s: how long a file-based rank waits for the others in one collective
            (``cluster.collective_timeout_s``).
    """
    if mpi_launched():  # mpirun, or srun --mpi=pmix (also inside a submitit job)
        mpi = MPICommunicator()
        if mpi.world_size > 1:
            return mpi
    found = submitit_rank()
    if found is not None and found[1] > 1:
        rank, world, job_id = found
        return FileCommunicator(rendezvous_parent / f".rendezvous-{job_id}", rank, world, timeout_s)
    return SingleProcess()
