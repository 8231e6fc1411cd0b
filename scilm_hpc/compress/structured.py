"""Structured pruning: remove FFN neurons or attention heads, shrinking the matrices.

Every block loses the same share of neurons (or heads), chosen by score within the
block; an encoder-decoder's encoder and decoder blocks alike (FFN neurons only: see
``targets.structured_stacks``). Removing FFN neuron ``j`` deletes row ``j`` of the
layers that produce it and column ``j`` of the layer that consumes it; removing a head
deletes its rows of the query / key / value projections and its columns of the output
projection.
The model stays a standard transformers model with smaller ``nn.Linear`` layers
(the forward reads the head size, not the head count); ``saving`` records the
shapes so ``load_compressed`` rebuilds them.

Scores: ``magnitude`` = product of the L2 norms of the neuron's (head's) weights in
and out; ``wanda`` = the consumer's calibration input norm of the neuron (summed
over a head's dimensions) x the L2 norm of its outgoing weights.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from scilm_hpc.compress.targets import BlockLayout, structured_stacks
from scilm_hpc.errors import UserError

#: FFN widths are rounded to a multiple of this (vectorised kernels like it).
FFN_MULTIPLE = 8


def shrink_linear(linear: Any, keep: torch.Tensor, dim: int) -> nn.Linear:
    """A copy of ``linear`` keeping output rows (dim 0) or input columns (dim 1) ``keep``."""
    weight = linear.weight.detach().index_select(dim, keep)
    out = nn.Linear(weight.shape[1], weight.shape[0], bias=linear.bias is not None)
    with torch.no_grad():
        out.weight.copy_(weight)
        if linear.bias is not None:
            bias = linear.bias.detach()
            out.bias.copy_(bias.index_select(0, keep) if dim == 0 else bias)
    return out


def _unit_scores(
    block: Any,
    producers: tuple[str, ...],
    consumer: str,
    unit: int,
    method: str,
    consumer_norms: torch.Tensor | None,
) -> torch.Tensor:
    """Score per unit (a neuron: ``unit`` = 1; a head: ``unit`` = head size)."""
    w_out = block.get_submodule(consumer).weight.detach().float()
    out_norm = w_out.pow(2).sum(0)  # per input column of the consumer
    if method == "wanda":
        assert consumer_norms is not None
        per_dim = consumer_norms.float() * out_norm.sqrt()
    else:
        per_dim = out_norm
        for name in producers:
            per_dim = per_dim * block.get_submodule(name).weight.detach().float().pow(2).sum(1)
        per_dim = per_dim.sqrt()
    return per_dim.reshape(-1, unit).sum(1)


def prune_structured(
    model: Any,
    pattern: str,
    sparsity: float,
    method: str,
    norms: dict[str, torch.Tensor] | None = None,
) -> dict[str, int]:
    """Remove ``sparsity`` of each block's FFN neurons (``ffn``) or heads (``heads``).

    Args:
        model: the model, changed in place.
        pattern: ffn or heads.
        sparsity: share removed per block.
        method: magnitude or wanda (needs ``norms`` of the consumer layers).
        norms: qualified layer name -> calibration input norms.

    Returns:
        Units kept per block: {"ffn": width} or {"heads": count} (the encoder's, where
        an encoder-decoder's two stacks differ).

    Raises:
        UserError: if nothing would be left or the layout is unknown.
    """
    kept: int | None = None
    for prefix, blocks, layout in structured_stacks(model, pattern):
        width = _prune_stack(prefix, blocks, layout, pattern, sparsity, method, norms)
        kept = width if kept is None else kept
    assert kept is not None
    return {pattern: kept}


def _prune_stack(
    prefix: str,
    blocks: Any,
    layout: BlockLayout,
    pattern: str,
    sparsity: float,
    method: str,
    norms: dict[str, torch.Tensor] | None,
) -> int:
    """Prune one stack of blocks (see ``prune_structured``); the units kept per block."""
    kept = 0
    block: Any
    total: int
    for index, block in enumerate(blocks):
        if pattern == "ffn":
            producers, consumer, unit = layout.ffn_in, layout.ffn_out, 1
            total = int(block.get_submodule(consumer).in_features)
            keep_n = int(round((1 - sparsity) * total / FFN_MULTIPLE)) * FFN_MULTIPLE
        else:
            producers, consumer = layout.heads_in, layout.heads_out
            unit = int(block.get_submodule(layout.head_attr).attention_head_size)
            total = int(block.get_submodule(consumer).in_features) // unit
            keep_n = int(round((1 - sparsity) * total))
        if keep_n < 1:
            raise UserError(
                f"compress: pattern '{pattern}' with sparsity {sparsity} would remove every "
                f"{'neuron' if pattern == 'ffn' else 'head'} of a block ({total} per block)"
            )
        full_name = f"{prefix}.{index}.{consumer}"
        score = _unit_scores(
            block, producers, consumer, unit, method, norms.get(full_name) if norms else None
        )
        units = torch.topk(score, keep_n).indices.sort().values
        dims = (units.reshape(-1, 1) * unit + torch.arange(unit).reshape(1, -1)).reshape(-1)
        for name in producers:
            _replace(block, name, shrink_linear(block.get_submodule(name), dims, 0))
        _replace(block, consumer, shrink_linear(block.get_submodule(consumer), dims, 1))
        if pattern == "heads":
            attention: Any = block.get_submodule(layout.head_attr)
            attention.num_attention_heads = keep_n
            attention.all_head_size = keep_n * unit
        kept = keep_n
    return kept


def _replace(block: Any, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(block.get_submodule(parent_name) if parent_name else block, child, module)
