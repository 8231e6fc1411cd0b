"""Slurm submission through submitit: resources from ``cluster.*`` and the exact sbatch script.

``ClusterConfig`` maps onto ``submitit.SlurmExecutor.update_parameters``. The values
that reach the script were checked by ``config.validate`` (``runtime.slurm.unsafe_values``),
so a job name, partition or extra option cannot inject shell lines.
"""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path
from typing import Any

from scilm_hpc.schema import ClusterConfig, JobConfig


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
            f"uses to print the sbatch script; pin submitit or update launch/sbatch.py"
        )
    return str(make_text(command, "dry-run"))
