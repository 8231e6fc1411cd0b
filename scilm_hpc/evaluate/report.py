"""Evaluation outputs: ``eval.json``, ``eval.md``, the confusion-matrix plot, predictions."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from scilm_hpc.data.dataset import ShardDataset
from scilm_hpc.rundir import write_json_atomic
from scilm_hpc.schema import JobConfig

HEADLINE = {
    "classification": ("accuracy", "macro_f1", "micro_f1", "weighted_f1", "loss"),
    "token_classification": ("precision", "recall", "f1", "token_accuracy", "loss"),
    "causal_lm": ("loss", "perplexity"),
}


def _markdown(
    job: JobConfig,
    evaluations: list[dict[str, Any]],
    labels: list[str],
    n_examples: int,
    ranks: int,
) -> str:
    keys = HEADLINE[job.task]
    lines = [
        f"# Evaluation: {job.task}, split `{job.eval.split}`, {n_examples} examples, "
        f"{ranks} rank(s)",
        "",
        "| model | " + " | ".join(keys) + " | examples/s |",
        "|---" * (len(keys) + 2) + "|",
    ]
    for ev in evaluations:
        values = " | ".join(f"{ev['metrics'][k]:.4f}" for k in keys)
        speed = f"{ev['examples_per_s']:.1f}" if ev["examples_per_s"] else "-"
        lines.append(f"| `{ev['model']}` | {values} | {speed} |")
    if job.task == "classification":
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
    return "\n".join(lines) + "\n"


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


def write_reports(
    run_dir: Path,
    job: JobConfig,
    dataset: ShardDataset,
    evaluations: list[dict[str, Any]],
    ranks: int,
) -> dict[str, Any]:
    """Write every output file; returns the content of ``eval.json``."""
    run_dir.mkdir(parents=True, exist_ok=True)
    first = evaluations[0]
    summary: dict[str, Any] = {
        "task": job.task,
        "model": first["model"],
        "split": job.eval.split,
        "n_examples": len(dataset),
        "ranks": ranks,
        "metrics": first["metrics"],
        "examples_per_s": first["examples_per_s"],
    }
    if len(evaluations) > 1:
        summary["models"] = [
            {k: v for k, v in ev.items() if k != "predictions"} for ev in evaluations
        ]
    write_json_atomic(run_dir / "eval.json", summary)
    (run_dir / "eval.md").write_text(
        _markdown(job, evaluations, dataset.label_names, len(dataset), ranks)
    )
    if job.task == "classification":
        plot_confusion(evaluations, dataset.label_names, run_dir / "plots" / "confusion_matrix.png")
    if job.eval.predictions:
        with (run_dir / "predictions.jsonl").open("w") as fh:
            for ev in evaluations:
                for index, (loss, count, pred, gold) in enumerate(ev["predictions"]):
                    fh.write(
                        json.dumps(
                            {
                                "model": ev["model"],
                                "index": index,
                                "pred": pred,
                                "gold": gold,
                                "loss": loss,
                                "count": count,
                            }
                        )
                        + "\n"
                    )
    return summary
