"""``causal_lm``: continued pretraining of a decoder on plain text.

Shards hold only token ids; the labels are the inputs (the model shifts them),
padding excluded. Metrics: mean token loss and perplexity.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from scilm_hpc.data.encode import IGNORE_INDEX, encode_texts
from scilm_hpc.data.readers import Example
from scilm_hpc.tasks.base import ExampleResult, Task, pad_inputs


def lm_metrics(total_loss: float, total_tokens: int) -> dict:
    """Mean token loss and perplexity from a summed loss over predicted tokens."""
    loss = total_loss / total_tokens if total_tokens else float("nan")
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}


class CausalLM(Task):
    """Next-token prediction on every real token."""

    name = "causal_lm"
    auto_class_name = "AutoModelForCausalLM"
    formats = ("text", "jsonl", "csv", "fasta")
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
        return encode_texts(tokenizer, [ex.text or "" for ex in examples], max_length), {}

    def collate(self, items: Sequence[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
        batch = pad_inputs(items, pad_id)
        # predict every real token, never the padding
        batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, IGNORE_INDEX)
        return batch

    def distill_positions(self, batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
        return batch["attention_mask"].bool()

    def example_results(
        self, logits: torch.Tensor, batch: dict[str, torch.Tensor]
    ) -> list[ExampleResult]:
        logits, labels = logits[:, :-1], batch["labels"][:, 1:]
        losses = F.cross_entropy(
            logits.float().transpose(1, 2), labels, reduction="none", ignore_index=IGNORE_INDEX
        )
        out: list[ExampleResult] = []
        for i in range(len(labels)):
            keep = labels[i] != IGNORE_INDEX
            out.append((losses[i][keep].sum().item(), int(keep.sum()), None, None))
        return out

    def metrics(self, results: Sequence[ExampleResult], labels: Sequence[str]) -> dict[str, Any]:
        return lm_metrics(sum(r[0] for r in results), sum(r[1] for r in results))
