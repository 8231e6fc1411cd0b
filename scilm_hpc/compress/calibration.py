"""Calibration statistics: the input activation norm of every prunable linear layer.

Wanda scores a weight by ``|W_ij| * ||X_j||_2``, where ``X_j`` is the ``j``-th input
feature of the layer over all (non-padding) calibration tokens. The batches are
drawn from the train split of the shards in a fixed, seeded order so that two
runs of a recipe prune the same weights. The model sees each batch as training and
scoring feed it (``Task.model_inputs``): a packed causal-LM batch with its position ids
and block-diagonal attention, so that a document's activations are those it has alone.

An encoder-decoder reads a seq2seq batch as in training: the encoder the source, the
decoder the shifted target (teacher forcing) and the encoder's real outputs. Each
layer's padding is that of what it reads: the encoder's layers and the decoder's
cross-attention keys and values (which read the encoder's outputs) skip source padding,
the decoder's other layers (self-attention, cross-attention queries, FFN) target padding.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from scilm_hpc.compress.targets import is_encoder_decoder
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
    forward arguments (packed batches: position ids and a block-diagonal mask; seq2seq
    batches: the source, and the target the decoder reads).
    """
    task = get_task(task)
    sums = {name: torch.zeros(m.in_features, dtype=torch.float64) for name, m in linears.items()}
    current: dict[str, Any] = {}
    decoder_layers: set[str] = set()
    handles = []
    if is_encoder_decoder(model):
        decoder = model.get_decoder()
        inside = {id(m) for m in decoder.modules()}
        decoder_layers = {name for name, m in linears.items() if id(m) in inside}

        def encoder_outputs(_module: nn.Module, _args: Any, kwargs: dict[str, Any]) -> None:
            current["encoded"] = kwargs.get("encoder_hidden_states")

        handles.append(decoder.register_forward_pre_hook(encoder_outputs, with_kwargs=True))

    def padding_mask(name: str, x: torch.Tensor) -> torch.Tensor:
        """The source mask, or the target mask for a decoder layer reading decoder states."""
        if name not in decoder_layers:
            return current["mask"]
        encoded = current.get("encoded")
        reads_encoder = (
            encoded is not None and x.shape == encoded.shape and x.data_ptr() == encoded.data_ptr()
        )
        return current["mask"] if reads_encoder else current["decoder_mask"]

    def hook(name: str) -> Any:
        def record(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            keep = padding_mask(name, args[0]).reshape(-1).bool()
            x = args[0].detach().to(torch.float64)
            x = x.reshape(-1, x.shape[-1])
            if keep.numel() == x.shape[0]:
                x = x[keep]
            sums[name] += (x * x).sum(0)

        return record

    handles += [m.register_forward_pre_hook(hook(n)) for n, m in linears.items()]
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            current["mask"] = batch["attention_mask"]
            current["decoder_mask"] = batch.get("decoder_attention_mask", batch["attention_mask"])
            current["encoded"] = None
            model(**task.model_inputs(task.forward_inputs(batch), model))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return {name: s.sqrt().float() for name, s in sums.items()}
