"""One run per run directory: refused before submission, locked while running.

Two checks, because neither alone is enough on a cluster. Before anything is
submitted (and before ``config.yaml`` is rewritten) ``refuse_if_busy`` refuses a
directory whose lock is held now, or whose recorded Slurm finetune / compress /
evaluate job is still queued or running (a PENDING job holds no lock yet). When
the job runs, rank 0 takes ``RUN_DIR/.lock`` (``take_run_lock``; evaluate, whose ranks
talk through a ``runtime.dist`` communicator: ``take_run_lock_over``), so a second
job that got past the first check (submitted from another login node, or
started by hand) is refused on its first rank before it writes anything.
"""

from __future__ import annotations

import os
from pathlib import Path

from scilm_hpc.errors import UserError
from scilm_hpc.rundir import RunLock, describe_owner, live_owner
from scilm_hpc.runtime.dist import Communicator

LOCKED_JOBS = ("finetune", "compress", "evaluate")


def refuse_if_busy(run_dir: Path, command: str) -> None:
    """Refuse ``command`` on ``run_dir`` if another run owns it.

    Raises:
        UserError: naming the live lock holder or the queued / running Slurm job.
    """
    from scilm_hpc.runtime.slurm import recorded_jobs, slurm_state
    from scilm_hpc.runtime.status import FINISHED

    if command not in LOCKED_JOBS:
        return
    owner = live_owner(run_dir)
    if owner is not None:
        raise UserError(
            f"run.dir: '{run_dir}' is in use by {describe_owner(owner)}; wait for it, "
            f"stop it, or use another run.dir"
        )
    for record in reversed(recorded_jobs(run_dir)):
        if record.get("backend") != "slurm" or record.get("kind") not in LOCKED_JOBS:
            continue
        state = slurm_state(str(record["job_id"]))["state"]
        if state not in FINISHED and state != "UNKNOWN":
            raise UserError(
                f"run.dir: '{run_dir}' belongs to Slurm job {record['job_id']} "
                f"({record['kind']}, {state}); wait for it, `scilm cancel {run_dir}`, "
                f"or use another run.dir"
            )


def take_run_lock(run_dir: str | Path, command: str, rank: int) -> RunLock | None:
    """Rank 0 takes the run directory's lock; every rank learns whether it was refused.

    Call after the process group is up (the refusal is broadcast), before the job
    writes anything. Returns the lock on rank 0 (release it at the end), else None.

    Raises:
        UserError: on every rank, if another live process holds the lock.
    """
    import torch.distributed as dist

    lock, refusal = None, [None]
    if rank == 0:
        lock = RunLock(run_dir, command, os.environ.get("SLURM_JOB_ID"))
        try:
            lock.acquire()
        except UserError as exc:
            refusal, lock = [exc.problems], None  # type: ignore[list-item]
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(refusal, src=0)
    if refusal[0]:
        raise UserError(refusal[0])
    return lock


def take_run_lock_over(run_dir: str | Path, command: str, comm: Communicator) -> RunLock | None:
    """``take_run_lock`` for jobs whose ranks talk through a ``runtime.dist`` communicator
    (evaluate: MPI, file rendezvous, or one process) instead of torch.distributed.

    Raises:
        UserError: on every rank, if another live process holds the lock.
    """
    lock, refusal = None, None
    if comm.rank == 0:
        lock = RunLock(run_dir, command, os.environ.get("SLURM_JOB_ID"))
        try:
            lock.acquire()
        except UserError as exc:
            refusal, lock = exc.problems, None
    refusal = comm.bcast(refusal)
    if refusal:
        raise UserError(refusal)
    return lock
