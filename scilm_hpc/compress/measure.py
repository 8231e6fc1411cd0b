"""What the compression report measures: weights, sparsity, size, CPU latency, metrics.

* ``params``: weights the model computes with, quantised layers counted by their
  logical (dense) size; ``nonzero_params``: those that are not zero.
* ``sparsity``: zeros among the prunable weights (``targets.PRUNABLE_DESCRIPTION``),
  relative to the dense model's prunable count, so weights removed by structured
  pruning count as zeros.
* ``latency_ms``: median wall time of a forward pass over one fixed batch on the
  CPU, after two warm-up passes (for seq2seq a teacher-forced pass over source and target).

The task metrics of each step come from ``evaluate.inference.dataset_metrics``.
"""

from __future__ import annotations

import statistics
from typing import Any

import torch

from scilm_hpc.compress.quantize import (
    DynamicInt8Linear,
    QuantizedEmbedding,
    WeightOnlyLinear,
    dense_weight,
)
from scilm_hpc.compress.static_quant import StaticInt8Model
from scilm_hpc.compress.targets import prunable_linears
from scilm_hpc.compress.torchao_quant import is_torchao_linear
from scilm_hpc.data.dataset import ShardDataset
from scilm_hpc.tasks import Task, get_task


def _module_weights(module: Any) -> list[tuple[torch.Tensor, bool]]:
    """The weights ``module`` itself holds, each with whether it is a stored parameter
    (which may be shared with another module) or computed from integers."""
    if isinstance(module, DynamicInt8Linear | WeightOnlyLinear):
        bias = module.bias() if isinstance(module, DynamicInt8Linear) else module.bias
        return [(dense_weight(module), False)] + ([(bias, False)] if bias is not None else [])
    if isinstance(module, QuantizedEmbedding):
        return [(module.weight, False)]
    if is_torchao_linear(module):
        bias = [(module.bias.detach(), False)] if module.bias is not None else []
        return [(dense_weight(module), False), *bias]
    return [(p.detach(), True) for p in module.parameters(recurse=False)]


def weight_stats(model: Any, dense_prunable: int | None = None) -> dict[str, Any]:
    """``params``, ``nonzero_params``, ``prunable_params`` and ``sparsity`` of ``model``.

    Args:
        model: the model.
        dense_prunable: prunable weights of the dense model (None: this model is it).
    """
    if isinstance(model, StaticInt8Model):
        counts = model.weight_stats()
        reference = dense_prunable or counts["prunable_params"]
        return {
            "params": counts["params"],
            "nonzero_params": counts["nonzero_params"],
            "prunable_params": counts["prunable_params"],
            "sparsity": 1.0 - counts["prunable_nonzero"] / reference,
        }
    params = nonzero = 0
    seen: set[int] = set()
    for module in model.modules():
        for tensor, stored in _module_weights(module):
            if stored:  # tied parameters (e.g. input / output embeddings) count once
                key = tensor.untyped_storage().data_ptr() + int(tensor.storage_offset())
                if key in seen:
                    continue
                seen.add(key)
            params += tensor.numel()
            nonzero += int(torch.count_nonzero(tensor))
    prunable = prunable_nonzero = 0
    for module in prunable_linears(model).values():
        weight = dense_weight(module)
        prunable += weight.numel()
        prunable_nonzero += int(torch.count_nonzero(weight))
    reference = dense_prunable or prunable
    return {
        "params": params,
        "nonzero_params": nonzero,
        "prunable_params": prunable,
        "sparsity": 1.0 - prunable_nonzero / reference,
    }


def latency_batch(
    dataset: ShardDataset, size: int, pad_id: int, task: str | Task
) -> dict[str, Any]:
    """The fixed batch latency is measured on: the split's first ``size`` examples."""
    task = get_task(task)
    batch = task.collate([dataset[i] for i in range(min(size, len(dataset)))], pad_id)
    if task.generates:  # an encoder-decoder's forward also reads the (shifted) target
        return task.forward_inputs(batch)
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


@torch.no_grad()
def latency_ms(model: Any, batch: dict[str, Any], repeats: int, threads: int) -> float:
    """Median time in milliseconds of ``repeats`` single forward passes of ``model`` on
    ``batch`` after two warm-up passes, on ``threads`` threads (0: torch's current
    setting), timed by ``torch.utils.benchmark.Timer`` (which sets and restores the
    thread count)."""
    from torch.utils.benchmark import Timer

    model.eval()
    timer = Timer(
        stmt="model(**batch)",
        globals={"model": model, "batch": batch},
        num_threads=threads if threads > 0 else torch.get_num_threads(),
    )
    timer.timeit(2)
    return 1000.0 * statistics.median(timer.timeit(1).median for _ in range(repeats))
