"""Live progress of a training loop on rank 0: what a user tailing a Slurm log sees.

Every ``train.log_every`` steps (and at the last step) one plain line, e.g.::

    step 40/200 | loss 0.6120 | lr 4.2e-05 | 31.5 samples/s | elapsed 0:01:16 | ETA 0:05:04

On a terminal a tqdm bar shows the same instead. ``SCILM_QUIET=1`` (``scilm --quiet``)
prints neither; ``metrics.jsonl`` is written either way.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from scilm_hpc.runtime.console import QUIET_ENV, clock, quiet

__all__ = ["QUIET_ENV", "Progress", "clock", "eta_seconds", "progress_line", "quiet"]


def eta_seconds(step: int, first_step: int, total: int, elapsed_s: float) -> float | None:
    """Seconds left at the pace of the steps this process ran (``first_step``: where it
    started, e.g. a resumed checkpoint); None before its first step."""
    done = step - first_step
    if done <= 0:
        return None
    return (total - step) * elapsed_s / done


def progress_line(
    step: int,
    total: int,
    loss: float,
    lr: float,
    samples_per_s: float,
    elapsed_s: float,
    eta_s: float | None,
) -> str:
    """The plain progress line (see the module docstring)."""
    eta = clock(eta_s) if eta_s is not None else "?"
    return (
        f"step {step}/{total} | loss {loss:.4f} | lr {lr:.2e} | {samples_per_s:.1f} samples/s"
        f" | elapsed {clock(elapsed_s)} | ETA {eta}"
    )


class Progress:
    """Progress of one rank's loop; prints only where ``enabled`` (rank 0) and not quiet.

    Args:
        total: the last step.
        first_step: the step the loop starts from (0, or a resumed checkpoint's).
        enabled: False on ranks other than 0.
        interactive: a tqdm bar instead of lines; default: whether stdout is a terminal.
    """

    def __init__(
        self, total: int, first_step: int, enabled: bool, interactive: bool | None = None
    ) -> None:
        self.total, self.first_step = total, first_step
        self.enabled = enabled and not quiet()
        self.start = time.perf_counter()
        self.samples = 0.0
        self.bar: Any = None
        if self.enabled and (sys.stdout.isatty() if interactive is None else interactive):
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=first_step, unit="step", dynamic_ncols=True)

    def update(self, step: int, samples: float, logged: dict[str, Any] | None) -> None:
        """After ``step``, which trained on ``samples`` examples over all ranks;
        ``logged``: the ``metrics.jsonl`` row where this step was logged, else None."""
        if not self.enabled:
            return
        self.samples += samples
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            if logged is not None:
                self.bar.set_postfix(loss=f"{logged['loss']:.4f}", lr=f"{logged['lr']:.2e}")
            return
        if logged is None:
            return
        elapsed = time.perf_counter() - self.start
        line = progress_line(
            step,
            self.total,
            logged["loss"],
            logged["lr"],
            self.samples / elapsed if elapsed > 0 else 0.0,
            elapsed,
            eta_seconds(step, self.first_step, self.total, elapsed),
        )
        print(line, flush=True)

    def close(self) -> None:
        """End the bar (a no-op for plain lines)."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None
