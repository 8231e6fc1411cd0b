"""Calibration statistics: the input activation norm of every prunable linear layer.

Wanda scores a weight by ``|W_ij| * ||X_j||_2``, where ``X_j`` is the ``j``-th input
feature of the layer over all (non-padding) calibration tokens. The batches are
drawn from the train split of the shards in a fixed, seeded order so that two
runs of a recipe prune the same weights. The model sees each batch as training and
scoring feed it (``Task.model_inputs``): a packed causal-LM batch with its position ids
and block-diagonal attention, so that a document's activations are those it has alone.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from scilm_hpc.data.dataset import ShardDataset
from scilm_hpc.tasks import Task, get_task


def calibration_batches(
    dataset: ShardDataset,
    task: str | Task,
    pad_id: int,
    batches: int,
    batch_size: int,
    seed: int,
) -> list[dict[str, torch.Tensor]]:
    """``batches`` batches of ``batch_size`` examples drawn without replacement."""
    task = get_task(task)
    order = np.random.default_rng(seed).permutation(len(dataset))[: batches * batch_size]
    return [
        task.collate([dataset[int(i)] for i in order[s : s + batch_size]], pad_id)
        for s in range(0, len(order), batch_size)
    ]


@torch.no_grad()
def input_norms(
    model: Any,
    linears: dict[str, Any],
    batches: list[dict[str, torch.Tensor]],
    task: str | Task,
) -> dict[str, torch.Tensor]:
    """Name -> L2 norm over calibration tokens of each input feature of each layer.

    Padding positions are left out: they carry no text and would bias the norms
    towards the padding embedding. ``task`` turns each collated batch into the model's
    forward arguments (packed batches: position ids and a block-diagonal mask).
    """
    task = get_task(task)
    sums = {name: torch.zeros(m.in_features, dtype=torch.float64) for name, m in linears.items()}
    current: dict[str, Any] = {}

    def hook(name: str) -> Any:
        def record(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            x = args[0].detach().to(torch.float64)
            keep = current["mask"].reshape(-1).bool()
            x = x.reshape(-1, x.shape[-1])
            if keep.numel() == x.shape[0]:
                x = x[keep]
            sums[name] += (x * x).sum(0)

        return record

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in linears.items()]
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            current["mask"] = batch["attention_mask"]
            model(**task.model_inputs(task.forward_inputs(batch), model))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return {name: s.sqrt().float() for name, s in sums.items()}
