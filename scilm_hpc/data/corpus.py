"""A prepare job's corpus as one stream of examples per split, never held whole.

The ranks first count the records of every file together, each its own pieces
(``data.ranges``: byte ranges of large files, whole gzip files), and exchange the
counts and the marks where reading may start. From then on a split's examples are a
stream that starts at any example (``SplitStreams.examples``): a rank reads the part
of the corpus that holds its own shards (``ShardFeed``), one shard's worth at a
time, and nothing before it. What stays in memory does not grow with the text of the
corpus: the counts, one mark per ``ranges.MARK_EVERY`` records, and for a ratio split
one byte per training record saying which split it belongs to (the shuffle that
decides it holds eight bytes per record while it runs).

The splits, their order, the ratio split and the residue check give exactly the
examples the in-memory reading gave: the same shards, byte for byte, on any number
of ranks.
"""

from __future__ import annotations

import random
from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from itertools import islice
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from scilm_hpc.data import ranges
from scilm_hpc.data.readers import FILE_START, Example, TargetFields, iter_corpus
from scilm_hpc.data.residues import ResidueChecker
from scilm_hpc.errors import UserError
from scilm_hpc.runtime.dist import Communicator

T = TypeVar("T")


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

    def read(
        self, path: Path, start: tuple[int, int] = FILE_START, stop: int | None = None
    ) -> Iterator[Example]:
        """The examples of ``path``, lazily, from ``start`` (byte offset, line number)
        to ``stop`` (a byte offset; CoNLL and FASTA only)."""
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
            start=start,
            stop=stop,
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


def on_every_rank(comm: Communicator, work: Callable[[], T]) -> list[T]:
    """Run ``work`` on every rank and hand every rank the results of all, in rank order.

    Raises:
        UserError: on every rank, when ``work`` raised one on any: the problems of all
            ranks that had any, in rank order (ten at most).
    """
    try:
        outcome: tuple[bool, Any] = (True, work())
    except UserError as exc:
        outcome = (False, exc.problems)
    gathered = comm.bcast(comm.gather(outcome))
    problems = [p for ok, value in gathered if not ok for p in value]
    if problems:
        raise UserError(
            problems[:10] + ([f"... and {len(problems) - 10} more"] * (len(problems) > 10))
        )
    return [value for _, value in gathered]


def nth_member(member: np.ndarray, code: int, n: int, chunk: int = 1 << 20) -> int:
    """The record index of the ``n``-th record (from 0) whose ``member`` code is ``code``,
    or ``len(member)`` if there are not that many; looked up a chunk at a time (the
    indices of a whole split would take eight bytes a record)."""
    seen = 0
    for lo in range(0, len(member), chunk):
        hits = member[lo : lo + chunk] == code
        count = int(np.count_nonzero(hits))
        if seen + count > n:
            return lo + int(np.flatnonzero(hits)[n - seen])
        seen += count
    return len(member)


class SplitStreams:
    """The splits of a corpus (files, and a ratio split of the training files) as
    streams of examples, each residue-checked when ``checker`` is given.

    Args:
        files: the raw files of each split given (``data.train``, ...); train required.
        options: how to read them.
        ratios: ``data.split.{dev,test}_ratio`` by split.
        seed: ``data.split.seed``.
        checker: makes a fresh residue checker (protein corpora), or None.

    Raises:
        UserError: when no training file is given.
    """

    def __init__(
        self,
        files: dict[str, list[Path]],
        options: ReadOptions,
        ratios: dict[str, float],
        seed: int,
        checker: Callable[[], ResidueChecker] | None = None,
    ) -> None:
        if "train" not in files:
            raise UserError("data.train: required for prepare: the training corpus file")
        self.files, self.options = files, options
        self.ratios, self.seed = ratios, seed
        self.checker = checker
        self.index: dict[str, list[ranges.FileIndex]] = {}
        self.member: np.ndarray | None = None
        self.member_names: list[str] = []
        self.counts: dict[str, int] = {}

    def count(self, comm: Communicator) -> dict[str, int]:
        """Count every file's records, each rank its own pieces (``ranges.plan_pieces``),
        exchange the counts and draw the ratio split: every rank ends with the same
        index and counts.

        Returns:
            The number of examples of each split, in the order the shards are planned.

        Raises:
            UserError: on every rank, for a file that cannot be read or holds no example.
        """
        fmt = self.options.fmt
        flat = [path for paths in self.files.values() for path in paths]
        planned = ranges.plan_pieces(flat, fmt, comm.world_size)
        pieces = [piece for _, piece in planned]
        mine = [i for i, (rank, _) in enumerate(planned) if rank == comm.rank]

        def count_mine() -> dict[int, ranges.PieceCount]:
            return {i: self._count_piece(flat[pieces[i].file], pieces[i]) for i in mine}

        counted: dict[int, ranges.PieceCount] = {}
        for part in on_every_rank(comm, count_mine):
            counted.update(part)
        counts = [counted[i] for i in range(len(pieces))]
        # a CSV file with an odd number of quotes on a line: counted again whole by its reader
        recount = sorted({p.file for p, c in zip(pieces, counts, strict=True) if c.odd_quotes})
        whole: dict[int, int] = {}
        if recount:

            def recount_mine() -> dict[int, int]:
                return {
                    f: sum(1 for _ in self.options.read(flat[f]))
                    for k, f in enumerate(recount)
                    if k % comm.world_size == comm.rank
                }

            for part_whole in on_every_rank(comm, recount_mine):
                whole.update(part_whole)
        if fmt in ranges.RECORD_FORMATS:
            on_every_rank(comm, partial(self._parse_spans, flat, pieces, counts, mine))
        indexes = ranges.index_files(flat, pieces, counts, whole.get)
        empty = [ix.path for ix in indexes if ix.records == 0]
        if empty:
            raise UserError([f"{p}: the corpus is empty (no {fmt} example in it)" for p in empty])
        position = 0
        for split, paths in self.files.items():
            self.index[split] = indexes[position : position + len(paths)]
            position += len(paths)
        counts_by_split = {s: sum(ix.records for ix in self.index[s]) for s in self.files}
        if any(self.ratios.values()):
            self.member, self.member_names = ratio_membership(
                counts_by_split["train"], self.ratios, self.seed
            )
            for code, split in enumerate(self.member_names):
                counts_by_split[split] = int(np.count_nonzero(self.member == code))
        self.counts = counts_by_split
        return counts_by_split

    def _count_piece(self, path: Path, piece: ranges.Piece) -> ranges.PieceCount:
        """A piece's count: lines counted (JSONL, text, CSV, gzip or not), records found
        by their lines (a byte range of a CoNLL or FASTA file), or records read (a whole
        CoNLL or FASTA file, on one rank or gzip; Parquet)."""
        fmt = self.options.fmt
        if fmt in ranges.LINE_FORMATS:
            return ranges.count_piece(path, fmt, piece, self.options.csv_delimiter)
        if piece.end is not None:
            return ranges.count_records(path, fmt, piece)
        assert piece.end is None
        return ranges.PieceCount(records=sum(1 for _ in self.options.read(path)))

    def _parse_spans(
        self,
        files: list[Path],
        pieces: list[ranges.Piece],
        counts: list[ranges.PieceCount],
        mine: list[int],
    ) -> None:
        """Parse this rank's CoNLL or FASTA pieces with the reader, which raises the
        problems it finds (naming lines from the start of the file), and check that it
        finds the records counted.

        Raises:
            UserError: for a problem in a record, or a count the reader does not confirm.
        """
        lines_before = ranges.lines_before(pieces, counts)
        for i in mine:
            span, path = counts[i].span, files[pieces[i].file]
            if span is None:
                continue
            offset, line, stop = span
            found = sum(
                1 for _ in self.options.read(path, (offset, lines_before[i] + line + 1), stop)
            )
            if found != counts[i].records:
                raise UserError(
                    f"{path}: {counts[i].records} records start between bytes {offset} and "
                    f"{stop}, the {self.options.fmt} reader found {found} there"
                )

    def _records(self, source: str, first: int) -> Iterator[Example]:
        """The records of ``source``'s files from record ``first`` (counted over its
        files in order) on, read from the last mark before it."""
        for ix in self.index[source]:
            if first >= ix.records:
                first -= ix.records
                continue
            mark, start = ix.start_of(first)
            stream = self.options.read(ix.path, start)
            for _ in islice(stream, first - mark):  # at most MARK_EVERY - 1 records
                pass
            yield from stream
            first = 0

    def examples(
        self, split: str, start: int = 0, checker: ResidueChecker | None = None
    ) -> Iterator[Example]:
        """The examples of ``split``, in order, from its ``start``-th on, read lazily
        (``count`` first); residue-checked by ``checker`` (or a fresh one) in a protein
        corpus."""
        if checker is None and self.checker is not None:
            checker = self.checker()
        stream: Iterator[Example]
        if self.member is not None and split in self.member_names:
            code = self.member_names.index(split)
            member = self.member
            first = nth_member(member, code, start)
            stream = (
                ex
                for i, ex in enumerate(self._records("train", first), start=first)
                if member[i] == code
            )
        else:
            stream = self._records(split, start)
        for example in stream:
            yield checker.example(example) if checker is not None else example


class ShardFeed:
    """The examples of one shard at a time, for shards taken in ascending order within
    each split: a split's stream is opened at the first shard asked for and read on,
    and opened again (from the nearest mark) when a shard further on is asked for."""

    def __init__(self, streams: SplitStreams, checker: ResidueChecker | None = None) -> None:
        self.streams = streams
        self.checker = checker
        self._open: dict[str, tuple[Iterator[Example], int]] = {}

    def take(self, split: str, lo: int, hi: int) -> list[Example]:
        """Examples ``lo`` to ``hi`` (exclusive) of ``split``."""
        stream, position = self._open.get(split, (None, -1))
        if stream is None or position != lo:
            stream, position = self.streams.examples(split, lo, self.checker), lo
        batch = list(islice(stream, hi - lo))
        if len(batch) != hi - lo:
            raise UserError(
                f"data.{split}: fewer examples than counted a moment ago; was the corpus "
                f"file changed while it was being prepared?"
            )
        self._open[split] = (stream, hi)
        return batch
