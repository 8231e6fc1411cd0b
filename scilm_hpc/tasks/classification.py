"""``classification``: one label per document (SciCite's citation intents).

Shards hold a per-example ``labels`` column (class ids). Metrics: accuracy,
macro / micro / weighted F1, per-class precision / recall / F1 and the confusion
matrix, which the report also plots.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from scilm_hpc.data.encode import encode_texts
from scilm_hpc.data.readers import Example
from scilm_hpc.tasks.base import (
    ExampleResult,
    Task,
    pad_inputs,
)


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


def plot_confusion(evaluations: list[dict[str, Any]], labels: list[str], out: Path) -> None:
    """One confusion matrix per model, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(
        1, len(evaluations), figsize=(4.5 * len(evaluations), 4), squeeze=False
    )
    for ax, ev in zip(axes[0], evaluations, strict=True):
        cm = ev["metrics"]["confusion_matrix"]
        ax.imshow(cm, cmap="Blues")
        for i, row in enumerate(cm):
            for j, value in enumerate(row):
                ax.text(j, i, str(value), ha="center", va="center", fontsize=8)
        ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
        ax.set_yticks(range(len(labels)), labels)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(Path(ev["model"]).name or ev["model"], fontsize=9)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


class Classification(Task):
    """One label per document."""

    name = "classification"
    auto_class_name = "AutoModelForSequenceClassification"
    formats = ("jsonl", "csv", "fasta", "parquet")
    headline = ("accuracy", "macro_f1", "micro_f1", "weighted_f1", "loss")
    main_metric = ("macro_f1", True)
    class_weighted = True

    def label_field(self, configured: str) -> str | None:
        return configured

    def example_labels(self, example: Example) -> tuple[str, ...]:
        return (example.label,) if example.label is not None else ()

    def encode(
        self,
        tokenizer: Any,
        examples: Sequence[Example],
        label_ids: dict[str, int],
        max_length: int,
    ) -> tuple[list[np.ndarray], dict[str, Any]]:
        ids = encode_texts(tokenizer, [ex.text or "" for ex in examples], max_length)
        return ids, {"labels": [label_ids[ex.label or ""] for ex in examples]}

    def collate(self, items: Sequence[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
        batch = pad_inputs(items, pad_id)
        batch["labels"] = torch.tensor([it["labels"] for it in items], dtype=torch.long)
        return batch

    def example_results(
        self, logits: torch.Tensor, batch: dict[str, torch.Tensor]
    ) -> list[ExampleResult]:
        labels = batch["labels"]
        losses = F.cross_entropy(logits.float(), labels, reduction="none")
        preds = logits.argmax(-1)
        return [(losses[i].item(), 1, int(preds[i]), int(labels[i])) for i in range(len(labels))]

    def metrics(self, results: Sequence[ExampleResult], labels: Sequence[str]) -> dict[str, Any]:
        out = classification_metrics([r[3] for r in results], [r[2] for r in results], labels)
        out["loss"] = sum(r[0] for r in results) / max(sum(r[1] for r in results), 1)
        return out

    def report_sections(self, evaluations: list[dict[str, Any]], labels: list[str]) -> list[str]:
        lines: list[str] = []
        for ev in evaluations:
            lines += [
                "",
                f"## Per class: `{ev['model']}`",
                "",
                "| class | precision | recall | f1 | support |",
                "|---|---|---|---|---|",
            ]
            for name in labels:
                c = ev["metrics"]["per_class"][name]
                lines.append(
                    f"| {name} | {c['precision']:.4f} | {c['recall']:.4f} | "
                    f"{c['f1']:.4f} | {c['support']} |"
                )
        return lines

    def plots(self, evaluations: list[dict[str, Any]], labels: list[str], run_dir: Path) -> None:
        plot_confusion(evaluations, labels, run_dir / "plots" / "confusion_matrix.png")
