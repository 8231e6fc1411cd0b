"""What one rank runs on, and the ``auto`` defaults resolved against it.

A rank's CPU threads (``cluster.cpus_per_task``, or this machine's physical cores),
whether its hardware multiplies bf16 natively, and so which precision
``train.precision=auto`` means here. Resolved on the rank itself: the submitting host
may be another machine. (``zero.stage`` auto depends on the world size only and is
resolved with the config, ``ZeroConfig.stage_for``.)
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch

from scilm_hpc.schema import JobConfig


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices natively (AVX-512 BF16 or AMX)."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def gpu_has_native_bf16() -> bool:
    """Whether the current CUDA device computes in bf16 natively (Ampere and later)."""
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)


def usable_cores() -> int | None:
    """Physical cores among the CPUs this process may run on (its affinity mask, e.g. a
    Slurm allocation); None where Linux's topology files cannot tell."""
    if not hasattr(os, "sched_getaffinity"):
        return None
    cores = set()
    for cpu in os.sched_getaffinity(0):
        topology = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            package = (topology / "physical_package_id").read_text().strip()
            cores.add((package, (topology / "core_id").read_text().strip()))
        except OSError:
            return len(os.sched_getaffinity(0))
    return len(cores) or None


def threads_for(
    backend: str,
    cpus_per_task: int | None,
    ranks_here: int,
    cores: int | None,
    omp_num_threads_set: bool,
) -> int | None:
    """Intra-op threads of one CPU rank (pure; ``cpu_threads`` feeds it this machine).

    Args:
        backend: ``cluster.backend``.
        cpus_per_task: ``cluster.cpus_per_task``; None is auto.
        ranks_here: ranks sharing this machine (``cluster.tasks_per_node``; 1 for ``none``).
        cores: usable physical cores (``usable_cores``).
        omp_num_threads_set: whether the user set ``OMP_NUM_THREADS``.

    Returns:
        The thread count; None to leave torch's setting (the user's ``OMP_NUM_THREADS``,
        or cores unknown).
    """
    if cpus_per_task is not None:
        return max(1, cpus_per_task)
    if backend == "slurm":
        return 1  # what the scheduler allocated (sbatch asks for 1 CPU when auto)
    if omp_num_threads_set or cores is None:
        return None
    return max(1, cores // max(1, ranks_here))


def cpu_threads(job: JobConfig) -> int | None:
    """Intra-op threads of one CPU rank: ``cluster.cpus_per_task`` where set; auto: every
    physical core this process may run on, shared among the local ranks (torch's default
    counts the whole machine's cores, affinity mask or not), unless ``OMP_NUM_THREADS``
    says otherwise; 1 under Slurm. None: leave torch's setting."""
    c = job.cluster
    return threads_for(
        c.backend,
        c.cpus_per_task,
        1 if c.backend == "none" else c.tasks_per_node,
        usable_cores(),
        "OMP_NUM_THREADS" in os.environ,
    )


def precision_for(requested: str, native_bf16: bool) -> str:
    """The precision in effect: the one asked for, or for ``auto`` bf16 where the
    rank's hardware (its GPU, else its CPU) multiplies bf16 natively, else fp32
    (emulated bf16 on an AVX2-only CPU measured ten times slower than fp32)."""
    if requested != "auto":
        return requested
    return "bf16" if native_bf16 else "fp32"


def with_hardware_defaults(job: JobConfig, on_gpu: bool) -> JobConfig:
    """``job`` with ``train.precision`` auto resolved for this rank's hardware."""
    native = gpu_has_native_bf16() if on_gpu else cpu_has_native_bf16()
    precision = precision_for(job.train.precision, native)
    return dataclasses.replace(job, train=dataclasses.replace(job.train, precision=precision))


def start_line(job: JobConfig, on_gpu: bool) -> str:
    """The one line rank 0 prints at start: what runs, with the defaults resolved."""
    device = f"GPU ({torch.cuda.get_device_name()})" if on_gpu else "CPU"
    return (
        f"{device}: {torch.get_num_threads()} threads per rank, "
        f"zero stage {job.zero.stage}, precision {job.train.precision}"
    )
