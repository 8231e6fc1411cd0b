"""Evaluation outputs: ``eval.json``, ``eval.md``, the task's plots, predictions."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from scilm_hpc.data.dataset import ShardDataset
from scilm_hpc.rundir import write_json_atomic
from scilm_hpc.schema import JobConfig
from scilm_hpc.tasks import get_task


def label_names(value: Any, labels: list[str]) -> Any:
    """A prediction or gold value with its class ids as label names: one id (a class) or
    a list of ids (one tag per word) becomes the names; anything else stays as it is."""
    if isinstance(value, list):
        return [label_names(v, labels) for v in value]
    if isinstance(value, int) and not isinstance(value, bool):
        return labels[value]
    return value


def _markdown(
    job: JobConfig,
    evaluations: list[dict[str, Any]],
    labels: list[str],
    n_examples: int,
    ranks: int,
) -> str:
    task = get_task(job.task)
    keys = task.headline
    lines = [
        f"# Evaluation: {job.task}, split `{job.eval.split}`, {n_examples} examples, "
        f"{ranks} rank(s)",
        "",
        "| model | " + " | ".join(keys) + " | examples/s |",
        "|---" * (len(keys) + 2) + "|",
    ]
    for ev in evaluations:
        values = " | ".join(f"{ev['metrics'][k]:.4f}" if k in ev["metrics"] else "-" for k in keys)
        speed = f"{ev['examples_per_s']:.3g}" if ev["examples_per_s"] else "-"
        lines.append(f"| `{ev['model']}` | {values} | {speed} |")
    lines += task.report_sections(evaluations, labels)
    return "\n".join(lines) + "\n"


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
        "rank_seconds": first["rank_seconds"],
    }
    if len(evaluations) > 1:
        summary["models"] = [
            {k: v for k, v in ev.items() if k != "predictions"} for ev in evaluations
        ]
    write_json_atomic(run_dir / "eval.json", summary)
    (run_dir / "eval.md").write_text(
        _markdown(job, evaluations, dataset.label_names, len(dataset), ranks)
    )
    task = get_task(job.task)
    task.plots(evaluations, dataset.label_names, run_dir)
    if job.eval.predictions or task.generates:
        names = dataset.label_names if task.has_label_map else []

        def named(value: Any) -> Any:
            return label_names(value, names) if names else value

        with (run_dir / "predictions.jsonl").open("w") as fh:
            for ev in evaluations:
                for index, (loss, count, pred, gold) in enumerate(ev["predictions"]):
                    fh.write(
                        json.dumps(
                            {
                                "model": ev["model"],
                                "index": index,
                                **task.prediction_record(named(pred), named(gold)),
                                "loss": loss,
                                "count": count,
                            }
                        )
                        + "\n"
                    )
    return summary
