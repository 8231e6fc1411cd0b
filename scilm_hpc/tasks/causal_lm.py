"""``causal_lm``: continued pretraining of a decoder on plain text.

Documents are tokenized whole and end with EOS. With ``data.packing`` (the
default) a shard's documents are joined and cut into ``data.max_length`` blocks
(``data.packing``), no token discarded, and the shard stores each token's position
within its document (``token_position_ids``) so that attention and loss never cross
a document; without it each document is one row, cut at ``data.max_length`` (the
cut tokens are counted in the manifest). Shards without the position column (from
before packing) are read as one document per row.

The labels are the inputs (the model shifts them), padding excluded, and the first
token of each document is never a target (it is not predicted from the previous
document). Metrics: mean token loss and perplexity.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from scilm_hpc.data.encode import IGNORE_INDEX, encode_documents
from scilm_hpc.data.packing import (
    document_starts,
    pack_documents,
    packed_model_inputs,
    pad_positions,
)
from scilm_hpc.data.readers import Example
from scilm_hpc.schema import DataConfig
from scilm_hpc.tasks.base import ExampleResult, Task, pad_inputs


def lm_metrics(total_loss: float, total_tokens: int) -> dict:
    """Mean token loss and perplexity from a summed loss over predicted tokens."""
    loss = total_loss / total_tokens if total_tokens else float("nan")
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}


def token_loss_results(logits: torch.Tensor, labels: torch.Tensor) -> list[ExampleResult]:
    """Per-example (summed token loss, counted tokens) of ``logits`` against ``labels``
    already aligned (position t scores label t), ``IGNORE_INDEX`` left out."""
    losses = F.cross_entropy(
        logits.float().transpose(1, 2), labels, reduction="none", ignore_index=IGNORE_INDEX
    )
    out: list[ExampleResult] = []
    for i in range(len(labels)):
        keep = labels[i] != IGNORE_INDEX
        out.append((losses[i][keep].sum().item(), int(keep.sum()), None, None))
    return out


class CausalLM(Task):
    """Next-token prediction on every real token."""

    name = "causal_lm"
    auto_class_name = "AutoModelForCausalLM"
    static_int8 = False
    formats = ("text", "jsonl", "csv", "fasta", "parquet")
    has_label_map = False
    headline = ("loss", "perplexity")
    main_metric = ("perplexity", False)

    def encode(
        self,
        tokenizer: Any,
        examples: Sequence[Example],
        label_ids: dict[str, int],
        max_length: int,
    ) -> tuple[list[np.ndarray], dict[str, Any]]:
        """Whole documents (``max_length`` is applied by ``encode_shard``)."""
        return encode_documents(tokenizer, [ex.text or "" for ex in examples]), {}

    def encode_shard(
        self,
        tokenizer: Any,
        examples: Sequence[Example],
        label_ids: dict[str, int],
        data: DataConfig,
    ) -> tuple[list[np.ndarray], dict[str, list[Any]], dict[str, int]]:
        documents, _, _ = super().encode_shard(tokenizer, examples, label_ids, data)
        tokens_in = sum(len(d) for d in documents)
        counts = {"documents": len(documents), "tokens_in": tokens_in}
        if data.packing:
            blocks, positions, split = pack_documents(documents, data.max_length)
            counts.update(tokens_kept=tokens_in, tokens_truncated=0, documents_split=split)
            return blocks, {"token_position_ids": positions}, counts
        rows = [d[: data.max_length] for d in documents]
        kept = sum(len(r) for r in rows)
        counts.update(
            tokens_kept=kept,
            tokens_truncated=tokens_in - kept,
            documents_truncated=sum(len(d) > data.max_length for d in documents),
        )
        return rows, {}, counts

    def collate(self, items: Sequence[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
        batch = pad_inputs(items, pad_id)
        # predict every real token, never the padding
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, IGNORE_INDEX)
        if "position_ids" in items[0]:  # packed: no target across a document boundary
            batch["position_ids"] = pad_positions(
                [it["position_ids"] for it in items], batch["input_ids"].shape[1]
            )
            labels = labels.masked_fill(document_starts(batch["position_ids"]), IGNORE_INDEX)
        batch["labels"] = labels
        return batch

    def model_inputs(self, batch: dict[str, torch.Tensor], model: Any) -> dict[str, Any]:
        if "position_ids" in batch:
            return packed_model_inputs(batch, model)
        return dict(batch)

    def distill_positions(self, batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
        return batch["attention_mask"].bool()

    def example_results(
        self, logits: torch.Tensor, batch: dict[str, torch.Tensor]
    ) -> list[ExampleResult]:
        return token_loss_results(logits[:, :-1], batch["labels"][:, 1:])

    def metrics(self, results: Sequence[ExampleResult], labels: Sequence[str]) -> dict[str, Any]:
        return lm_metrics(sum(r[0] for r in results), sum(r[1] for r in results))
