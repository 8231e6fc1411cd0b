"""Batched inference over shard examples: per-example results, never per-batch averages.

An example's result is ``(loss sum, counted targets, prediction, gold)``: for
classification the predicted and gold class ids, for token classification the tag
ids of the tagged (first sub-word) tokens, for causal LM only the summed token loss.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from scilm_hpc.data.dataset import ShardDataset
from scilm_hpc.data.encode import IGNORE_INDEX
from scilm_hpc.data.sampler import collate

ExampleResult = tuple[float, int, Any, Any]


def example_results(
    logits: torch.Tensor, batch: dict[str, torch.Tensor], task: str
) -> list[ExampleResult]:
    """Per-example results of one batch's logits."""
    labels = batch["labels"]
    if task == "classification":
        losses = F.cross_entropy(logits.float(), labels, reduction="none")
        preds = logits.argmax(-1)
        return [(losses[i].item(), 1, int(preds[i]), int(labels[i])) for i in range(len(labels))]
    if task == "causal_lm":
        logits, labels = logits[:, :-1], labels[:, 1:]
    losses = F.cross_entropy(
        logits.float().transpose(1, 2), labels, reduction="none", ignore_index=IGNORE_INDEX
    )
    preds = logits.argmax(-1)
    out = []
    for i in range(len(labels)):
        keep = labels[i] != IGNORE_INDEX
        pred = preds[i][keep].tolist() if task == "token_classification" else None
        gold = labels[i][keep].tolist() if task == "token_classification" else None
        out.append((losses[i][keep].sum().item(), int(keep.sum()), pred, gold))
    return out


@torch.no_grad()
def predict(
    model: Any,
    dataset: ShardDataset,
    indices: Sequence[int],
    task: str,
    pad_id: int,
    batch_size: int,
) -> list[tuple[int, ExampleResult]]:
    """(example index, result) for ``indices``, batched by similar length."""
    order = np.asarray(indices, dtype=np.int64)
    if order.size == 0:
        return []
    lengths = dataset.lengths()[order]
    order = order[np.argsort(lengths, kind="stable")]
    out: list[tuple[int, ExampleResult]] = []
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        batch = collate([dataset[int(i)] for i in chunk], pad_id, task)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        out += list(zip(chunk.tolist(), example_results(logits, batch, task), strict=True))
    return out


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
