"""``regression``: one or more numbers per sequence (protein stability, fitness, affinity).

The label field holds a number or a list of ``k`` numbers. Prepare computes each
target's mean and standard deviation on the training split (``fit``; population
standard deviation) and stores them in the manifest (``task_state``); the shards hold
the *standardised* targets ``(y - mean) / std`` as a per-example float32 ``labels``
column of ``k`` values, which the model (``AutoModelForSequenceClassification``,
``num_labels=k``, ``problem_type="regression"``: MSE loss) trains on. Everything a
user reads is in the original units: predictions, metrics (Spearman rho, Pearson r,
MAE, RMSE per target, averaged over targets), the scatter plot and
``predictions.jsonl``; only ``loss`` is the training objective, the MSE of the
standardised targets. The model's config carries ``label_mean`` and ``label_std``,
so a plain ``from_pretrained`` user turns outputs into units with
``logits * label_std + label_mean``.
"""

from __future__ import annotations

import math
import warnings
from array import array
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from scilm_hpc.data.encode import encode_texts
from scilm_hpc.data.readers import Example
from scilm_hpc.errors import UserError
from scilm_hpc.schema import TrainConfig
from scilm_hpc.tasks.base import ExampleResult, Task, pad_inputs


def _correlation(kind: str, x: np.ndarray, y: np.ndarray) -> float:
    """Spearman or Pearson correlation; NaN where it is undefined (n < 2, constant)."""
    from scipy import stats

    if len(x) < 2 or np.all(x == x[0]) or np.all(y == y[0]):
        return float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fn = stats.spearmanr if kind == "spearman" else stats.pearsonr
        return float(fn(x, y)[0])


def regression_metrics(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, Any]:
    """Spearman rho, Pearson r, MAE and RMSE of each target (columns of ``[n, k]``
    arrays) and their means over targets (the scalar keys)."""
    y_true = np.asarray(y_true, dtype=np.float64).reshape(len(y_true), -1)
    y_pred = np.asarray(y_pred, dtype=np.float64).reshape(len(y_pred), -1)
    per_target = []
    for j in range(y_true.shape[1]):
        t, p = y_true[:, j], y_pred[:, j]
        err = p - t
        per_target.append(
            {
                "spearman": _correlation("spearman", t, p),
                "pearson": _correlation("pearson", t, p),
                "mae": float(np.mean(np.abs(err))) if len(t) else float("nan"),
                "rmse": float(math.sqrt(np.mean(err**2))) if len(t) else float("nan"),
            }
        )
    out: dict[str, Any] = {
        key: float(np.mean([m[key] for m in per_target])) if per_target else float("nan")
        for key in ("spearman", "pearson", "mae", "rmse")
    }
    if len(per_target) > 1:
        out["per_target"] = per_target
    return out


def plot_scatter(evaluations: list[dict[str, Any]], out: Path) -> None:
    """Predicted against true values, one panel per model (every target, one colour each)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(
        1, len(evaluations), figsize=(4.5 * len(evaluations), 4.2), squeeze=False
    )
    for ax, ev in zip(axes[0], evaluations, strict=True):
        gold = np.array([r[3] for r in ev["predictions"]], dtype=float).reshape(
            len(ev["predictions"]), -1
        )
        pred = np.array([r[2] for r in ev["predictions"]], dtype=float).reshape(gold.shape)
        for j in range(gold.shape[1]):
            ax.scatter(gold[:, j], pred[:, j], s=6, alpha=0.5, label=f"target {j}")
        if gold.size:
            low, high = float(min(gold.min(), pred.min())), float(max(gold.max(), pred.max()))
            ax.plot([low, high], [low, high], color="grey", linewidth=0.8)
        m = ev["metrics"]
        ax.set_title(
            f"{Path(ev['model']).name or ev['model']}\n"
            f"Spearman {m['spearman']:.3f}, RMSE {m['rmse']:.3f}",
            fontsize=9,
        )
        ax.set_xlabel("true")
        ax.set_ylabel("predicted")
        if gold.shape[1] > 1:
            ax.legend(fontsize=7)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


class Regression(Task):
    """One or more numbers per sequence, trained on standardised targets.

    Args:
        mean: each target's training mean (None: not bound to shards yet).
        std: each target's training standard deviation.
    """

    name = "regression"
    auto_class_name = "AutoModelForSequenceClassification"
    formats = ("jsonl", "csv", "fasta", "parquet")
    has_label_map = False
    label_kind = "values"
    outputs_values = True
    headline = ("spearman", "pearson", "mae", "rmse", "loss")
    main_metric = ("spearman", True)
    losses = ("auto", "huber")

    def __init__(self, mean: Sequence[float] | None = None, std: Sequence[float] | None = None):
        self.mean = None if mean is None else np.asarray(mean, dtype=np.float64)
        self.std = None if std is None else np.asarray(std, dtype=np.float64)

    def _stats(self) -> tuple[np.ndarray, np.ndarray]:
        # an internal invariant: the jobs bind the task to the shards' manifest
        assert self.mean is not None and self.std is not None, "regression task not bound"
        return self.mean, self.std

    def model_kwargs(self, labels: list[str]) -> dict[str, Any]:
        mean, _ = self._stats()
        return {
            "num_labels": len(mean),
            "problem_type": "regression",
            "ignore_mismatched_sizes": True,
        }

    def config_attributes(self) -> dict[str, Any]:
        mean, std = self._stats()
        return {"label_mean": mean.tolist(), "label_std": std.tolist()}

    # --- prepare -------------------------------------------------------------------
    def label_field(self, configured: str) -> str | None:
        return configured

    learns_from_train = True

    def fit_part(self, train: Iterable[Example]) -> tuple[int | None, str, array]:
        """The targets of ``train`` (8 bytes a value, kept for the same mean as numpy's),
        their number per example and the first example's source.

        Raises:
            UserError: if examples differ in their number of targets.
        """
        k: int | None = None
        kept, first = array("d"), ""
        for ex in train:
            if k is None:
                k, first = len(ex.values or ()), ex.source
            if len(ex.values or ()) != k:
                raise UserError(
                    f"{ex.source}: {len(ex.values or ())} label values where the first "
                    f"training example has {k}; every example needs the same number"
                )
            kept.extend(ex.values or ())
        return k, first, kept

    def fit_merge(self, parts: list[tuple[int | None, str, array]]) -> dict[str, Any]:
        """Mean and population standard deviation of each target over the parts.

        Raises:
            UserError: if the parts differ in their number of targets, or a target is
                constant (nothing to regress).
        """
        k: int | None = None
        kept = array("d")
        for part_k, source, values in parts:
            if part_k is None:
                continue
            if k is not None and part_k != k:
                raise UserError(
                    f"{source}: {part_k} label values where the first training example "
                    f"has {k}; every example needs the same number"
                )
            k = part_k
            kept.extend(values)
        rows = len(kept) // k if k else 0
        values_2d = np.frombuffer(kept, dtype=np.float64).reshape(rows, k or 0)
        mean, std = values_2d.mean(axis=0), values_2d.std(axis=0)
        for j in np.flatnonzero(std == 0):
            raise UserError(
                f"data.train: label value {j} is {mean[j]} in every training example; "
                f"there is nothing to regress"
            )
        return {"label_mean": mean.tolist(), "label_std": std.tolist()}

    def bind(self, state: dict[str, Any]) -> Task:
        if "label_mean" not in state:
            return self
        return Regression(state["label_mean"], state["label_std"])

    def encode(
        self,
        tokenizer: Any,
        examples: Sequence[Example],
        label_ids: dict[str, int],
        max_length: int,
    ) -> tuple[list[np.ndarray], dict[str, Any]]:
        mean, std = self._stats()
        targets = []
        for ex in examples:
            values = np.asarray(ex.values or (), dtype=np.float64)
            if values.shape != mean.shape:
                raise UserError(
                    f"{ex.source}: {values.size} label values; the training split has "
                    f"{mean.size} per example"
                )
            targets.append(((values - mean) / std).astype(np.float32))
        ids = encode_texts(tokenizer, [ex.text or "" for ex in examples], max_length)
        return ids, {"labels": targets}

    # --- training ------------------------------------------------------------------
    def collate(self, items: Sequence[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
        batch = pad_inputs(items, pad_id)
        batch["labels"] = torch.from_numpy(
            np.stack([np.atleast_1d(it["labels"]) for it in items]).astype(np.float32)
        )
        return batch

    # --- evaluation ----------------------------------------------------------------
    def training_loss(
        self,
        outputs: Any,
        batch: dict[str, torch.Tensor],
        train: TrainConfig,
        labels: Sequence[str],
    ) -> torch.Tensor:
        if train.loss != "huber":
            return outputs.loss
        logits = outputs.logits.float()
        target = batch["labels"].float().reshape(logits.shape)
        return torch.nn.functional.huber_loss(logits, target, delta=train.huber_delta)

    def example_results(
        self, logits: torch.Tensor, batch: dict[str, torch.Tensor]
    ) -> list[ExampleResult]:
        mean, std = self._stats()
        if logits.shape[-1] != len(mean):
            raise UserError(
                f"model.name_or_path: the model predicts {logits.shape[-1]} value(s), the "
                f"shards hold {len(mean)} per example; evaluate a model fine-tuned on them"
            )
        z_pred = logits.float().numpy().astype(np.float64)
        z_gold = batch["labels"].numpy().astype(np.float64)
        losses = ((z_pred - z_gold) ** 2).sum(axis=1)
        pred, gold = z_pred * std + mean, z_gold * std + mean
        k = len(mean)
        out: list[ExampleResult] = []
        for i in range(len(z_gold)):
            p = float(pred[i, 0]) if k == 1 else pred[i].tolist()
            g = float(gold[i, 0]) if k == 1 else gold[i].tolist()
            out.append((float(losses[i]), k, p, g))
        return out

    def metrics(self, results: Sequence[ExampleResult], labels: Sequence[str]) -> dict[str, Any]:
        out = regression_metrics(
            np.array([r[3] for r in results], dtype=np.float64),
            np.array([r[2] for r in results], dtype=np.float64),
        )
        out["loss"] = sum(r[0] for r in results) / max(sum(r[1] for r in results), 1)
        return out

    def report_sections(self, evaluations: list[dict[str, Any]], labels: list[str]) -> list[str]:
        lines: list[str] = []
        for ev in evaluations:
            per_target = ev["metrics"].get("per_target")
            if not per_target:
                continue
            lines += [
                "",
                f"## Per target: `{ev['model']}`",
                "",
                "| target | spearman | pearson | mae | rmse |",
                "|---|---|---|---|---|",
            ]
            for j, m in enumerate(per_target):
                lines.append(
                    f"| {j} | {m['spearman']:.4f} | {m['pearson']:.4f} | "
                    f"{m['mae']:.4f} | {m['rmse']:.4f} |"
                )
        lines += [
            "",
            "Predictions and metrics are in the label's units; `loss` is the MSE of the "
            "standardised targets the model trains on. Scatter plot: `plots/scatter.png`.",
        ]
        return lines

    def plots(self, evaluations: list[dict[str, Any]], labels: list[str], run_dir: Path) -> None:
        plot_scatter(evaluations, run_dir / "plots" / "scatter.png")
