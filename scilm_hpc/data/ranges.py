"""Where each prepare rank reads: the corpus files cut into pieces, counted once, and
an index to start reading at any record without reading what comes before it.

A split's input is one file, a directory (its files, sorted by name) or a glob
pattern. The count runs over *pieces* spread over the ranks: an uncompressed JSONL,
plain-text, CSV, CoNLL or FASTA file is cut into one byte range per rank, each range
starting at the first line that starts inside it (so a line that straddles a boundary
is counted, and later read, exactly once); a gzip file (``.gz``: cannot seek) is one
piece, counted whole by one rank. Counting a line piece needs no parsing: a record is
a line that is not blank (JSONL, text) or, for CSV, a line past the header with any
value that is not blank; measured, this reads about 150 times faster than the readers
parse (docs/decisions.md). A CSV line with an odd number of quotes may open a quoted
newline: such a file is counted again whole, by the real reader, and read from its
start.

A FASTA record starts at a ``>`` line and belongs to the range that line starts in. A
CoNLL sentence starts at a line that is not a break (``readers.conll_break``: blank or
``-DOCSTART-``) after a break or at the file's start, and belongs to the range its
*anchor* starts in: the break line just before it (the file's start for a first
sentence). A range's count therefore looks past its end, up to the next record it does
not own (a sentence or a record's sequence across the cut), but counts the lines that
start inside it only. It runs over the mapped file: FASTA headers by ``bytes.find``,
CoNLL breaks among the candidates one regular expression finds (lines without a
printable ASCII character, ``-DOCSTART-`` lines), each checked with the reader's own
test. Its ``span`` (first own record, or the file's start, to the next record not its
own) is what the reader then parses (``corpus``), since a record counted here may still
hold a problem only the reader finds. A file counted whole (one rank) is counted by
its reader.

While counting, every ``MARK_EVERY``-th record of a line piece (and its first) is
marked with its byte offset and line number. After the ranks exchange their counts
every rank holds the same ``FileIndex`` per file: records, and marks where a reader
can start (``start_of``) and skip at most ``MARK_EVERY - 1`` records to any record.
"""

from __future__ import annotations

import csv
import glob
import heapq
import mmap
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from scilm_hpc.data.readers import (
    FILE_START,
    conll_break,
    is_gzip,
    iter_raw_lines,
    open_binary,
)
from scilm_hpc.errors import UserError

MARK_EVERY = 1024
LINE_FORMATS = ("jsonl", "text", "csv")
RECORD_FORMATS = ("conll", "fasta")
_PRINTABLE = bytes(range(0x21, 0x7F))
_BOM = b"\xef\xbb\xbf"


def corpus_files(given: str, key: str) -> list[Path]:
    """The files of one split: ``given`` is a file, a directory (its files, sorted; hidden
    ones skipped) or a glob pattern (its matches, sorted).

    Raises:
        UserError: naming ``key`` (``data.train``) when nothing matches.
    """
    path = Path(given)
    if path.is_file():
        return [path]
    if path.is_dir():
        found = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
        if not found:
            raise UserError(f"{key}: directory '{given}' holds no corpus file")
        return found
    if glob.has_magic(given):
        matched = sorted(Path(p) for p in glob.glob(given, recursive=True) if Path(p).is_file())
        if not matched:
            raise UserError(f"{key}: no file matches the pattern '{given}'")
        return matched
    raise UserError(f"{key}: file '{given}' does not exist")


def seekable(path: Path, fmt: str) -> bool:
    """Whether ``path`` can be cut into byte ranges: uncompressed, records found by
    their lines (one a line, or CoNLL sentences, FASTA records)."""
    return fmt in LINE_FORMATS + RECORD_FORMATS and not is_gzip(path)


@dataclass(frozen=True)
class Piece:
    """Bytes ``start`` to ``end`` of ``file`` (``end`` None: the whole file, from 0)."""

    file: int  # index into the job's list of files
    start: int = 0
    end: int | None = None


@dataclass
class PieceCount:
    """What counting a piece found: its records, the lines that start in it, marks
    (record in the piece, byte offset, line in the piece, from 0), and whether a CSV
    line had an odd number of quotes (a quoted newline may span lines)."""

    records: int = 0
    lines: int = 0
    marks: list[tuple[int, int, int]] = field(default_factory=list)
    odd_quotes: bool = False
    # CoNLL, FASTA: (first own record's byte offset, its line in the piece, byte offset
    # of the next record not its own or of the file's end), from the file's start for its
    # first range (lines before a first record are the reader's to judge); None: nothing to parse
    span: tuple[int, int, int] | None = None


@dataclass
class FileIndex:
    """A counted file: its records and where a reader may start, as (record, byte
    offset, line number) marks; a file read only from its start has ``(0, 0, 1)``."""

    path: Path
    records: int
    marks: list[tuple[int, int, int]]

    def start_of(self, record: int) -> tuple[int, tuple[int, int]]:
        """The last mark at or before ``record``: (its record, (byte offset, line number))."""
        lo, hi = 0, len(self.marks)
        while hi - lo > 1:  # the marks are in record order
            mid = (lo + hi) // 2
            if self.marks[mid][0] <= record:
                lo = mid
            else:
                hi = mid
        first, offset, line = self.marks[lo]
        return first, (offset, line)


def plan_pieces(files: list[Path], fmt: str, world_size: int) -> list[tuple[int, Piece]]:
    """(rank, piece) pairs: each seekable file cut into ``world_size`` byte ranges, one
    per rank; every other file whole, to the rank with the fewest bytes so far."""
    load = [0] * world_size
    planned = []
    for index, path in enumerate(files):
        size = path.stat().st_size
        if seekable(path, fmt) and world_size > 1:
            for rank in range(world_size):
                start, end = size * rank // world_size, size * (rank + 1) // world_size
                planned.append((rank, Piece(index, start, end)))
                load[rank] += end - start
        else:
            rank = load.index(min(load))
            planned.append((rank, Piece(index)))
            load[rank] += size
    return planned


def _is_record(line: bytes, fmt: str, delimiter: bytes) -> bool:
    """Whether a raw line is one record (JSONL, text: not blank; CSV: a value not blank),
    as the readers decide it; undecodable bytes count (the reader refuses them later)."""
    if fmt == "csv":
        values = line.translate(None, delimiter + b'"')
        if len(values.translate(None, _PRINTABLE)) < len(values):
            return True  # a printable character outside quotes and delimiters
        if not line.strip():
            return False
        text = line.decode("utf-8", errors="replace")
        for row in csv.reader([text], delimiter=delimiter.decode()):
            return any(v.strip() for v in row)
        return False
    stripped = line.strip()
    if not stripped:
        return False
    if 0x21 <= stripped[0] <= 0x7E:
        return True
    return bool(stripped.decode("utf-8", errors="replace").strip())


def _line_start(path: Path, offset: int) -> int:
    """The first line start at or after ``offset``."""
    if offset:
        with open_binary(path) as handle:
            handle.seek(offset - 1)
            if handle.read(1) != b"\n":
                offset += len(handle.readline())
    return offset


def _is_conll_break(line: bytes) -> bool:
    """``readers.conll_break`` of a raw line, decoding only lines it cannot decide on
    bytes: one that starts with a printable ASCII character after ASCII whitespace and
    holds no ``-DOCSTART-`` is no break."""
    stripped = line.strip()
    if stripped and 0x21 <= stripped[0] <= 0x7E and b"-DOCSTART-" not in stripped:
        return False
    return conll_break(line.decode("utf-8", errors="replace").rstrip("\r\n"))


# the newline before a CoNLL line that may be a break (blank, or no printable ASCII
# character at all); any other line holds a character ``str.strip`` keeps
_NO_ASCII_LINE_AFTER = re.compile(rb"\n(?=[^\x21-\x7e\n]*\n)")
_DOCSTART = b"-DOCSTART-"


def _line_at(data: mmap.mmap, start: int) -> bytes:
    """The line starting at ``start`` (no newline; a byte order mark at 0 removed)."""
    end = data.find(b"\n", start)
    line = data[start : end if end >= 0 else len(data)]
    return line.removeprefix(_BOM) if start == 0 else line


def _record_starts(data: mmap.mmap, fmt: str, offset: int) -> Iterator[tuple[int, int]]:
    """(anchor, first byte) of each record starting at or after the line start ``offset``
    (FASTA: both the ``>`` line; CoNLL: the break line before the sentence, or 0)."""
    size = len(data)
    if fmt == "fasta":
        if offset == 0 and _line_at(data, 0).startswith(b">"):
            yield 0, 0
        at = data.find(b"\n>", max(offset - 1, 0))
        while at >= 0:
            yield at + 1, at + 1
            at = data.find(b"\n>", at + 1)
        return
    maybe = heapq.merge(  # line starts of lines that may be breaks, in order
        (m.start() + 1 for m in _NO_ASCII_LINE_AFTER.finditer(data, max(offset - 1, 0))),
        _docstart_lines(data, offset),
    )
    if offset == 0:
        maybe = heapq.merge([0], maybe)
    last = -1
    for anchor in maybe:
        if anchor == last or anchor >= size:
            continue
        last = anchor
        line, after = _line_at(data, anchor), data.find(b"\n", anchor) + 1
        if not _is_conll_break(line):
            if anchor == 0:  # a first sentence on the file's first line
                yield 0, 0
        elif 0 < after < size and not _is_conll_break(_line_at(data, after)):
            yield anchor, after


def _docstart_lines(data: mmap.mmap, offset: int) -> Iterator[int]:
    """The starts of the lines at or after ``offset`` that hold ``-DOCSTART-``."""
    at = data.find(_DOCSTART, offset)
    while at >= 0:
        yield data.rfind(b"\n", 0, at) + 1
        at = data.find(_DOCSTART, at + 1)


def _newlines(data: mmap.mmap, start: int, end: int) -> int:
    """The newlines in bytes ``start`` to ``end``, counted 64 MiB at a time."""
    step = 64 << 20
    return sum(data[at : min(at + step, end)].count(b"\n") for at in range(start, end, step))


def count_records(path: Path, fmt: str, piece: Piece) -> PieceCount:
    """Count the CoNLL sentences or FASTA records a piece owns (module docstring)
    without parsing them, marking every ``MARK_EVERY``-th and the first; the file is
    mapped, and only candidate lines are looked at in Python.

    Raises:
        UserError: when the file cannot be read.
    """
    count = PieceCount()
    offset = _line_start(path, piece.start)
    try:
        handle = path.open("rb")
    except OSError as exc:
        raise UserError(f"{path}: cannot read ({exc.strerror})") from None
    with handle:
        size = os.fstat(handle.fileno()).st_size
        if size == 0:
            return count
        with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
            end = min(piece.end if piece.end is not None else size, size)
            if offset < end:  # the lines that start in the piece
                count.lines = 1 + _newlines(data, offset, end - 1)
            stop, seen, lines = size, offset, 0
            for anchor, first in _record_starts(data, fmt, offset):
                if anchor >= end:
                    stop = first
                    break
                if count.records % MARK_EVERY == 0:
                    lines += _newlines(data, seen, first)
                    seen = first
                    count.marks.append((count.records, first, lines))
                count.records += 1
    if piece.start == 0 and end > 0:  # the file's first range parses what precedes a record
        count.span = (0, 0, stop)
    elif count.marks:
        count.span = (count.marks[0][1], count.marks[0][2], stop)
    return count


def count_piece(path: Path, fmt: str, piece: Piece, csv_delimiter: str = ",") -> PieceCount:
    """Count the records of a line-format piece (JSONL, text, CSV; a gzip file whole)
    without parsing them, marking every ``MARK_EVERY``-th and the first.

    Raises:
        UserError: when the file cannot be read or its gzip stream is damaged.
    """
    count = PieceCount()
    delimiter = csv_delimiter.encode()
    offset = _line_start(path, piece.start)  # the first line that starts in the piece
    header = fmt == "csv" and offset == 0
    marking = not is_gzip(path)  # a gzip file is read from its start only
    for raw in iter_raw_lines(path, offset):
        if piece.end is not None and offset >= piece.end:
            break
        line = raw.removeprefix(_BOM) if offset == 0 else raw
        if header:
            header = False
        elif _is_record(line, fmt, delimiter):
            if marking and count.records % MARK_EVERY == 0:
                count.marks.append((count.records, offset, count.lines))
            count.records += 1
        if fmt == "csv" and raw.count(b'"') % 2:
            count.odd_quotes = True
        count.lines += 1
        offset += len(raw)
    return count


def lines_before(pieces: list[Piece], counts: list[PieceCount]) -> list[int]:
    """Per piece, the lines of its file that start before it (in the earlier pieces)."""
    before = [0] * len(pieces)
    lines: dict[int, int] = {}
    for i in sorted(range(len(pieces)), key=lambda i: (pieces[i].file, pieces[i].start)):
        before[i] = lines.get(pieces[i].file, 0)
        lines[pieces[i].file] = before[i] + counts[i].lines
    return before


def index_files(
    files: list[Path],
    pieces: list[Piece],
    counts: list[PieceCount],
    whole: Callable[[int], int | None] | None = None,
) -> list[FileIndex]:
    """Every file's index from the counts of its pieces (in file and byte order; a
    file's marks are those of its pieces, none for gzip); ``whole(file)`` overrides a
    file's count (records of a file counted whole by its reader, which is then read
    from its start only) where it returns one."""
    by_file: dict[int, list[tuple[Piece, PieceCount]]] = {}
    for piece, count in zip(pieces, counts, strict=True):
        by_file.setdefault(piece.file, []).append((piece, count))
    indexes = []
    for number, path in enumerate(files):
        override = whole(number) if whole is not None else None
        parts = sorted(by_file.get(number, []), key=lambda pc: pc[0].start)
        if override is not None:
            indexes.append(FileIndex(path, override, [(0, *FILE_START)]))
            continue
        records, lines, marks = 0, 0, [(0, *FILE_START)]
        for _, count in parts:
            marks += [(records + r, offset, lines + ln + 1) for r, offset, ln in count.marks]
            records += count.records
            lines += count.lines
        indexes.append(FileIndex(path, records, marks))
    return indexes
