"""Preemption and time limits: every rank agrees to stop at the same step boundary.

Slurm sends USR2 ``cluster.signal_delay_s`` before the time limit (submitit's
``--signal=USR2@N``; also ``scancel --signal=USR2``) and SIGTERM on preemption, to
every task. The handler only sets a flag; the training loop all-reduces it after
each optimizer step, so all ranks see it at the same step, save a checkpoint
together and leave. Rank 0 then requeues the Slurm job (``scontrol requeue``)
while fewer than ``cluster.max_requeues`` requeues have happened; the requeued
job resumes from that checkpoint.
"""

from __future__ import annotations

import os
import signal
import subprocess
from types import FrameType


class StopFlag:
    """A flag set by USR2 / SIGTERM and agreed on by all ranks."""

    def __init__(self) -> None:
        self.signal_name: str | None = None

    def install(self) -> None:
        """Replace submitit's handlers (which act on rank 0 only) with ours."""
        for sig in (signal.SIGUSR2, signal.SIGTERM):
            signal.signal(sig, self._handler)

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        self.signal_name = signal.Signals(signum).name

    def local_flag(self) -> float:
        """1.0 if this rank has been signalled. The training loop sums it over ranks in the
        all-reduce it already does each step: a sum > 0 means every rank stops."""
        return 1.0 if self.signal_name else 0.0


def restarts() -> int:
    """How many times Slurm has requeued this job."""
    return int(os.environ.get("SLURM_RESTART_COUNT", "0"))


def requeue(max_requeues: int) -> tuple[bool, str]:
    """Requeue this Slurm job if allowed. Returns (requeued, reason)."""
    job_id = (
        os.environ.get("SLURM_ARRAY_JOB_ID")
        and f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
        or os.environ.get("SLURM_JOB_ID")
    )
    if not job_id:
        return False, "not a Slurm job: stopped after checkpointing; resume with scilm resume"
    if restarts() >= max_requeues:
        return False, f"requeued {restarts()} times already (cluster.max_requeues)"
    done = subprocess.run(
        ["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=60
    )
    if done.returncode != 0:
        return False, f"scontrol requeue {job_id} failed: {done.stderr.strip()}"
    return True, f"requeued as restart {restarts() + 1}"
