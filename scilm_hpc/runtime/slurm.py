"""What a run knows about Slurm: its job records, their state, and the values safe to submit.

``RUN_DIR/jobs.json`` lists every job submitted for a run (``record_job``);
``slurm_state`` asks ``scontrol`` about one (no accounting database needed). Both serve
``scilm status``, the run lock and the submitter's wait. Values that reach the sbatch
script are checked in ``config.validate`` (``unsafe_values``), so a job name, partition
or extra option cannot inject shell lines; the script itself is built in
``launch.sbatch``.
"""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path
from typing import Any

from scilm_hpc.rundir import read_json, write_json_atomic
from scilm_hpc.schema import JobConfig

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
