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
attention is made block-diagonal: for flash / flex attention through transformers'
packed-sequence path (``position_ids`` with no 2D mask and no cache: the varlen
kernels), for SDPA and eager attention through an explicit 4D mask built here (see
``packed_model_inputs`` for why). ``use_cache=False`` always: with a cache
transformers skips its packed-sequence mask and the documents of a block would
attend to each other.
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


def block_causal_mask(position_ids: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """The 4D mask (batch, 1, q, k) of causal attention within each document.

    Query ``q`` may attend to key ``k`` where both are in the same document and
    ``k <= q``. ``dtype`` None: a boolean mask (True: attend), what torch's SDPA takes
    whatever the query's dtype; else additive (0 where allowed, the dtype's lowest value
    elsewhere), what eager attention adds to its scores.
    """
    document = document_starts(position_ids).long().cumsum(-1)
    same = document[:, :, None] == document[:, None, :]
    width = position_ids.shape[-1]
    causal = torch.ones(width, width, dtype=torch.bool, device=position_ids.device).tril()
    allowed = (same & causal)[:, None]
    if dtype is None:
        return allowed
    mask = torch.zeros(allowed.shape, dtype=dtype, device=position_ids.device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)


def attention_implementation(model: Any) -> str:
    """The model's attention implementation (``config._attn_implementation``: ``sdpa``,
    ``eager``, ``flash_attention_2``, ...); a DeepSpeed engine or peft wrapper passes the
    question on to the model it holds."""
    inner = getattr(model, "module", model)  # a DeepSpeed engine holds the model as .module
    config = getattr(inner, "config", None)
    return str(getattr(config, "_attn_implementation", None) or "eager")


def packed_model_inputs(batch: dict[str, torch.Tensor], model: Any) -> dict[str, Any]:
    """Forward arguments of a packed batch for ``model``: ``position_ids``, a
    block-diagonal attention and no cache.

    Flash and flex attention get the position ids alone (transformers' varlen path:
    no 2D mask, no cache). The others get an explicit 4D mask: transformers builds the
    packed mask from position ids only in models whose mask code passes them on (Llama,
    Qwen2, GPT-2 in transformers 5; not OPT, whose documents would silently attend to
    each other), while every model takes a prepared 4D mask as it is.

    ``batch`` holds ``input_ids``, ``position_ids``, ``attention_mask`` (2D padding mask,
    replaced here) and optionally ``labels``.
    """
    inputs: dict[str, Any] = {k: v for k, v in batch.items() if k != "attention_mask"}
    inputs["use_cache"] = False
    implementation = attention_implementation(model)
    if implementation.startswith(("flash", "flex")):
        inputs["attention_mask"] = None
    elif implementation == "sdpa":
        inputs["attention_mask"] = block_causal_mask(batch["position_ids"], None)
    else:
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
        inputs["attention_mask"] = block_causal_mask(batch["position_ids"], dtype)
    return inputs
