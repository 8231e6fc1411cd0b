"""Batched inference over shard examples: per-example results, never per-batch averages.

One routine (``run_examples``) sorts a rank's examples by length, batches, collates
(the task's own collation), forwards and turns the logits into per-example results
(the task's ``example_results``: loss sum, counted targets, prediction, gold). The
evaluate job, the finetune job's dev evaluation and the compression report all use
it. ``evaluate_split`` runs it on the training ranks, keeping their forward passes
in step (ZeRO-3 gathers parameters collectively) and gathering every example's
result on rank 0 before any metric is computed, so metrics do not depend on the
number of ranks.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from scilm_hpc.data.dataset import ShardDataset
from scilm_hpc.evaluate.metrics import metrics_from_results
from scilm_hpc.tasks import ExampleResult, Task, get_task


@torch.no_grad()
def run_examples(
    model: Any,
    dataset: ShardDataset,
    indices: Sequence[int],
    task: str | Task,
    pad_id: int,
    batch_size: int,
    n_batches: int | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> list[tuple[int, ExampleResult]]:
    """(example index, result) for ``indices``, batched by similar length.

    Args:
        n_batches: forward passes to run in all; past the real batches, a discarded
            one-example batch keeps this rank's collectives in step with the others
            (None: just the real batches).
    """
    task = get_task(task, dataset.manifest)
    device = getattr(model, "device", torch.device("cpu"))  # DeepSpeed engine or HF model
    order = np.asarray(indices, dtype=np.int64)
    if order.size:
        order = order[np.argsort(dataset.lengths()[order], kind="stable")]
    real = math.ceil(order.size / batch_size)
    out: list[tuple[int, ExampleResult]] = []
    for b in range(real if n_batches is None else n_batches):
        chunk = order[b * batch_size : (b + 1) * batch_size] if b < real else np.array([0])
        batch = task.collate([dataset[int(i)] for i in chunk], pad_id)
        inputs = task.forward_inputs(batch)
        inputs = task.model_inputs({k: v.to(device) for k, v in inputs.items()}, model)
        logits = model(**inputs).logits.cpu()
        if b < real:
            out += list(zip(chunk.tolist(), task.example_results(logits, batch), strict=True))
            if on_batch is not None:
                on_batch(len(chunk))
    return out


def predict(
    model: Any,
    dataset: ShardDataset,
    indices: Sequence[int],
    task: str | Task,
    pad_id: int,
    batch_size: int,
    on_batch: Callable[[int], None] | None = None,
) -> list[tuple[int, ExampleResult]]:
    """(example index, result) for ``indices`` (one rank, no collectives);
    ``on_batch(examples)`` after each batch (progress)."""
    return run_examples(model, dataset, indices, task, pad_id, batch_size, on_batch=on_batch)


def dataset_metrics(
    model: Any,
    dataset: ShardDataset,
    task: str | Task,
    pad_id: int,
    batch_size: int,
    examples: int,
) -> dict[str, Any]:
    """Scalar metrics of ``model`` on ``dataset`` (its first ``examples``; 0 = all)."""
    count = len(dataset) if examples <= 0 else min(examples, len(dataset))
    results = predict(model.eval(), dataset, range(count), task, pad_id, batch_size)
    metrics = metrics_from_results(task, [r for _, r in results], dataset.label_names)
    return {k: v for k, v in metrics.items() if isinstance(v, int | float)}


def rank_slice(n: int, rank: int, world: int) -> range:
    """Contiguous, balanced slice of ``range(n)`` for ``rank``."""
    return range(rank * n // world, (rank + 1) * n // world)


def evaluate_split(
    model: Any,
    dataset: ShardDataset,
    task: str | Task,
    labels: list[str],
    pad_id: int,
    batch_size: int,
    rank: int,
    world: int,
) -> dict[str, Any] | None:
    """Metrics of ``model`` on ``dataset`` over the training ranks; the dict on rank 0,
    None on the others."""
    import torch.distributed as dist

    mine = rank_slice(len(dataset), rank, world)
    n_batches = math.ceil(math.ceil(len(dataset) / world) / batch_size)
    results = run_examples(model, dataset, mine, task, pad_id, batch_size, n_batches)
    gathered: list[Any] = [None] * world if world > 1 else [results]
    if world > 1:
        dist.all_gather_object(gathered, results)
    if rank != 0:
        return None
    merged = sorted((item for part in gathered for item in part), key=lambda x: x[0])
    assert len(merged) == len(dataset), (len(merged), len(dataset))
    return metrics_from_results(task, [r[1] for r in merged], labels)


def token_balanced_ranges(lengths: np.ndarray, world: int) -> list[range]:
    """Contiguous example ranges, one per rank, with about equal token counts.

    Contiguous ranges keep each rank on a few neighbouring shards; balancing tokens
    (not examples) balances the work. Deterministic for given lengths and world size.
    """
    cumulative = np.cumsum(lengths, dtype=np.int64)
    total = int(cumulative[-1]) if len(cumulative) else 0
    bounds = [0]
    for r in range(1, world):
        # the example that reaches rank r's share of tokens ends rank r-1's range
        bounds.append(int(np.searchsorted(cumulative, total * r / world, side="left")) + 1)
    bounds.append(len(lengths))
    bounds = [min(max(b, bounds[i - 1] if i else 0), len(lengths)) for i, b in enumerate(bounds)]
    return [range(bounds[r], bounds[r + 1]) for r in range(world)]
