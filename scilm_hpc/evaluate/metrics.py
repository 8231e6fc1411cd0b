"""Metrics computed from per-example predictions (never from per-rank partial sums).

Each task computes its own metrics (``scilm_hpc.tasks``); this module is the one
entry point the jobs call, and re-exports the metric functions under their
historical names.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from scilm_hpc.tasks import ExampleResult, Task, get_task
from scilm_hpc.tasks.causal_lm import lm_metrics
from scilm_hpc.tasks.classification import classification_metrics
from scilm_hpc.tasks.token_classification import bio_entities, entity_metrics


def metrics_from_results(
    task: str | Task, results: Sequence[ExampleResult], labels: Sequence[str]
) -> dict[str, Any]:
    """The task's metrics from per-example results in example order (see ``inference``)."""
    metrics = get_task(task).metrics(results, labels)
    metrics["n_examples"] = len(results)
    return metrics


__all__ = [
    "bio_entities",
    "classification_metrics",
    "entity_metrics",
    "lm_metrics",
    "metrics_from_results",
]
