"""Metrics computed from per-example predictions (never from per-rank partial sums).

Classification: accuracy, macro / micro / weighted F1, per-class precision /
recall / F1 and the confusion matrix. Token classification: entity-level
precision / recall / F1 with BIO semantics (an entity counts only if its type
and both boundaries match) and token accuracy. Causal LM: loss, perplexity.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np


def _prf(tp: float, fp: float, fn: float) -> tuple[float, float, float]:
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return precision, recall, f1


def classification_metrics(
    y_true: Sequence[int], y_pred: Sequence[int], labels: Sequence[str]
) -> dict:
    """Accuracy, F1 averages, per-class scores and confusion matrix (rows: true)."""
    k = len(labels)
    cm = np.zeros((k, k), dtype=np.int64)
    np.add.at(cm, (np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)), 1)
    tp = np.diag(cm).astype(float)
    support = cm.sum(axis=1)
    per_class = {}
    f1s = []
    for i, name in enumerate(labels):
        p, r, f = _prf(tp[i], cm[:, i].sum() - tp[i], support[i] - tp[i])
        per_class[name] = {"precision": p, "recall": r, "f1": f, "support": int(support[i])}
        f1s.append(f)
    total = int(cm.sum())
    present = (support > 0) | (cm.sum(axis=0) > 0)  # as scikit-learn: predicted-only too
    return {
        "accuracy": float(tp.sum() / total) if total else 0.0,
        "macro_f1": float(np.mean(np.asarray(f1s)[present])) if present.any() else 0.0,
        "micro_f1": float(tp.sum() / total) if total else 0.0,
        "weighted_f1": float(np.dot(f1s, support) / support.sum()) if total else 0.0,
        "per_class": per_class,
        "confusion_matrix": cm.tolist(),
    }


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


def lm_metrics(total_loss: float, total_tokens: int) -> dict:
    """Mean token loss and perplexity from a summed loss over predicted tokens."""
    loss = total_loss / total_tokens if total_tokens else float("nan")
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}


def metrics_from_results(
    task: str, results: Sequence[tuple[float, int, Any, Any]], labels: Sequence[str]
) -> dict[str, Any]:
    """The task's metrics from per-example results in example order (see ``inference``)."""
    loss_sum = sum(r[0] for r in results)
    count = sum(r[1] for r in results)
    metrics: dict[str, Any]
    if task == "classification":
        metrics = classification_metrics([r[3] for r in results], [r[2] for r in results], labels)
        metrics["loss"] = loss_sum / max(count, 1)
    elif task == "token_classification":
        gold = [[labels[t] for t in r[3]] for r in results]
        pred = [[labels[t] for t in r[2]] for r in results]
        metrics = {**entity_metrics(gold, pred), "loss": loss_sum / max(count, 1)}
    else:
        metrics = lm_metrics(loss_sum, count)
    metrics["n_examples"] = len(results)
    return metrics
