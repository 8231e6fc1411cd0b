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
import time
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


#: ``scontrol requeue``'s error for a job Slurm has requeued already (it is pending again).
ALREADY_REQUEUED = "Job is pending execution"


def restarts() -> int:
    """How many times Slurm has requeued this job."""
    return int(os.environ.get("SLURM_RESTART_COUNT", "0"))


def requeue(
    max_requeues: int, attempts: int = 4, first_delay_s: float = 2.0, timeout_s: float = 60.0
) -> tuple[bool, str]:
    """Requeue this Slurm job if allowed. Returns (requeued, reason).

    ``scontrol requeue`` is tried up to ``attempts`` times, waiting ``first_delay_s``,
    then twice as long each time (a busy or restarting slurmctld answers with an error
    or not at all). A failure, including no ``scontrol`` on the PATH, is returned as
    the reason, never raised: the job has checkpointed and can be resumed by hand.
    """
    job_id = (
        os.environ.get("SLURM_ARRAY_JOB_ID")
        and f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
        or os.environ.get("SLURM_JOB_ID")
    )
    if not job_id:
        return False, "not a Slurm job: stopped after checkpointing; resume with scilm resume"
    if restarts() >= max_requeues:
        return False, f"requeued {restarts()} times already (cluster.max_requeues)"
    delay, error = first_delay_s, ""
    for attempt in range(1, attempts + 1):
        try:
            done = subprocess.run(
                ["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=timeout_s
            )
        except FileNotFoundError:
            error = "scontrol is not on the PATH"
            break  # retrying cannot help
        except (subprocess.TimeoutExpired, OSError) as exc:
            error = str(exc)
        else:
            if done.returncode == 0:
                return True, f"requeued as restart {restarts() + 1}"
            error = done.stderr.strip() or done.stdout.strip() or f"exit status {done.returncode}"
            if ALREADY_REQUEUED in error:
                # Slurm requeued it itself (a node failure with JobRequeue=1, measured on
                # the dev cluster): the job runs again without our request
                return True, f"requeued by Slurm already, as restart {restarts() + 1}"
        if attempt < attempts:
            time.sleep(delay)
            delay *= 2
    return False, (
        f"scontrol requeue {job_id} failed after {attempt} attempt(s): {error}; "
        f"resume with scilm resume"
    )
