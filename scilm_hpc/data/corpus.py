"""A prepare job's corpus as one stream of examples per split, never held whole.

The raw files are read lazily (``readers.iter_corpus``), once to count and check
them (``SplitStreams.count``) and again for whatever a later step needs: the label
map, what a task learns from the training split, and the examples of the shards a
rank writes (``ShardFeed``), one shard's worth at a time. What stays in memory does
not grow with the text of the corpus: the counts, and for a ratio split one byte per
training record saying which split it belongs to (the shuffle that decides it holds
eight bytes per record while it runs).

The splits, their order, the ratio split and the residue check give exactly the
examples the in-memory reading gave: the same shards, byte for byte.
"""

from __future__ import annotations

import random
from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import numpy as np

from scilm_hpc.data.readers import Example, TargetFields, iter_corpus
from scilm_hpc.data.residues import ResidueChecker
from scilm_hpc.errors import UserError


@dataclass(frozen=True)
class ReadOptions:
    """How the corpus files are read (``iter_corpus``'s keyword arguments)."""

    fmt: str
    text_field: str = "text"
    label_field: str | None = "label"
    token_column: int = 0
    tag_column: int = -1
    csv_delimiter: str = ","
    label_kind: str = "name"
    targets: TargetFields | None = None
    fasta_labels: str | None = None

    def read(self, path: Path) -> Iterator[Example]:
        """The examples of ``path``, lazily."""
        return iter_corpus(
            path,
            self.fmt,
            text_field=self.text_field,
            label_field=self.label_field,
            token_column=self.token_column,
            tag_column=self.tag_column,
            csv_delimiter=self.csv_delimiter,
            label_kind=self.label_kind,
            targets=self.targets,
            fasta_labels=self.fasta_labels,
        )


def ratio_membership(n: int, ratios: dict[str, float], seed: int) -> tuple[np.ndarray, list[str]]:
    """Which split each of ``n`` training records goes to under a ratio split.

    The same draw as shuffling ``list(range(n))`` with ``random.Random(seed)`` and
    cutting ``max(1, round(ratio * n))`` records per split off its front, in the
    order of ``ratios``; the shuffle runs on an ``array`` (8 bytes a record, not a
    list of Python ints).

    Returns:
        One code per record (uint8, an index into the names) and the names: ``train``
        first, then each split that has a ratio.

    Raises:
        UserError: if the ratios leave no training record.
    """
    order = array("q", range(n))
    random.Random(seed).shuffle(order)
    drawn = np.frombuffer(order, dtype=np.int64)
    member = np.zeros(n, dtype=np.uint8)
    names = ["train"]
    cut = 0
    for split, ratio in ratios.items():
        if ratio > 0:
            count = max(1, round(ratio * n))
            names.append(split)
            member[drawn[cut : cut + count]] = len(names) - 1
            cut += count
    if cut >= n:
        raise UserError("data.split: the ratio split leaves no training example")
    return member, names


class SplitStreams:
    """The splits of a corpus (files, and a ratio split of the training file) as
    streams of examples, each residue-checked when ``checker`` is given.

    Args:
        files: the raw file of each split given (``data.train``, ...); train required.
        options: how to read them.
        ratios: ``data.split.{dev,test}_ratio`` by split.
        seed: ``data.split.seed``.
        checker: makes a fresh residue checker (protein corpora), or None.

    Raises:
        UserError: when no training file is given.
    """

    def __init__(
        self,
        files: dict[str, Path],
        options: ReadOptions,
        ratios: dict[str, float],
        seed: int,
        checker: Callable[[], ResidueChecker] | None = None,
    ) -> None:
        if "train" not in files:
            raise UserError("data.train: required for prepare: the training corpus file")
        self.files, self.options = files, options
        self.ratios, self.seed = ratios, seed
        self._checker = checker
        self.residues: ResidueChecker | None = None  # the checker of the counting pass
        self.member: np.ndarray | None = None
        self.member_names: list[str] = []
        self.counts: dict[str, int] = {}

    def count(self) -> dict[str, int]:
        """Read every file once: check it (reader problems, then residues), count its
        examples and draw the ratio split.

        Returns:
            The number of examples of each split, in the order the shards are planned.

        Raises:
            UserError: the problems of the first file that has any, then the residue
                problems of all of them.
        """
        self.residues = self._checker() if self._checker is not None else None
        in_file: dict[str, int] = {}
        for split, path in self.files.items():
            n = 0
            for example in self.options.read(path):
                if self.residues is not None:
                    self.residues.example(example)
                n += 1
            in_file[split] = n
        if self.residues is not None:
            self.residues.raise_problems()
        counts = dict(in_file)
        if any(self.ratios.values()):
            self.member, self.member_names = ratio_membership(
                in_file["train"], self.ratios, self.seed
            )
            for code, split in enumerate(self.member_names):
                counts[split] = int(np.count_nonzero(self.member == code))
        self.counts = counts
        return counts

    def examples(self, split: str) -> Iterator[Example]:
        """The examples of ``split``, in order, read lazily from its file (``count``
        first)."""
        checker = self._checker() if self._checker is not None else None
        if self.member is not None and split in self.member_names:
            code = self.member_names.index(split)
            member = self.member
            stream: Iterator[Example] = (
                ex
                for i, ex in enumerate(self.options.read(self.files["train"]))
                if member[i] == code
            )
        else:
            stream = self.options.read(self.files[split])
        for example in stream:
            yield checker.example(example) if checker is not None else example


class ShardFeed:
    """The examples of one shard at a time, for shards taken in ascending order within
    each split: each split's stream is read once, skipping the shards of other ranks."""

    def __init__(self, streams: SplitStreams) -> None:
        self.streams = streams
        self._open: dict[str, tuple[Iterator[Example], int]] = {}

    def take(self, split: str, lo: int, hi: int) -> list[Example]:
        """Examples ``lo`` to ``hi`` (exclusive) of ``split``."""
        stream, position = self._open.get(split) or (self.streams.examples(split), 0)
        assert lo >= position, f"{split}: shard at {lo} taken after {position}"
        for _ in islice(stream, lo - position):  # other ranks' shards: read, not kept
            pass
        batch = list(islice(stream, hi - lo))
        if len(batch) != hi - lo:
            raise UserError(
                f"data.{split}: fewer examples than counted a moment ago; was the corpus "
                f"file changed while it was being prepared?"
            )
        self._open[split] = (stream, hi)
        return batch
