"""Packing: whole documents joined and cut into fixed-length blocks, attention kept per document.

At prepare time (``data.packing=true``, causal LM) every document is tokenized
whole, ends with the tokenizer's EOS, and the documents of a shard are laid end to
end and cut into blocks of ``data.max_length`` tokens: no token is discarded (the
last block of a shard may be shorter) and a document longer than a block continues
in the next one (counted in the manifest as ``documents_split``). Each token's
position inside its document segment is stored beside it (the per-token shard
column ``token_position_ids``): it restarts at 0 where a document starts and where a
block starts, which is all a batch needs to keep documents apart.

At batch time the position ids become the model's ``position_ids`` and the
attention is made block-diagonal: through transformers' packed-sequence detection
(``position_ids`` with no 2D mask and no cache: the flattening / varlen path of
transformers 5) where the installed transformers has it, else through an explicit
4D mask built here. ``use_cache=False`` always: with a cache transformers skips its
packed-sequence mask and the documents of a block would attend to each other.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

#: the shard column (per token) that marks a packed shard
POSITION_COLUMN = "token_position_ids"


def pack_documents(
    documents: Sequence[np.ndarray], block_length: int
) -> tuple[list[np.ndarray], list[np.ndarray], int]:
    """Documents laid end to end and cut into blocks of ``block_length`` tokens.

    Args:
        documents: token ids of each whole document (int32), EOS included.
        block_length: tokens per block (``data.max_length``).

    Returns:
        Token ids of every block, the position ids of every block (each token's
        index within its document's part of the block), and how many documents
        span more than one block.
    """
    lengths = np.fromiter((len(d) for d in documents), dtype=np.int64, count=len(documents))
    if not lengths.sum():
        return [], [], 0
    flat = np.concatenate(documents).astype(np.int32)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    token = np.arange(flat.size, dtype=np.int64)
    doc_start = np.repeat(starts, lengths)
    block_start = token // block_length * block_length
    positions = (token - np.maximum(doc_start, block_start)).astype(np.int32)
    first, last = starts[lengths > 0], (starts + lengths - 1)[lengths > 0]
    split = int(np.sum(first // block_length != last // block_length))
    bounds = range(0, flat.size, block_length)
    ids = [flat[lo : lo + block_length] for lo in bounds]
    pos = [positions[lo : lo + block_length] for lo in bounds]
    return ids, pos, split


def pad_positions(items: Sequence[np.ndarray], width: int) -> torch.Tensor:
    """Position ids padded to ``width``; the padding counts as a document of its own
    (0, 1, 2, ...), so no real token ever attends to it."""
    out = torch.zeros((len(items), width), dtype=torch.long)
    for i, positions in enumerate(items):
        n = len(positions)
        out[i, :n] = torch.from_numpy(np.asarray(positions, dtype=np.int64))
        out[i, n:] = torch.arange(width - n)
    return out


def document_starts(position_ids: torch.Tensor) -> torch.Tensor:
    """Where a new document (or document segment) starts: position id 0."""
    return position_ids == 0


def block_causal_mask(position_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The additive 4D mask (batch, 1, q, k) of causal attention within each document.

    0 where query ``q`` may attend to key ``k`` (same document, ``k <= q``), the
    dtype's lowest value elsewhere. The fallback of transformers versions without
    packed-sequence detection.
    """
    document = document_starts(position_ids).long().cumsum(-1)
    same = document[:, :, None] == document[:, None, :]
    width = position_ids.shape[-1]
    causal = torch.ones(width, width, dtype=torch.bool, device=position_ids.device).tril()
    allowed = (same & causal)[:, None]
    mask = torch.zeros(allowed.shape, dtype=dtype, device=position_ids.device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)


def transformers_detects_packing() -> bool:
    """Whether the installed transformers builds the per-document mask from
    ``position_ids`` itself (``masking_utils.find_packed_sequence_indices``)."""
    try:
        from transformers import masking_utils
    except ImportError:
        return False
    return hasattr(masking_utils, "find_packed_sequence_indices")


def packed_model_inputs(
    batch: dict[str, torch.Tensor], mask_dtype: torch.dtype = torch.float32
) -> dict[str, Any]:
    """Forward arguments of a packed batch: ``position_ids``, the block-diagonal attention
    (transformers' own from the position ids, or an explicit 4D mask), no cache.

    ``batch`` holds ``input_ids``, ``position_ids`` and ``attention_mask`` (2D padding
    mask, dropped here) and optionally ``labels``.
    """
    inputs: dict[str, Any] = {
        k: v for k, v in batch.items() if k not in ("attention_mask", "position_ids")
    }
    inputs["position_ids"] = batch["position_ids"]
    inputs["use_cache"] = False
    if transformers_detects_packing():
        inputs["attention_mask"] = None
    else:
        inputs["attention_mask"] = block_causal_mask(batch["position_ids"], mask_dtype)
    return inputs
