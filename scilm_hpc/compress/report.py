"""``compress_report.json``, ``compress_report.md`` and ``plots/compression_tradeoff.png``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from scilm_hpc.rundir import write_json_atomic
from scilm_hpc.tasks import get_task


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if not numerator or not denominator:
        return None
    return numerator / denominator


def with_ratios(baseline: dict[str, Any], step: dict[str, Any]) -> dict[str, Any]:
    """A step's entry with its size and speed ratios against the dense baseline."""
    return {
        **step,
        "size_ratio": _ratio(baseline["size_bytes"], step["size_bytes"]),
        "speedup": _ratio(baseline["latency_ms"], step["latency_ms"]),
    }


def _markdown(report: dict[str, Any]) -> str:
    metric, _ = get_task(report["task"]).main_metric
    base = report["baseline"]
    lines = [
        f"# Compression report: {report['recipe']}",
        "",
        f"Model `{report['model']}` ({report['task']}). Metrics on the "
        f"{report['eval']['split']} split ({report['eval']['examples']} examples). "
        f"Latency: median of {report['latency']['repeats']} forward passes of one batch of "
        f"{report['latency']['batch_size']} x {report['latency']['seq_len']} tokens on "
        f"{report['latency']['threads']} CPU thread(s). Sparsity counts zeros (and weights "
        f"removed by structured pruning) among the prunable weights: "
        f"{report['prunable_modules']}.",
        "",
        f"| step | params | nonzero | sparsity | size (MB) | x smaller | latency (ms) "
        f"| x faster | {metric} | change |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    rows = [{"name": "dense (baseline)", **base, "size_ratio": 1.0, "speedup": 1.0}]
    for step in [*rows, *report["steps"]]:
        value = step["metrics"].get(metric)
        delta = None if value is None else value - base["metrics"].get(metric, 0.0)
        lines.append(
            f"| {step['name']} | {step['params']:,} | {step['nonzero_params']:,} "
            f"| {step['sparsity']:.1%} | {step['size_bytes'] / 1e6:.1f} "
            f"| {step['size_ratio'] or 0:.2f} | {step['latency_ms']:.1f} "
            f"| {step['speedup'] or 0:.2f} | {value if value is None else f'{value:.4f}'} "
            f"| {'' if delta is None else f'{delta:+.4f}'} |"
        )
    lines += _students(report, metric)
    lines += ["", f"Loadable with `scilm_hpc.compress.load_compressed('{report['compressed']}')`."]
    return "\n".join(lines) + "\n"


def _students(report: dict[str, Any], metric: str) -> list[str]:
    """Teacher and distilled students side by side (nothing without a distill step)."""
    students = [s for s in report["steps"] if "architecture" in s]
    if not students:
        return []
    lines = [
        "",
        "## Teacher and student",
        "",
        f"| model | layers | hidden | FFN | heads | params | size (MB) | latency (ms) | {metric} |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, entry in [("teacher (dense)", report["baseline"])] + [
        (s["name"], s) for s in students
    ]:
        shape = entry.get("architecture", {})
        value = entry["metrics"].get(metric)
        lines.append(
            f"| {name} | {shape.get('num_hidden_layers')} | {shape.get('hidden_size')} "
            f"| {shape.get('intermediate_size')} | {shape.get('num_attention_heads')} "
            f"| {entry['params']:,} | {entry['size_bytes'] / 1e6:.2f} "
            f"| {entry['latency_ms']:.1f} | {value if value is None else f'{value:.4f}'} |"
        )
    return lines


def plot_tradeoff(report: dict[str, Any], out: Path) -> None:
    """The task metric against size on disk and against sparsity, one point per step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric, _ = get_task(report["task"]).main_metric
    points = [("dense", report["baseline"])] + [(s["name"], s) for s in report["steps"]]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, label in (
        (axes[0], "size_bytes", "size on disk (MB)"),
        (axes[1], "sparsity", "sparsity of prunable weights"),
    ):
        for name, entry in points:
            x = entry[key] / 1e6 if key == "size_bytes" else entry[key]
            y = entry["metrics"].get(metric)
            if y is None:
                continue
            ax.scatter([x], [y])
            ax.annotate(name, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel(label)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    fig.suptitle(f"compression trade-off: {report['recipe']}")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)


def write_report(run_dir: Path, report: dict[str, Any]) -> None:
    """Write the JSON, the markdown table and the plot into ``run_dir``."""
    write_json_atomic(run_dir / "compress_report.json", report)
    (run_dir / "compress_report.md").write_text(_markdown(report))
    plot_tradeoff(report, run_dir / "plots" / "compression_tradeoff.png")
