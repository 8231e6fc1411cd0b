"""What a job prints while it runs: the quiet switch and periodic count lines.

``SCILM_QUIET=1`` (``scilm --quiet``, inherited by every rank) turns progress output
off. ``CountProgress`` reports work counted in items (records a prepare rank wrote,
examples an evaluate rank scored) as one plain line at most every ``every_s``
seconds, and once at the end, on stderr (stdout holds a command's result), e.g.::

    evaluate rank 0: 1200/4000 examples | 310.2 examples/s | elapsed 0:00:04 | ETA 0:00:09

(no ``/total`` and no ETA where the total is not known in advance). The training
loop's step lines are ``train.progress``.
"""

from __future__ import annotations

import os
import sys
import time

QUIET_ENV = "SCILM_QUIET"
#: Set to 0 for mpirun's ranks: the caller reads ``eval.json``, rank 0 need not print it.
SUMMARY_ENV = "SCILM_PRINT_SUMMARY"


def quiet() -> bool:
    """Whether progress output is off (``SCILM_QUIET`` set to 1, true or yes)."""
    return os.environ.get(QUIET_ENV, "").strip().lower() in {"1", "true", "yes"}


def clock(seconds: float) -> str:
    """``seconds`` as H:MM:SS."""
    whole = max(0, int(round(seconds)))
    return f"{whole // 3600}:{whole // 60 % 60:02d}:{whole % 60:02d}"


def count_line(label: str, done: int, total: int | None, unit: str, elapsed_s: float) -> str:
    """One progress line for ``done`` items of ``total`` (None: unknown)."""
    rate = done / elapsed_s if elapsed_s > 0 else 0.0
    of = f"/{total}" if total is not None else ""
    line = f"{label}: {done}{of} {unit} | {rate:.1f} {unit}/s | elapsed {clock(elapsed_s)}"
    if total is not None:
        eta = clock((total - done) / rate) if rate > 0 else "?"
        line += f" | ETA {eta}"
    return line


class CountProgress:
    """Periodic count lines for one rank's loop (see the module docstring).

    Args:
        label: what counts, e.g. ``prepare rank 1``.
        unit: the items' name, e.g. ``records``.
        total: the items this loop will count (None: unknown).
        enabled: False to print nothing (also when ``SCILM_QUIET`` is set).
        every_s: at least this many seconds between two lines.
    """

    def __init__(
        self, label: str, unit: str, total: int | None, enabled: bool = True, every_s: float = 10.0
    ) -> None:
        self.label, self.unit, self.total, self.every_s = label, unit, total, every_s
        self.enabled = enabled and not quiet()
        self.done = 0
        self.start = self.last = time.perf_counter()

    def update(self, count: int) -> None:
        """``count`` more items done; prints a line if ``every_s`` has passed."""
        self.done += count
        now = time.perf_counter()
        if self.enabled and now - self.last >= self.every_s:
            self.last = now
            self._print(now)

    def close(self) -> None:
        """The final line (the count reached and the whole time taken)."""
        if self.enabled:
            self._print(time.perf_counter())
            self.enabled = False

    def _print(self, now: float) -> None:
        line = count_line(self.label, self.done, self.total, self.unit, now - self.start)
        print(line, file=sys.stderr, flush=True)
