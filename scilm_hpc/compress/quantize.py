"""Quantisation: dynamic int8 linear layers for CPU inference, weight-only int8 / int4.

* ``dynamic``: weights int8 per output channel (symmetric), activations quantised
  on the fly per batch; runs torch's quantized CPU kernels (fbgemm / oneDNN), the
  fast path for CPU inference.
* ``weight_only``: weights int8 or int4 (symmetric, per output channel or per group
  of ``group_size`` inputs, one fp16 scale each), dequantised in the forward; the
  point is the size on disk and in memory. Two int4 values share a byte.
* word embeddings (``embeddings: true``): weight-only, per row (or row group).
* ``backend: torchao``: the linear layers through torchao's ``quantize_`` instead
  (``compress.torchao_quant``); the word embeddings stay as here.

Every quantised module keeps its integer weights and scales as buffers, which is
what ``saving`` writes and reads back bit for bit.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.ao.nn.quantized.dynamic import Linear as DynamicInt8Linear

from scilm_hpc.compress.prune import MaskedLinear, set_module
from scilm_hpc.compress.torchao_quant import is_torchao_linear, torchao_quantize
from scilm_hpc.errors import UserError


def symmetric_quantize(
    weight: torch.Tensor, bits: int, group_size: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer values (int8 tensor, range +-(2^(bits-1) - 1)) and fp16 scales per group.

    Args:
        weight: rows x columns.
        bits: 8 or 4.
        group_size: columns per scale; None: one scale per row.

    Raises:
        UserError: if ``group_size`` does not divide the number of columns.
    """
    rows, cols = weight.shape
    group = group_size or cols
    if cols % group:
        raise UserError(
            f"compress: group_size {group_size} does not divide the {cols} inputs of a layer"
        )
    qmax = 2 ** (bits - 1) - 1
    grouped = weight.detach().float().reshape(rows, cols // group, group)
    scales = (grouped.abs().amax(-1) / qmax).clamp(min=1e-10).to(torch.float16)
    values = torch.round(grouped / scales.float().unsqueeze(-1)).clamp(-qmax, qmax)
    return values.to(torch.int8).reshape(rows, cols), scales


def pack_int4(values: torch.Tensor) -> torch.Tensor:
    """Two signed 4-bit values per byte (even column in the low nibble)."""
    biased = (values.to(torch.int16) + 8).to(torch.uint8)
    return biased[:, 0::2] | (biased[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of ``pack_int4``: int8 values, twice as many columns."""
    low = (packed & 0x0F).to(torch.int8) - 8
    high = (packed >> 4).to(torch.int8) - 8
    return torch.stack([low, high], dim=-1).reshape(packed.shape[0], -1)


def dequantize(
    qweight: torch.Tensor, scales: torch.Tensor, bits: int, columns: int
) -> torch.Tensor:
    """fp32 weights from stored integers and per-group scales."""
    values = unpack_int4(qweight) if bits == 4 else qweight
    rows = values.shape[0]
    groups = scales.shape[1]
    grouped = values.float().reshape(rows, groups, columns // groups)
    return (grouped * scales.float().unsqueeze(-1)).reshape(rows, columns)


class WeightOnlyLinear(nn.Module):
    """A linear layer with int8 or int4 weights, dequantised in each forward."""

    qweight: torch.Tensor
    scales: torch.Tensor
    bias: torch.Tensor | None

    def __init__(
        self, in_features: int, out_features: int, bits: int, groups: int, bias: bool
    ) -> None:
        super().__init__()
        self.in_features, self.out_features, self.bits = in_features, out_features, bits
        width = in_features // 2 if bits == 4 else in_features
        dtype = torch.uint8 if bits == 4 else torch.int8
        self.register_buffer("qweight", torch.zeros(out_features, width, dtype=dtype))
        self.register_buffer("scales", torch.ones(out_features, groups, dtype=torch.float16))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int, group_size: int | None) -> WeightOnlyLinear:
        """Quantise ``linear``'s weight."""
        values, scales = symmetric_quantize(linear.weight, bits, group_size)
        if bits == 4 and linear.in_features % 2:
            raise UserError(f"compress: int4 needs an even input size, got {linear.in_features}")
        module = cls(
            linear.in_features, linear.out_features, bits, scales.shape[1], linear.bias is not None
        )
        module.qweight = pack_int4(values) if bits == 4 else values
        module.scales = scales
        if linear.bias is not None:
            module.bias = linear.bias.detach().float().clone()
        return module

    def dense_weight(self) -> torch.Tensor:
        return dequantize(self.qweight, self.scales, self.bits, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.dense_weight().to(x.dtype)
        return F.linear(x, weight, None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bits={self.bits}"


class QuantizedEmbedding(nn.Module):
    """An embedding table with int8 / int4 rows, dequantised per looked-up row."""

    qweight: torch.Tensor
    scales: torch.Tensor

    def __init__(self, num: int, dim: int, bits: int, groups: int, padding_idx: int | None) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.bits = num, dim, bits
        self.padding_idx = padding_idx
        width = dim // 2 if bits == 4 else dim
        dtype = torch.uint8 if bits == 4 else torch.int8
        self.register_buffer("qweight", torch.zeros(num, width, dtype=dtype))
        self.register_buffer("scales", torch.ones(num, groups, dtype=torch.float16))

    @classmethod
    def from_embedding(
        cls, embedding: nn.Embedding, bits: int, group_size: int | None
    ) -> QuantizedEmbedding:
        values, scales = symmetric_quantize(embedding.weight, bits, group_size)
        module = cls(
            embedding.num_embeddings,
            embedding.embedding_dim,
            bits,
            scales.shape[1],
            embedding.padding_idx,
        )
        module.qweight = pack_int4(values) if bits == 4 else values
        module.scales = scales
        return module

    @property
    def weight(self) -> torch.Tensor:
        """The dequantised table (transformers reads ``.weight`` for its dtype and size)."""
        return dequantize(self.qweight, self.scales, self.bits, self.embedding_dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        rows = dequantize(
            self.qweight.index_select(0, flat),
            self.scales.index_select(0, flat),
            self.bits,
            self.embedding_dim,
        )
        return rows.reshape(*ids.shape, self.embedding_dim)


def dynamic_int8_linear(linear: nn.Linear) -> DynamicInt8Linear:
    """A dynamically quantised copy of ``linear`` (int8 weights per output channel)."""
    values, scales = symmetric_quantize(linear.weight, 8, None)
    return dynamic_from_int8(values, scales.float().reshape(-1), linear.bias)


def dynamic_from_int8(
    values: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None
) -> DynamicInt8Linear:
    """A dynamic int8 layer from stored int8 weights and per-channel scales."""
    out_features, in_features = values.shape
    with warnings.catch_warnings():
        # recent torch deprecates its quantized tensors (moving to torchao); these kernels
        # are still the measured fast path here, so the warning is noise for users
        warnings.filterwarnings("ignore", message=r".*quantized tensor creation functions")
        module = DynamicInt8Linear(
            in_features, out_features, bias_=bias is not None, dtype=torch.qint8
        )
        qweight = torch._make_per_channel_quantized_tensor(
            values, scales.double(), torch.zeros(out_features, dtype=torch.long), 0
        )
        module.set_weight_bias(qweight, None if bias is None else bias.detach().float())
    return module


QUANTIZED_LINEAR_TYPES = (DynamicInt8Linear, WeightOnlyLinear)


def dense_weight(module: Any) -> torch.Tensor:
    """The fp32 weight a (possibly masked or quantised) linear layer computes with."""
    if isinstance(module, DynamicInt8Linear):
        return module.weight().dequantize()
    if isinstance(module, WeightOnlyLinear):
        return module.dense_weight()
    if is_torchao_linear(module):
        return module.weight.dequantize().float()
    if isinstance(module, MaskedLinear):
        return (module.weight * module.mask).detach()
    return module.weight.detach()


def quantize_model(
    model: Any,
    linears: dict[str, Any],
    method: str,
    bits: int,
    group_size: int | None,
    embeddings: bool,
    backend: str = "native",
) -> list[str]:
    """Replace ``linears`` (and the word embeddings if asked) by quantised modules.

    ``backend``: ``native`` (the layers of this module) or ``torchao``.

    Returns:
        The qualified names of the modules quantised.

    Raises:
        UserError: for layers already quantised, or tied input / output embeddings.
    """
    done = []
    for name, linear in linears.items():
        if not isinstance(linear, nn.Linear) or is_torchao_linear(linear):
            raise UserError(
                f"compress: '{name}' is already quantised ({type(linear).__name__}); a "
                f"recipe quantises once, as its last step"
            )
    if backend == "torchao":
        done += torchao_quantize(model, linears, method, bits, group_size)
    else:
        for name, linear in linears.items():
            if method == "dynamic":
                set_module(model, name, dynamic_int8_linear(linear))
            else:
                set_module(model, name, WeightOnlyLinear.from_linear(linear, bits, group_size))
            done.append(name)
    if embeddings:
        table = model.get_input_embeddings()
        output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if output is not None and output.weight is table.weight:
            raise UserError(
                "compress: quantize.embeddings on a model whose output layer shares the "
                "word embeddings (tied weights) is not supported; set embeddings: false"
            )
        name = next(n for n, m in model.named_modules() if m is table)
        set_module(model, name, QuantizedEmbedding.from_embedding(table, bits, group_size))
        done.append(name)
    return done
