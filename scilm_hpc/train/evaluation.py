"""Which dev metric value is better (the evaluation itself is ``evaluate.inference``)."""

from __future__ import annotations

import math

from scilm_hpc.schema import JobConfig
from scilm_hpc.tasks.seq2seq import DEV_ROUGE

LOWER_IS_BETTER = ("loss", "perplexity", "mae", "rmse")


def is_better(value: float | None, best: float | None, metric: str) -> bool:
    """Whether ``value`` of ``metric`` improves on ``best`` (None: nothing yet)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return False
    if best is None:
        return True
    return value < best if metric.endswith(LOWER_IS_BETTER) else value > best


def dev_generation(job: JobConfig) -> int | None:
    """How many dev examples dev evaluation generates for (0: all), or None: it does not
    generate. It does for seq2seq with ``train.dev_generate`` true, or left unset (auto)
    and ``train.best_metric`` a ROUGE metric."""
    if job.task != "seq2seq":
        return None
    generate = job.train.dev_generate
    if generate is None:
        generate = job.train.best_metric in DEV_ROUGE
    return job.train.dev_generate_examples if generate else None
