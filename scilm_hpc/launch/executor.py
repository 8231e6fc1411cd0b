"""Hand a job object to where it runs: this process, local subprocesses, or Slurm.

``cluster.backend``: ``none`` calls the job here; ``local`` runs
``cluster.nodes * cluster.tasks_per_node`` processes through submitit's local
executor and waits; ``slurm`` submits through submitit's Slurm executor, records
the job id in ``RUN_DIR/jobs.json`` and returns (or, with ``wait``, follows the job,
streaming rank 0's log). Logs go under ``RUN_DIR/submitit/``. A user mistake found
inside a rank comes back as the same UserError (message intact), not a traceback.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scilm_hpc.errors import (
    STORAGE_ERRNOS,
    StorageError,
    UserError,
    free_space_note,
    storage_error,
)
from scilm_hpc.runtime.watchdog import hang_since
from scilm_hpc.schema import JobConfig


@dataclass
class UserFailure:
    """A UserError caught inside a rank, returned as a value."""

    problems: list[str]


@dataclass
class StorageFailure:
    """A StorageError (or a disk-full / permission OSError) caught inside a rank."""

    message: str


class Guarded:
    """Wraps a job so that a UserError or a storage error in any rank is returned, not
    raised (and reaches the submitter as the same error, not a remote traceback).

    It deliberately has no ``checkpoint`` method: preemption and time limits are
    handled inside the job (``runtime.preemption``: every rank stops at the same
    step, saves, and rank 0 requeues), not by submitit's rank-0-only hook.
    """

    def __init__(self, job: Callable[[], Any]) -> None:
        self.job = job

    def __call__(self) -> Any:
        try:
            return self.job()
        except UserError as exc:
            return UserFailure(exc.problems)
        except StorageError as exc:
            return StorageFailure(str(exc))
        except OSError as exc:
            if exc.errno not in STORAGE_ERRNOS:
                raise
            return StorageFailure(str(storage_error(exc)))


def submitit_folder(job: JobConfig) -> Path:
    """Where submitit writes scripts, pickles and per-rank logs."""
    return Path(job.run.dir).absolute() / "submitit"


def _results(submitted: Any, run_dir: Path | None = None, since: float = 0.0) -> Any:
    if run_dir is not None:
        submitted.wait()
        # ranks ended by their watchdogs (runtime.watchdog) leave no result: say why now
        # rather than after submitit's wait for a result file that will not come
        hang = None if submitted.paths.result_pickle.exists() else hang_since(run_dir, since)
        if hang is not None:
            raise hang
    try:
        results = submitted.results()
    except Exception as exc:
        # the rank could not even write its result into RUN_DIR/submitit
        if "[Errno 28] No space left on device" not in str(exc):
            raise
        folder = submitted.paths.result_pickle.parent
        raise StorageError(
            f"No space left on device (ENOSPC) writing {folder}{free_space_note(folder)}"
        ) from None
    for result in results:
        if isinstance(result, UserFailure):
            raise UserError(result.problems)
        if isinstance(result, StorageFailure):
            raise StorageError(result.message)
    return results[0]


def follow(submitted: Any, poll_s: float = 2.0, grace_s: float = 30.0) -> None:
    """Stream rank 0's stdout until the job has written its result.

    submitit cannot see a job's state without Slurm accounting, so a job that ends
    without a result (cancelled, killed) is detected through ``scontrol``.

    Raises:
        RuntimeError: if Slurm says the job ended but no result appeared within ``grace_s``.
    """
    from scilm_hpc.runtime.slurm import slurm_state
    from scilm_hpc.runtime.status import FINISHED

    shown = 0
    ended_at: float | None = None
    while not submitted.paths.result_pickle.exists():
        path = submitted.paths.stdout
        if path.is_file():
            text = path.read_text(errors="replace")
            sys.stdout.write(text[shown:])
            sys.stdout.flush()
            shown = len(text)
        state = slurm_state(str(submitted.job_id))["state"]
        if state in FINISHED:
            ended_at = ended_at or time.monotonic()
            if time.monotonic() - ended_at > grace_s:
                raise RuntimeError(
                    f"Slurm job {submitted.job_id} ended ({state}) without a "
                    f"result; see {submitted.paths.stderr}"
                )
        time.sleep(poll_s)


def submitit_executor(job: JobConfig) -> Any:
    """The submitit executor for ``cluster.backend`` ``local`` or ``slurm``."""
    import submitit

    from scilm_hpc.launch.sbatch import slurm_executor

    if job.cluster.backend == "local":
        executor = submitit.LocalExecutor(folder=str(submitit_folder(job)))
        executor.update_parameters(
            tasks_per_node=job.cluster.world_size(), timeout_min=job.cluster.time_min
        )
        return executor
    return slurm_executor(job, submitit_folder(job))


def run_job(job_callable: Callable[[], Any], job: JobConfig, wait: bool = False) -> Any:
    """Run ``job_callable`` on ``job.cluster``.

    Returns:
        Rank 0's result (``none``, ``local``, ``slurm`` with ``wait``), or the job id and
        run directory of a Slurm submission.

    Raises:
        UserError: if any rank raised one.
    """
    from scilm_hpc.runtime.slurm import record_job

    backend = job.cluster.backend
    if backend == "none":
        return job_callable()
    ranks = job.cluster.world_size()
    run_dir = Path(job.run.dir)
    if backend == "local" and job.job == "evaluate" and ranks > 1:
        from scilm_hpc.launch.mpi import run_with_mpirun

        return run_with_mpirun(job, ranks)
    since = time.time()
    submitted = submitit_executor(job).submit(Guarded(job_callable))
    record_job(run_dir, submitted.job_id, job.job, backend)
    if backend == "local":
        print(
            f"local job {submitted.job_id}: {ranks} process(es), logs in {submitit_folder(job)}",
            flush=True,
        )
        return _results(submitted, run_dir, since)
    print(
        f"submitted Slurm job {submitted.job_id}: {job.cluster.nodes} node(s) x "
        f"{job.cluster.tasks_per_node} task(s); run directory {run_dir}",
        flush=True,
    )
    if not wait:
        return {"job_id": submitted.job_id, "run_dir": str(run_dir)}
    follow(submitted)
    return _results(submitted, run_dir, since)


def run_jobs(
    callables: list[Callable[[], Any]], jobs: list[JobConfig], parent: JobConfig, wait: bool = False
) -> list[Any]:
    """Run sweep members: one after another here, or together through submitit
    (a Slurm job array; local processes side by side). Logs go under the parent run.

    Returns:
        Each member's result, or (Slurm without ``wait``) each member's job id and run dir.
    """
    from scilm_hpc.runtime.slurm import record_job

    backend = parent.cluster.backend
    if backend == "none":
        return [fn() for fn in callables]
    executor = submitit_executor(parent)
    with executor.batch():
        submitted = [executor.submit(Guarded(fn)) for fn in callables]
    for sub, job in zip(submitted, jobs, strict=True):
        record_job(Path(job.run.dir), str(sub.job_id), job.job, backend)
    print(
        f"submitted {len(submitted)} sweep member(s): {submitted[0].job_id} .. "
        f"{submitted[-1].job_id}; run directories under {parent.run.dir}",
        flush=True,
    )
    if backend == "slurm" and not wait:
        return [
            {"job_id": s.job_id, "run_dir": j.run.dir} for s, j in zip(submitted, jobs, strict=True)
        ]
    results = []
    for sub in submitted:
        if backend == "slurm":
            follow(sub)
        results.append(_results(sub))
    return results
