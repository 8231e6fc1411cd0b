"""Rank wiring: turn the launcher's environment into torch.distributed's variables.

Under submitit (local processes or Slurm tasks) the task's global rank, the
number of tasks and the first node become ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` before DeepSpeed starts.
The port is derived from the job id (every rank computes the same one without
talking); a single process gets a free port. CPU ranks use gloo
(``DS_ACCELERATOR=cpu``), GPU ranks NCCL.
"""

from __future__ import annotations

import os
import socket
import zlib
from dataclasses import dataclass

from scilm_hpc.runtime.dist import submitit_rank


@dataclass(frozen=True)
class RankEnv:
    """Who this process is in the job."""

    rank: int
    local_rank: int
    world_size: int
    master_addr: str
    master_port: int


def free_port() -> int:
    """A TCP port that was free a moment ago on this host."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_for_job(job_id: str) -> int:
    """A port in 20000-39999 that every rank of ``job_id`` derives identically."""
    return 20000 + zlib.crc32(job_id.encode()) % 20000


def rank_env() -> RankEnv:
    """The rank environment of this process (submitit, torchrun-style variables, or one rank)."""
    found = submitit_rank()
    if found is not None:
        import submitit

        env = submitit.JobEnvironment()
        # srun's launch node is the first node of the allocation: its address is the
        # master's (a dev cluster's node names need not resolve; its nodes are 127.0.0.1)
        master = (
            "127.0.0.1"
            if env.num_nodes == 1
            else os.environ.get("SLURM_LAUNCH_NODE_IPADDR", env.hostnames[0])
        )
        restart = os.environ.get("SLURM_RESTART_COUNT", "0")  # requeued: a fresh port
        return RankEnv(
            env.global_rank,
            env.local_rank,
            env.num_tasks,
            master,
            port_for_job(f"{env.job_id}-{restart}"),
        )
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return RankEnv(
            int(os.environ["RANK"]),
            int(os.environ.get("LOCAL_RANK", 0)),
            int(os.environ["WORLD_SIZE"]),
            os.environ.get("MASTER_ADDR", "127.0.0.1"),
            int(os.environ.get("MASTER_PORT", 0)) or free_port(),
        )
    return RankEnv(0, 0, 1, "127.0.0.1", free_port())


def export_rank_env(env: RankEnv, on_gpu: bool) -> None:
    """Write the variables torch.distributed / DeepSpeed read."""
    os.environ.update(
        {
            "RANK": str(env.rank),
            "LOCAL_RANK": str(env.local_rank),
            "WORLD_SIZE": str(env.world_size),
            "MASTER_ADDR": env.master_addr,
            "MASTER_PORT": str(env.master_port),
        }
    )
    if not on_gpu:
        os.environ["DS_ACCELERATOR"] = "cpu"
