"""Quantisation through torchao's ``quantize_`` (``quantize.backend: torchao``).

torchao swaps the weight of each chosen ``nn.Linear`` for a tensor subclass
(``Int8Tensor``, ``IntxUnpackedToInt8Tensor``) that quantises activations and picks
a kernel at call time; the module stays an ``nn.Linear``.

* ``dynamic``: ``Int8DynamicActivationInt8WeightConfig`` (int8 per token activations,
  int8 per output channel weights).
* ``weight_only`` 8 bits: ``Int8WeightOnlyConfig`` (per output channel).
* ``weight_only`` 4 bits: ``IntxWeightOnlyConfig(torch.int4, PerGroup(group_size))``,
  torchao's int4 layout that runs on any CPU (its ``Int4WeightOnlyConfig`` needs CUDA
  kernels).

Saving: the integer data and scales of each layer are written as plain tensors
(``torchao_tensors``); loading rebuilds the tensor subclass from them with the
subclass's own constructor, so a reloaded model computes exactly what the saved one
did, without pickling torchao objects (safetensors holds plain tensors only).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from scilm_hpc.errors import UserError

#: torchao release the stored layout was written with (checked on load).
TORCHAO_REQUIRED = "0.18"


def import_torchao() -> Any:
    """``torchao`` (its import-time log lines are silenced for every scilm process in
    ``scilm_hpc/__init__.py``: transformers imports it too, on every model load).

    Raises:
        UserError: if torchao is not installed.
    """
    try:
        import torchao
    except ImportError as error:
        raise UserError(
            f"compress: quantize.backend torchao needs the package torchao "
            f"(pip install 'torchao=={TORCHAO_REQUIRED}.*'): {error}"
        ) from error
    return torchao


def torchao_config(method: str, bits: int, group_size: int | None) -> Any:
    """The torchao config for one recipe step."""
    import_torchao()
    from torchao.quantization import (
        Int8DynamicActivationInt8WeightConfig,
        Int8WeightOnlyConfig,
        IntxWeightOnlyConfig,
        PerGroup,
        PerRow,
    )

    if method == "dynamic":
        return Int8DynamicActivationInt8WeightConfig(set_inductor_config=False)
    if bits == 8:
        if group_size is not None:
            raise UserError(
                "compress: torchao int8 weight-only is per output channel; remove group_size"
            )
        return Int8WeightOnlyConfig(set_inductor_config=False)
    granularity = PerGroup(group_size) if group_size else PerRow()
    int4 = getattr(torch, "int4")  # noqa: B009 (torch's stubs do not list the int4 dtype)
    return IntxWeightOnlyConfig(weight_dtype=int4, granularity=granularity)


def torchao_quantize(
    model: Any, linears: dict[str, Any], method: str, bits: int, group_size: int | None
) -> list[str]:
    """Quantise ``linears`` (plain ``nn.Linear`` layers of ``model``) in place with
    torchao; their qualified names."""
    config = torchao_config(method, bits, group_size)
    from torchao.quantization import quantize_

    chosen = {id(m) for m in linears.values()}
    quantize_(model, config, filter_fn=lambda module, _fqn: id(module) in chosen)
    return list(linears)


def is_torchao_linear(module: Any) -> bool:
    """True if ``module`` is an ``nn.Linear`` whose weight is a torchao tensor subclass."""
    weight = getattr(module, "weight", None)
    return isinstance(module, nn.Linear) and type(weight) not in (nn.Parameter, torch.Tensor)
