"""``token_classification``: one tag per word (biomedical NER, per-residue labels).

Input: CoNLL, or JSONL with a list of tags in ``data.label_field`` beside a list of
words or a protein sequence in ``data.text_field`` (each residue a word, as in
``antiberta-paratope``).

Word tags are aligned to sub-word tokens at prepare time (the first sub-word of
a word carries the tag, the rest and the special tokens ``IGNORE_INDEX``) and
stored as the per-token column ``token_labels``. Metrics: entity-level precision /
recall / F1 with BIO semantics (an entity counts only if its type and both
boundaries match) and token accuracy.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from scilm_hpc.data.encode import IGNORE_INDEX, encode_words
from scilm_hpc.data.readers import Example
from scilm_hpc.tasks.base import ExampleResult, Task, pad_inputs
from scilm_hpc.tasks.classification import _prf


def bio_entities(tags: Sequence[str]) -> set[tuple[str, int, int]]:
    """(type, start, end) spans of a BIO tag sequence; a stray I- starts an entity."""
    spans = set()
    kind, start = None, 0
    for i, tag in enumerate([*tags, "O"]):
        prefix, _, name = tag.partition("-")
        continues = prefix == "I" and kind == name
        if kind is not None and not continues:
            spans.add((kind, start, i))
            kind = None
        if prefix in ("B", "I") and not continues:
            kind, start = name, i
    return spans


def entity_metrics(true_tags: Sequence[Sequence[str]], pred_tags: Sequence[Sequence[str]]) -> dict:
    """Entity-level micro precision / recall / F1 and token accuracy over sentences."""
    tp = fp = fn = 0
    correct = total = 0
    for gold, pred in zip(true_tags, pred_tags, strict=True):
        g, p = bio_entities(gold), bio_entities(pred)
        tp += len(g & p)
        fp += len(p - g)
        fn += len(g - p)
        correct += sum(a == b for a, b in zip(gold, pred, strict=True))
        total += len(gold)
    precision, recall, f1 = _prf(tp, fp, fn)
    return {
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "token_accuracy": correct / total if total else 0.0,
    }


class TokenClassification(Task):
    """One tag per word, predicted on the word's first sub-word."""

    name = "token_classification"
    auto_class_name = "AutoModelForTokenClassification"
    formats = ("conll", "jsonl")
    label_kind = "tags"
    headline = ("precision", "recall", "f1", "token_accuracy", "loss")
    main_metric = ("f1", True)

    def label_field(self, configured: str) -> str | None:
        return configured  # JSONL: a list of tags; CoNLL ignores it (data.tag_column)

    def example_labels(self, example: Example) -> tuple[str, ...]:
        return example.tags or ()

    def encode(
        self,
        tokenizer: Any,
        examples: Sequence[Example],
        label_ids: dict[str, int],
        max_length: int,
    ) -> tuple[list[np.ndarray], dict[str, Any]]:
        tag_ids = [[label_ids[t] for t in ex.tags or ()] for ex in examples]
        ids, tags = encode_words(
            tokenizer, [ex.words or () for ex in examples], tag_ids, max_length
        )
        return ids, {"token_labels": tags}

    def collate(self, items: Sequence[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
        batch = pad_inputs(items, pad_id)
        labels = torch.full(batch["input_ids"].shape, IGNORE_INDEX, dtype=torch.long)
        for i, it in enumerate(items):
            labels[i, : len(it["labels"])] = torch.from_numpy(it["labels"].astype(np.int64))
        batch["labels"] = labels
        return batch

    def distill_positions(self, batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
        return batch["labels"] != IGNORE_INDEX

    def example_results(
        self, logits: torch.Tensor, batch: dict[str, torch.Tensor]
    ) -> list[ExampleResult]:
        labels = batch["labels"]
        losses = F.cross_entropy(
            logits.float().transpose(1, 2), labels, reduction="none", ignore_index=IGNORE_INDEX
        )
        preds = logits.argmax(-1)
        out = []
        for i in range(len(labels)):
            keep = labels[i] != IGNORE_INDEX
            out.append(
                (
                    losses[i][keep].sum().item(),
                    int(keep.sum()),
                    preds[i][keep].tolist(),
                    labels[i][keep].tolist(),
                )
            )
        return out

    def metrics(self, results: Sequence[ExampleResult], labels: Sequence[str]) -> dict[str, Any]:
        gold = [[labels[t] for t in r[3]] for r in results]
        pred = [[labels[t] for t in r[2]] for r in results]
        loss = sum(r[0] for r in results) / max(sum(r[1] for r in results), 1)
        return {**entity_metrics(gold, pred), "loss": loss}
