"""The finetune job: one ``train.loop.Trainer`` per rank, started by ``jobs.startup``."""

from __future__ import annotations

from typing import Any

from scilm_hpc.jobs.startup import rank_session
from scilm_hpc.schema import JobConfig
from scilm_hpc.train.loop import Trainer


class FinetuneJob:
    """Submitit-callable fine-tuning job (one call per rank)."""

    def __init__(self, job: JobConfig) -> None:
        self.job = job

    def __call__(self) -> dict[str, Any]:
        with rank_session(self.job) as rank:
            return Trainer(
                rank.job, rank.env.rank, rank.env.world_size, rank.on_gpu, rank.stop
            ).run()
