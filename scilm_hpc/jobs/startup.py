"""What every training-shaped rank does first and last (finetune, compress recovery).

First the USR2 / SIGTERM handlers (a signal during start-up — imports, DeepSpeed's
JIT build, the process group — must stop the run at its first step, not kill it
through submitit), then the rank's environment, the GPU or the CPU thread count,
DeepSpeed and the process group (its collectives time out after
``cluster.collective_timeout_s``), the run directory's lock (one run per directory)
and the rank's watchdog (``runtime.watchdog``: heartbeat, hang detection, lost peers).
On the way out: a failed run is recorded in the run directory's state, the watchdog stopped, the
lock released and the process group destroyed.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch

from scilm_hpc.runtime.env import RankEnv, export_rank_env, rank_env
from scilm_hpc.runtime.hardware import cpu_threads, start_line, with_hardware_defaults
from scilm_hpc.runtime.ownership import take_run_lock
from scilm_hpc.runtime.preemption import StopFlag
from scilm_hpc.runtime.status import write_run_state
from scilm_hpc.runtime.watchdog import Watchdog, install
from scilm_hpc.schema import JobConfig


@dataclass
class RankSession:
    """What a started rank knows: its stop flag, its place, its device, and the job with
    the hardware's defaults filled in (threads, ZeRO stage, precision)."""

    stop: StopFlag
    env: RankEnv
    on_gpu: bool
    job: JobConfig


@contextmanager
def rank_session(job: JobConfig, use_gpu: bool = True) -> Iterator[RankSession]:
    """Start this rank (see module docstring); record a failure and tear down at the end.

    Args:
        job: the job's config.
        use_gpu: whether the job may run on a GPU (one is used only where CUDA is
            available and ``cluster.gpus_per_node`` > 0).
    """
    stop = StopFlag()
    stop.install()
    env = rank_env()
    on_gpu = use_gpu and torch.cuda.is_available() and job.cluster.gpus_per_node > 0
    job = with_hardware_defaults(job, on_gpu)
    export_rank_env(env, on_gpu)
    if on_gpu:
        # before the process group: NCCL binds each rank to the current device
        torch.cuda.set_device(env.local_rank)
    threads = None if on_gpu else cpu_threads(job)
    if threads:
        # one rank per task: use the task's CPUs, not every core of the node
        torch.set_num_threads(threads)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import deepspeed

    deepspeed.init_distributed(
        dist_backend="nccl" if on_gpu else "gloo",
        verbose=False,
        timeout=timedelta(seconds=job.cluster.collective_timeout_s),
    )
    if env.rank == 0:
        print(start_line(job, on_gpu), flush=True)
    # one run per directory: a refused second run leaves before it writes anything
    # (no "failed" state over the live run's)
    lock = take_run_lock(job.run.dir, job.job, env.rank)
    watchdog = Watchdog(
        Path(job.run.dir),
        env.rank,
        env.world_size,
        job.train.hang_timeout_s,
        job.cluster.collective_timeout_s,
        job.cluster.max_requeues,
    )
    install(watchdog)
    try:
        yield RankSession(stop, env, on_gpu, job)
    except Exception as exc:
        # a peer hung or was lost: end this rank like a hang (exit, requeue); otherwise
        # mark it failed for the others, whose collectives break when it leaves
        watchdog.on_exception(exc)
        if env.rank == 0:
            write_run_state(
                Path(job.run.dir),
                "failed",
                reason=str(exc).splitlines()[0] if str(exc) else type(exc).__name__,
            )
        raise
    finally:
        watchdog.stop()
        install(None)
        if lock is not None:
            lock.release()
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
