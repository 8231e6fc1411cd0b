"""``token_classification``: one tag per word (biomedical NER, per-residue labels).

Input: CoNLL, or JSONL with a list of tags in ``data.label_field`` beside a list of
words or a protein sequence in ``data.text_field`` (each residue a word, as in
``antiberta-paratope``).

Word tags are aligned to sub-word tokens at prepare time (the first sub-word of
a word carries the tag, the rest and the special tokens ``IGNORE_INDEX``) and
stored as the per-token column ``token_labels``. Metrics: with BIO tags,
entity-level precision / recall / F1 (an entity counts only if its type and both
boundaries match) and token accuracy; with other tags (per-residue ``P`` / ``N``),
per-word scores (``residue_metrics``): precision / recall / F1 of the positive
class (the second label in the sorted label map) or their macro average over more
classes, token accuracy and, for two classes, MCC, ROC-AUC and PR-AUC (average
precision) from the predicted probability of the positive class, which is then also
what ``predictions.jsonl`` holds per word.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from scilm_hpc.data.encode import IGNORE_INDEX, encode_words
from scilm_hpc.data.readers import Example
from scilm_hpc.tasks.base import (
    ExampleResult,
    Task,
    pad_inputs,
)
from scilm_hpc.tasks.classification import _prf, classification_metrics


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


def is_bio(labels: Sequence[str]) -> bool:
    """Whether a tag set reads as BIO (``O``, ``B-x``, ``I-x``, with at least one entity tag)."""
    entity = [t for t in labels if t.startswith(("B-", "I-"))]
    return bool(entity) and all(t == "O" or t in entity for t in labels)


def binary_ranking_metrics(y_true: np.ndarray, score: np.ndarray) -> dict[str, float]:
    """ROC-AUC (Mann-Whitney, ties counted half) and PR-AUC as average precision
    (scikit-learn's definition); NaN when one class is absent."""
    from scipy.stats import rankdata

    y_true = np.asarray(y_true, dtype=bool)
    score = np.asarray(score, dtype=np.float64)
    n_pos = int(y_true.sum())
    n_neg = len(y_true) - n_pos
    if n_pos == 0 or n_neg == 0:
        return {"roc_auc": float("nan"), "pr_auc": float("nan")}
    ranks = rankdata(score)
    roc_auc = (ranks[y_true].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
    order = np.argsort(-score, kind="mergesort")
    sorted_score, sorted_true = score[order], y_true[order]
    last = np.r_[np.flatnonzero(np.diff(sorted_score)), len(order) - 1]
    tps = np.cumsum(sorted_true)[last]
    precision = tps / (last + 1)
    recall = tps / n_pos
    pr_auc = float(np.sum(np.diff(np.r_[0.0, recall]) * precision))
    return {"roc_auc": float(roc_auc), "pr_auc": pr_auc}


def residue_metrics(
    gold: np.ndarray, pred: np.ndarray, labels: Sequence[str], score: np.ndarray | None
) -> dict[str, Any]:
    """Per-word scores of non-BIO tags (flattened tag ids; ``score``: the positive
    class's probability, two classes only)."""
    scores = classification_metrics(gold.tolist(), pred.tolist(), labels)
    out: dict[str, Any] = {"token_accuracy": scores["accuracy"], "per_class": scores["per_class"]}
    if len(labels) != 2:
        for key in ("precision", "recall", "f1"):
            out[key] = float(np.mean([c[key] for c in scores["per_class"].values()]))
        return out
    positive = scores["per_class"][labels[1]]
    out.update(precision=positive["precision"], recall=positive["recall"], f1=positive["f1"])
    tp = float(np.sum((gold == 1) & (pred == 1)))
    tn = float(np.sum((gold == 0) & (pred == 0)))
    fp = float(np.sum((gold == 0) & (pred == 1)))
    fn = float(np.sum((gold == 1) & (pred == 0)))
    denominator = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    out["mcc"] = (tp * tn - fp * fn) / denominator if denominator else 0.0
    out["positive_label"] = labels[1]
    if score is not None:
        out.update(binary_ranking_metrics(gold == 1, score))
    return out


class TokenClassification(Task):
    """One tag per word, predicted on the word's first sub-word."""

    name = "token_classification"
    auto_class_name = "AutoModelForTokenClassification"
    formats = ("conll", "jsonl", "parquet")
    label_kind = "tags"
    headline = ("precision", "recall", "f1", "token_accuracy", "loss")
    main_metric = ("f1", True)
    class_weighted = True

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
        # two tags: the positive tag's probability per word (the tag is p > 0.5, as argmax)
        binary = logits.shape[-1] == 2
        preds = logits.float().softmax(-1)[..., 1] if binary else logits.argmax(-1)
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
        loss = sum(r[0] for r in results) / max(sum(r[1] for r in results), 1)
        binary = len(labels) == 2
        pred_ids = [[int(p > 0.5) for p in r[2]] if binary else list(r[2]) for r in results]
        if is_bio(labels):
            gold = [[labels[t] for t in r[3]] for r in results]
            pred = [[labels[t] for t in ids] for ids in pred_ids]
            return {**entity_metrics(gold, pred), "loss": loss}
        flat_gold = np.array([t for r in results for t in r[3]], dtype=np.int64)
        flat_pred = np.array([t for ids in pred_ids for t in ids], dtype=np.int64)
        score = np.array([p for r in results for p in r[2]]) if binary else None
        return {**residue_metrics(flat_gold, flat_pred, labels, score), "loss": loss}

    def report_sections(self, evaluations: list[dict[str, Any]], labels: list[str]) -> list[str]:
        if is_bio(labels) or len(labels) != 2:
            return []
        lines = [
            "",
            f"## Per residue (positive class `{labels[1]}`)",
            "",
            "| model | mcc | roc_auc | pr_auc |",
            "|---|---|---|---|",
        ]
        for ev in evaluations:
            m = ev["metrics"]
            lines.append(
                f"| `{ev['model']}` | {m['mcc']:.4f} | {m['roc_auc']:.4f} | {m['pr_auc']:.4f} |"
            )
        return lines
