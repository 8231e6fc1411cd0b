"""Unstructured and N:M pruning: scores, masks, and linear layers that keep them.

Scores are ``|W|`` (magnitude) or ``|W| * ||X_j||`` (Wanda, with calibration input
norms). Unstructured masks keep the highest scores per layer or over all prunable
layers together (``scope``); Wanda compares weights within each output row, as in
its paper. N:M masks keep the ``n`` highest scores in every group of ``m``
consecutive inputs of a row (2:4 is what sparse tensor cores run).

During recovery a pruned layer is a ``MaskedLinear``: its forward multiplies the
weight by a fixed 0/1 mask, so the pruned weights get zero gradient under every
ZeRO stage (DeepSpeed keeps its own fp32 copies of the weights, which an in-place
zeroing of the module's weights would not reach) and ``fold_masks`` writes
``weight * mask`` back at the end.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from scilm_hpc.errors import UserError


class MaskedLinear(nn.Linear):
    """``nn.Linear`` whose weight is multiplied by a fixed 0/1 ``mask`` buffer."""

    mask: torch.Tensor

    @classmethod
    def wrap(cls, linear: nn.Linear, mask: torch.Tensor) -> MaskedLinear:
        """A masked layer sharing ``linear``'s parameters."""
        masked = cls.__new__(cls)
        nn.Module.__init__(masked)
        masked.in_features, masked.out_features = linear.in_features, linear.out_features
        masked.weight, masked.bias = linear.weight, linear.bias
        masked.register_buffer("mask", mask.to(linear.weight.dtype).clone())
        return masked

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight * self.mask, self.bias)

    def folded(self) -> nn.Linear:
        """A plain ``nn.Linear`` holding ``weight * mask``."""
        out = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        with torch.no_grad():
            out.weight.copy_(self.weight * self.mask)
            if self.bias is not None:
                out.bias.copy_(self.bias)
        return out


def set_module(model: Any, name: str, module: nn.Module) -> None:
    """Replace the submodule at dotted ``name``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def mask_pruned(model: Any, linears: dict[str, Any]) -> dict[str, MaskedLinear]:
    """Wrap every layer of ``linears`` that holds zeros in a ``MaskedLinear`` (mask = w != 0)."""
    wrapped = {}
    for name, linear in linears.items():
        if isinstance(linear, nn.Linear) and not isinstance(linear, MaskedLinear):
            zeros = linear.weight == 0
            if zeros.any():
                wrapped[name] = MaskedLinear.wrap(linear, ~zeros)
                set_module(model, name, wrapped[name])
    return wrapped


def fold_masks(model: Any) -> None:
    """Replace every ``MaskedLinear`` by a plain ``nn.Linear`` with the mask applied."""
    for name, module in list(model.named_modules()):
        if isinstance(module, MaskedLinear):
            set_module(model, name, module.folded())


def scores(weight: torch.Tensor, method: str, norms: torch.Tensor | None) -> torch.Tensor:
    """Importance of each weight: magnitude, or Wanda's magnitude x input norm."""
    score = weight.detach().abs().float()
    if method == "wanda":
        assert norms is not None
        score = score * norms.reshape(1, -1)
    return score


def _drop_lowest(score: torch.Tensor, count: int) -> torch.Tensor:
    """Keep-mask dropping the ``count`` lowest scores of each row of ``score`` (exact count)."""
    keep = torch.ones_like(score, dtype=torch.bool)
    if count:
        keep.scatter_(-1, torch.topk(score, count, dim=-1, largest=False).indices, False)
    return keep


def unstructured_masks(
    weights: dict[str, torch.Tensor],
    sparsity: float,
    method: str,
    scope: str,
    norms: dict[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Keep-masks reaching ``sparsity`` among ``weights``.

    Args:
        weights: name -> weight matrix (out x in).
        sparsity: share of weights to remove, 0 <= sparsity < 1.
        method: magnitude or wanda.
        scope: layer (each matrix its own threshold) or global (one over all);
            Wanda always compares within output rows.
        norms: name -> input norms (Wanda).
    """
    if method == "wanda":
        return {
            name: _drop_lowest(
                scores(w, method, norms[name] if norms else None),
                int(round(sparsity * w.shape[1])),
            )
            for name, w in weights.items()
        }
    if scope == "layer":
        return {
            name: _drop_lowest(
                scores(w, method, None).reshape(-1), int(round(sparsity * w.numel()))
            ).reshape(w.shape)
            for name, w in weights.items()
        }
    flat = torch.cat([scores(w, method, None).reshape(-1) for w in weights.values()])
    keep = _drop_lowest(flat, int(round(sparsity * flat.numel())))
    parts = keep.split([w.numel() for w in weights.values()])
    return {
        name: part.reshape(w.shape) for (name, w), part in zip(weights.items(), parts, strict=True)
    }


def nm_masks(
    weights: dict[str, torch.Tensor],
    n: int,
    m: int,
    method: str,
    norms: dict[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Keep-masks with ``n`` of every ``m`` consecutive inputs of each row.

    Raises:
        UserError: if a layer's input size is not a multiple of ``m``.
    """
    masks = {}
    for name, w in weights.items():
        out_features, in_features = w.shape
        if in_features % m:
            raise UserError(
                f"compress: N:M pruning needs input sizes divisible by m={m}; "
                f"'{name}' has {in_features} inputs"
            )
        s = scores(w, method, norms[name] if norms else None).reshape(out_features, -1, m)
        masks[name] = _drop_lowest(s, m - n).reshape(out_features, in_features)
    return masks


def apply_masks(linears: dict[str, Any], masks: dict[str, torch.Tensor]) -> None:
    """Zero the pruned weights in place."""
    with torch.no_grad():
        for name, keep in masks.items():
            linears[name].weight.mul_(keep.to(linears[name].weight.dtype))


def gradual_sparsity(step: int, total_steps: int, final: float) -> float:
    """Cubic schedule (Zhu & Gupta 2017): 0 at step 0, ``final`` after 2/3 of the steps.

    The sparsity moves in ten increments so the masks change only ten times.
    """
    ramp = max(1, (2 * total_steps) // 3)
    increments = 10
    done = min(step, ramp) / ramp
    done = math.floor(done * increments) / increments
    return final * (1.0 - (1.0 - done) ** 3)
