"""Deterministic, resumable distributed batching over a ShardDataset.

The order of an epoch is a flat sequence of example indices that depends only
on (seed, epoch, micro-batch size, bucketing): a seeded permutation; with
length bucketing, the permutation is cut into chunks, each chunk sorted by
length and cut into micro-batch blocks, and the blocks shuffled within the
chunk. A global micro-step takes ``world_size`` consecutive blocks, one per
rank. The position saved in a checkpoint is (epoch, samples consumed in the
epoch), so a resumed run, on the same or on another number of ranks, continues
at exactly the next unseen example: nothing replayed, nothing skipped.
Incomplete global steps at the end of an epoch are dropped (every rank does
the same amount of work).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np


@dataclass
class SamplerPosition:
    """Where training stands in the data stream."""

    epoch: int = 0
    samples_in_epoch: int = 0


def epoch_order(
    lengths: np.ndarray,
    seed: int,
    epoch: int,
    micro_batch_size: int,
    bucketing: bool,
    chunk_size: int = 2048,
) -> np.ndarray:
    """The flat example order of one epoch (see module docstring)."""
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths))
    if not bucketing:
        return order
    pieces, tails = [], []
    for start in range(0, len(order), chunk_size):
        chunk = order[start : start + chunk_size]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        full = len(chunk) // micro_batch_size * micro_batch_size
        blocks = [chunk[i : i + micro_batch_size] for i in range(0, full, micro_batch_size)]
        for b in rng.permutation(len(blocks)):
            pieces.append(blocks[b])
        if full < len(chunk):  # a short block would mix two buckets: move it to the end
            tails.append(chunk[full:])
    pieces += tails
    return np.concatenate(pieces) if pieces else order


class ResumableBatches:
    """Micro-batches of example indices for one rank, resumable at a global step.

    Args:
        lengths: token count of every example of the split.
        micro_batch_size: examples per rank per micro-step.
        gradient_accumulation: micro-steps per optimizer step.
        world_size: number of ranks; rank: this rank.
        seed: data-order seed; bucketing: length-bucketed batches.
    """

    def __init__(
        self,
        lengths: np.ndarray,
        micro_batch_size: int,
        gradient_accumulation: int,
        world_size: int,
        rank: int,
        seed: int,
        bucketing: bool,
    ) -> None:
        self.lengths = lengths
        self.micro = micro_batch_size
        self.accum = gradient_accumulation
        self.world = world_size
        self.rank = rank
        self.seed = seed
        self.bucketing = bucketing

    @property
    def samples_per_step(self) -> int:
        """Examples consumed by all ranks in one optimizer step."""
        return self.micro * self.accum * self.world

    @property
    def steps_per_epoch(self) -> int:
        """Full optimizer steps in an epoch (the rest of the epoch is dropped)."""
        return len(self.lengths) // self.samples_per_step

    def step_batches(
        self, position: SamplerPosition
    ) -> Iterator[tuple[SamplerPosition, list[np.ndarray]]]:
        """Yield (position after the step, this rank's micro-batches) for each step,
        starting at ``position`` and running forever across epochs."""
        epoch, consumed = position.epoch, position.samples_in_epoch
        while True:
            order = epoch_order(self.lengths, self.seed, epoch, self.micro, self.bucketing)
            if self.steps_per_epoch == 0:
                raise ValueError("fewer examples than one optimizer step needs")
            while consumed + self.samples_per_step <= len(order):
                micro_batches = []
                for a in range(self.accum):
                    start = consumed + (a * self.world + self.rank) * self.micro
                    micro_batches.append(order[start : start + self.micro])
                consumed += self.samples_per_step
                yield SamplerPosition(epoch, consumed), micro_batches
            epoch, consumed = epoch + 1, 0
