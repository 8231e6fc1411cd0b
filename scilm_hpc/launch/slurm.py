"""Slurm through submitit: resources from ``cluster.*``, the exact sbatch script, job records.

``ClusterConfig`` maps onto ``submitit.SlurmExecutor.update_parameters``. Values that
reach the sbatch script are checked in ``config.validate`` (``unsafe_values``), so a
job name, partition or extra option cannot inject shell lines.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from scilm_hpc.rundir import read_json, write_json_atomic
from scilm_hpc.schema import ClusterConfig, JobConfig

#: Characters allowed in names and values that end up on ``#SBATCH`` lines.
SAFE_VALUE = re.compile(r"^[A-Za-z0-9_.,:+@%/=\[\]\-]+$")
SAFE_CONSTRAINT = re.compile(r"^[A-Za-z0-9_.,:+@=\[\]()|&*\-]+$")
SBATCH_KEY = re.compile(r"^[a-z][a-z0-9-]*$")
JOBS_FILE = "jobs.json"


def unsafe_values(job: JobConfig) -> list[str]:
    """Problems with values that would reach the sbatch script unsafely."""
    c = job.cluster
    problems = []
    named = {
        "run.name": job.run.name,
        "cluster.partition": c.partition,
        "cluster.account": c.account,
        "cluster.qos": c.qos,
    }
    for key, value in named.items():
        if value is not None and not SAFE_VALUE.match(value):
            problems.append(
                f"{key}: {value!r} has characters Slurm names cannot have; "
                f"allowed: letters, digits and _ . , : + @ % / = [ ] -"
            )
    if c.constraint is not None and not SAFE_CONSTRAINT.match(c.constraint):
        problems.append(
            f"cluster.constraint: {c.constraint!r} is not a Slurm constraint "
            f"expression (letters, digits, & | ( ) [ ] * and _ . , : + @ = -)"
        )
    for i, item in enumerate(c.extra_sbatch):
        key, sep, value = item.lstrip("-").partition("=")
        if not SBATCH_KEY.match(key) or (sep and not SAFE_VALUE.match(value)):
            problems.append(
                f"cluster.extra_sbatch[{i}]: {item!r}; expected --option or "
                f"--option=value without spaces, quotes or shell characters"
            )
    for i, line in enumerate(c.setup):
        if any(ch in line for ch in "\n\r\x00"):
            problems.append(
                f"cluster.setup[{i}]: {line!r} holds a line break; give one command per list item"
            )
    return problems


def slurm_parameters(cluster: ClusterConfig, name: str) -> dict[str, Any]:
    """``SlurmExecutor.update_parameters`` arguments for ``cluster``."""
    params: dict[str, Any] = {
        "job_name": name,
        "nodes": cluster.nodes,
        "ntasks_per_node": cluster.tasks_per_node,
        "cpus_per_task": cluster.cpus_per_task or 1,
        "time": cluster.time_min,
        "signal_delay_s": cluster.signal_delay_s,
        "setup": list(cluster.setup),
    }
    if cluster.gpus_per_node:
        params["gpus_per_node"] = cluster.gpus_per_node
    if cluster.mem_gb is not None:
        params["mem"] = f"{int(cluster.mem_gb * 1024)}M"
    for key in ("partition", "account", "qos", "constraint"):
        if getattr(cluster, key) is not None:
            params[key] = getattr(cluster, key)
    extra: dict[str, Any] = {}
    for item in cluster.extra_sbatch:
        key, _, value = item.lstrip("-").partition("=")
        extra[key] = value or True  # a bare flag such as --exclusive
    if extra:
        params["additional_parameters"] = extra
    return params


def apply_slurm_conf(cluster: ClusterConfig) -> None:
    """Point Slurm's client commands at ``cluster.slurm_conf`` (the dev cluster's config)."""
    if cluster.slurm_conf:
        os.environ["SLURM_CONF"] = cluster.slurm_conf


def slurm_executor(job: JobConfig, folder: Path) -> Any:
    """A configured ``submitit.SlurmExecutor`` writing under ``folder``."""
    import submitit

    apply_slurm_conf(job.cluster)
    executor = submitit.SlurmExecutor(
        folder=str(folder),
        python=shlex.quote(sys.executable),
    )
    executor.update_parameters(**slurm_parameters(job.cluster, job.run.name))
    if job.job == "evaluate":  # evaluation ranks talk through MPI (PMIx)
        executor.update_parameters(srun_args=["--mpi=pmix"])
    return executor


def sbatch_script(job: JobConfig, folder: Path, array: int = 0) -> str:
    """The exact sbatch script submitit would submit for ``job`` (as an array of ``array``).

    submitit has no public call that returns the script without submitting it; this is
    the one place that uses its private ``_make_submission_file_text``, and it fails
    with a clear message (and the golden-file tests fail) if submitit changes it.
    """
    executor = slurm_executor(job, folder)
    if array:
        executor.parameters["map_count"] = array
    make_text = getattr(executor, "_make_submission_file_text", None)
    command = getattr(executor, "_submitit_command_str", None)
    if make_text is None or command is None:
        import submitit

        raise RuntimeError(
            f"submitit {submitit.__version__} no longer has the private calls --dry-run "
            f"uses to print the sbatch script; pin submitit or update launch/slurm.py"
        )
    return str(make_text(command, "dry-run"))


def record_job(run_dir: Path, job_id: str, kind: str, backend: str) -> None:
    """Append a submitted job to ``RUN_DIR/jobs.json`` (read by ``scilm status``)."""
    path = run_dir / JOBS_FILE
    jobs = recorded_jobs(run_dir)
    jobs.append(
        {
            "job_id": job_id,
            "kind": kind,
            "backend": backend,
            "submitted": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
    )
    write_json_atomic(path, jobs)


def recorded_jobs(run_dir: Path) -> list[dict[str, Any]]:
    """Jobs submitted for a run directory, oldest first."""
    jobs = read_json(run_dir / JOBS_FILE, [])
    return [j for j in jobs if isinstance(j, dict)] if isinstance(jobs, list) else []


def slurm_state(job_id: str) -> dict[str, str]:
    """State, restart count and reason of a Slurm job from ``scontrol`` (no accounting needed).

    Returns ``{"state": "UNKNOWN"}`` when Slurm no longer knows the job.
    """
    try:
        out = subprocess.run(
            ["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired):
        return {"state": "UNKNOWN"}
    if out.returncode != 0 or "JobState=" not in out.stdout:
        return {"state": "UNKNOWN"}
    fields = dict(item.split("=", 1) for item in out.stdout.split() if "=" in item)
    return {
        "state": fields.get("JobState", "UNKNOWN"),
        "reason": fields.get("Reason", ""),
        "restarts": fields.get("Restarts", "0"),
        "nodes": fields.get("NodeList", ""),
    }
