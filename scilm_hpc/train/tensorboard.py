"""TensorBoard event files mirroring ``metrics.jsonl`` (which stays the source of truth).

Rank 0 writes them under ``RUN_DIR/tensorboard/``, so ``tensorboard --logdir runs/``
compares runs: every number of a logged row becomes a scalar at its step, training
values under ``train/`` (loss, lr, samples_per_s, ...) and dev values under ``dev/``.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any


def tensorboard_available() -> bool:
    """Whether torch's ``SummaryWriter`` can run (it needs the ``tensorboard`` package)."""
    return importlib.util.find_spec("tensorboard") is not None


def wanted(setting: bool | None) -> bool:
    """``train.tensorboard``: ``None`` (auto) is on where the package is installed."""
    return tensorboard_available() if setting is None else setting


def scalar_name(key: str) -> str:
    """``dev_macro_f1`` -> ``dev/macro_f1``; ``loss`` -> ``train/loss``."""
    if key.startswith("dev_"):
        return "dev/" + key[len("dev_") :]
    return "train/" + key


class TensorBoardMirror:
    """Writes each metrics row as scalars; the writer opens on the first row."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self._writer: Any = None

    def write(self, row: dict[str, Any]) -> None:
        """Every number in ``row`` (but the step) as a scalar at ``row["step"]``."""
        step = row.get("step")
        if not isinstance(step, int):
            return
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(self.log_dir))
        for key, value in row.items():
            if key != "step" and isinstance(value, int | float) and not isinstance(value, bool):
                self._writer.add_scalar(scalar_name(key), value, step)
        self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
