"""Evaluation of the model under training on a split, sharded over the training ranks.

Each rank takes a contiguous slice of the examples; every rank runs the same
number of forward passes (ZeRO-3 gathers parameters collectively, so a rank
with fewer examples runs a discarded extra batch); per-example results are
gathered on rank 0 before any metric is computed, so the metrics do not depend
on the number of ranks.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from scilm_hpc.data.dataset import ShardDataset
from scilm_hpc.data.sampler import collate
from scilm_hpc.evaluate.inference import example_results
from scilm_hpc.evaluate.metrics import metrics_from_results

LOWER_IS_BETTER = ("loss", "perplexity")


def is_better(value: float | None, best: float | None, metric: str) -> bool:
    """Whether ``value`` of ``metric`` improves on ``best`` (None: nothing yet)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return False
    if best is None:
        return True
    return value < best if metric.endswith(LOWER_IS_BETTER) else value > best


def rank_slice(n: int, rank: int, world: int) -> range:
    """Contiguous, balanced slice of ``range(n)`` for ``rank``."""
    return range(rank * n // world, (rank + 1) * n // world)


@torch.no_grad()
def evaluate_split(
    model: Any,
    dataset: ShardDataset,
    task: str,
    labels: list[str],
    pad_id: int,
    batch_size: int,
    rank: int,
    world: int,
) -> dict[str, Any] | None:
    """Metrics of ``model`` on ``dataset``; the dict on rank 0, None on the others."""
    import torch.distributed as dist

    device = getattr(model, "device", torch.device("cpu"))  # DeepSpeed engine or HF model
    mine = np.array(rank_slice(len(dataset), rank, world))
    lengths = dataset.lengths()[mine] if len(mine) else np.zeros(0)
    mine = mine[np.argsort(lengths, kind="stable")]  # similar lengths batch together
    n_batches = math.ceil(math.ceil(len(dataset) / world) / batch_size)
    results: list[tuple[int, tuple[float, int, Any, Any]]] = []
    for b in range(n_batches):
        chunk = mine[b * batch_size : (b + 1) * batch_size]
        real = len(chunk) > 0
        if not real:  # keep the collective forward passes in step across ranks
            chunk = np.array([0])
        batch = collate([dataset[int(i)] for i in chunk], pad_id, task)
        logits = model(
            input_ids=batch["input_ids"].to(device),
            attention_mask=batch["attention_mask"].to(device),
        ).logits.cpu()
        if real:
            results += list(zip(chunk.tolist(), example_results(logits, batch, task), strict=True))
    gathered: list[Any] = [None] * world if world > 1 else [results]
    if world > 1:
        dist.all_gather_object(gathered, results)
    if rank != 0:
        return None
    merged = sorted((item for part in gathered for item in part), key=lambda x: x[0])
    assert len(merged) == len(dataset), (len(merged), len(dataset))
    return metrics_from_results(task, [r[1] for r in merged], labels)
