"""Stragglers: a rank persistently slower than the others.

In a synchronous data-parallel step every rank's wall time is the slowest rank's: they
meet in the gradient reductions. What differs between ranks is the work each does
before its first collective of the step: reading and collating its batches and the
forward passes (no collective inside the forward below ZeRO stage 3). The training
loop times that per rank (``local_s``) and sums it into the step's all-reduce it does
anyway (one slot per rank, so every rank gets all of them for ``world`` extra numbers),
logs it in ``metrics.jsonl`` as ``rank_local_s``, and feeds it to a ``StragglerDetector``
on rank 0.

The detector keeps the last ``window`` steps. Once it has a full window, a rank whose
median over it exceeds ``factor`` times the median of all ranks' medians (and by more
than ``MIN_GAP_S``, so that microsecond jitter on tiny models is no straggler) is
reported once, and again only after it has recovered and slowed down anew. Under ZeRO
stage 3 the forward gathers parameters from every rank, which makes the ranks' times
converge: a straggler shows less there.
"""

from __future__ import annotations

import statistics
from collections import deque

#: A rank must be this many seconds slower than the median (per step) to count.
MIN_GAP_S = 0.005
DEFAULT_WINDOW = 20


class StragglerDetector:
    """Finds ranks persistently slower than the median (see the module docstring).

    Args:
        factor: ``train.straggler_factor`` (a rank slower than ``factor`` x the median).
        window: how many steps a rank must be slow over (medians over this window).
    """

    def __init__(self, factor: float, window: int = DEFAULT_WINDOW) -> None:
        self.factor, self.window = factor, window
        self._steps: deque[list[float]] = deque(maxlen=window)
        self.flagged: set[int] = set()

    def update(self, local_s: list[float]) -> list[tuple[int, float, float]]:
        """Add one step's per-rank seconds. Returns the ranks that just became
        stragglers: (rank, its median seconds, the median of all ranks)."""
        self._steps.append(list(local_s))
        if self.factor <= 0 or len(self._steps) < self.window or len(local_s) < 2:
            return []
        per_rank = [statistics.median(step[r] for step in self._steps) for r in range(len(local_s))]
        typical = statistics.median(per_rank)
        slow = {
            rank
            for rank, seconds in enumerate(per_rank)
            if seconds > self.factor * typical and seconds - typical > MIN_GAP_S
        }
        new = sorted(slow - self.flagged)
        self.flagged = slow
        return [(rank, per_rank[rank], typical) for rank in new]


def straggler_message(rank: int, seconds: float, typical: float, factor: float, window: int) -> str:
    """The warning line for a rank ``update`` returned."""
    ratio = f"{seconds / typical:.1f}x" if typical > 0 else "more than"
    return (
        f"straggler: rank {rank} took {seconds * 1000:.1f} ms per step before its first "
        f"collective (median over {window} steps), {ratio} the ranks' "
        f"median of {typical * 1000:.1f} ms (train.straggler_factor={factor}); every "
        f"rank waits for it"
    )
