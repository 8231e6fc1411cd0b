"""Training logs: ``metrics.jsonl`` (one JSON object per logged step) and the loss plot."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from scilm_hpc.rundir import read_jsonl, write_text_atomic
from scilm_hpc.train.tensorboard import TensorBoardMirror


class MetricsLog:
    """Append-only JSON-lines log written by rank 0, mirrored to TensorBoard event files
    under ``tensorboard_dir`` when one is given."""

    def __init__(self, path: Path, enabled: bool, tensorboard_dir: Path | None = None) -> None:
        self.path = path
        self.enabled = enabled
        self.tensorboard = (
            TensorBoardMirror(tensorboard_dir) if enabled and tensorboard_dir else None
        )

    def write(self, row: dict[str, Any]) -> None:
        """Append one row and flush it to disk."""
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(row) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        if self.tensorboard is not None:
            self.tensorboard.write(row)

    def set_aside(self) -> None:
        """At a fresh start: keep an earlier run's rows as ``metrics.jsonl.before-TIME``
        (never truncated), so the new run's log starts empty."""
        if not self.enabled or not self.path.is_file() or self.path.stat().st_size == 0:
            return
        aside = self.path.with_name(f"{self.path.name}.before-{time.strftime('%Y%m%dT%H%M%S')}")
        os.replace(self.path, aside)
        print(
            f"{self.path}: no checkpoint to resume from; earlier rows kept as {aside}", flush=True
        )

    def truncate_after(self, step: int) -> None:
        """Drop rows logged after ``step`` (by a run that died before checkpointing them)."""
        if not self.enabled or not self.path.is_file():
            return
        # also drops a partial last line, which the next append would run into
        rows = [r for r in read_jsonl(self.path) if r.get("step", 0) <= step]
        write_text_atomic(self.path, "".join(json.dumps(r) + "\n" for r in rows))


def plot_loss(metrics_path: Path, out: Path) -> None:
    """Training loss (and dev loss where evaluated) against step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_jsonl(metrics_path)
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    dev = [(r["step"], r["dev_loss"]) for r in rows if "dev_loss" in r]
    fig, ax = plt.subplots(figsize=(6, 4))
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss")
    if dev:
        ax.plot(*zip(*dev, strict=True), "o-", label="dev loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
