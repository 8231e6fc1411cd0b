"""Hand a job object to where it runs: this process or local subprocesses (submitit).

``cluster.backend``: ``none`` calls the job here; ``local`` runs
``cluster.nodes * cluster.tasks_per_node`` processes through submitit's local
executor, logs under ``RUN_DIR/submitit/``. A user mistake found inside a rank
comes back as the same UserError (message intact), not as a traceback.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scilm_hpc.errors import UserError
from scilm_hpc.schema import JobConfig


@dataclass
class UserFailure:
    """A UserError caught inside a rank, returned as a value."""

    problems: list[str]


class Guarded:
    """Wraps a job so that a UserError in any rank is returned, not raised."""

    def __init__(self, job: Callable[[], Any]) -> None:
        self.job = job

    def __call__(self) -> Any:
        try:
            return self.job()
        except UserError as exc:
            return UserFailure(exc.problems)


def submitit_folder(job: JobConfig) -> Path:
    """Where submitit writes scripts, pickles and per-rank logs."""
    return Path(job.run.dir) / "submitit"


def run_job(job_callable: Callable[[], Any], job: JobConfig) -> Any:
    """Run ``job_callable`` on ``job.cluster`` and return rank 0's result.

    Raises:
        UserError: if any rank raised one, or the backend is not available.
    """
    backend = job.cluster.backend
    if backend == "none":
        return job_callable()
    if backend == "local":
        import submitit

        executor = submitit.LocalExecutor(folder=str(submitit_folder(job)))
        executor.update_parameters(
            tasks_per_node=job.cluster.nodes * job.cluster.tasks_per_node,
            timeout_min=job.cluster.time_min,
        )
        submitted = executor.submit(Guarded(job_callable))
        print(
            f"local job {submitted.job_id}: {job.cluster.nodes * job.cluster.tasks_per_node} "
            f"process(es), logs in {submitit_folder(job)}",
            flush=True,
        )
        results = submitted.results()
        for result in results:
            if isinstance(result, UserFailure):
                raise UserError(result.problems)
        return results[0]
    raise UserError(
        f"cluster.backend: '{backend}' is not available in scilm "
        f"{__import__('scilm_hpc').__version__}; use cluster=local or cluster=none"
    )
