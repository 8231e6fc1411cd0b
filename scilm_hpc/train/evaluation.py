"""Which dev metric value is better (the evaluation itself is ``evaluate.inference``)."""

from __future__ import annotations

import math

from scilm_hpc.schema import JobConfig
from scilm_hpc.tasks import get_task

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
    generate. It does for a task with metrics of generated text (seq2seq's ROUGE) when
    ``train.dev_generate`` is true, or left unset (auto) and ``train.best_metric`` is one
    of those metrics."""
    generated = get_task(job.task).generated_dev_metrics
    if not generated:
        return None
    generate = job.train.dev_generate
    if generate is None:
        generate = job.train.best_metric in generated
    return job.train.dev_generate_examples if generate else None
