"""Corpus readers: JSONL, CSV, CoNLL, FASTA, text and Parquet into ``Example`` records.

Readers decode bytes themselves so that a file that is not UTF-8, a malformed
row or a missing field is reported with its file name and line number. They
collect up to ``MAX_REPORTED`` problems per file before raising one UserError,
so a user can fix a file in one pass.

Every reader is a generator (``iter_corpus``): it reads its file line by line and
yields each example as soon as it is complete, so memory does not grow with the
corpus (the prepare job streams a corpus larger than memory through them); the
problems of a file are raised when the iteration reaches them (ten at once) or
its end. ``read_corpus`` is the list of the same examples.

What a label is depends on the task (``label_kind``): a class name (``name``: a
string or integer), one or more numbers (``values``: regression), or one tag per
word (``tags``: a JSONL list beside a list of words, or beside a protein sequence
whose residues are the words).
"""

from __future__ import annotations

import csv
import gzip
import json
import math
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO, Any, cast

from scilm_hpc.errors import UserError

MAX_REPORTED = 10
LABEL_KINDS = ("name", "values", "tags")
#: where reading starts: (byte offset of a line start, that line's number); gzip: (0, 1)
FILE_START = (0, 1)
# the formats a reader can start at any record of (an uncompressed file)
SEEKABLE_FORMATS = ("jsonl", "csv", "text", "conll", "fasta")


@dataclass(frozen=True)
class Example:
    """One document (``text``) or one sentence (``words``) with its supervision.

    ``label`` is a document label (classification), ``tags`` one tag per word
    (token classification), ``values`` one or more numbers (regression); causal LM
    examples have none; seq2seq examples have a ``target`` text and the ``references``
    it is scored against. ``source`` is ``path:line`` of the row it came from, for
    error messages.
    """

    source: str
    text: str | None = None
    words: tuple[str, ...] | None = None
    label: str | None = None
    tags: tuple[str, ...] | None = None
    values: tuple[float, ...] | None = None
    target: str | None = None
    references: tuple[str, ...] | None = None


class _Problems:
    """Collects problems for one file and raises them together."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lines: list[str] = []

    def add(self, line: int | None, message: str) -> None:
        where = f"{self.path}:{line}" if line is not None else str(self.path)
        self.lines.append(f"{where}: {message}")
        if len(self.lines) >= MAX_REPORTED:
            self.raise_if_any()

    def raise_if_any(self) -> None:
        if self.lines:
            extra = (
                [f"{self.path}: stopped after {MAX_REPORTED} problems"]
                if len(self.lines) >= MAX_REPORTED
                else []
            )
            raise UserError(self.lines + extra)


def is_gzip(path: Path) -> bool:
    """Whether ``path`` is read through gzip (its name ends in ``.gz``)."""
    return path.name.endswith(".gz")


def open_binary(path: Path) -> IO[bytes]:
    """``path`` opened for reading bytes, decompressed when it is gzip (``is_gzip``).

    Raises:
        UserError: if it cannot be opened.
    """
    try:
        if is_gzip(path):
            return cast(IO[bytes], gzip.open(path, "rb"))
        return path.open("rb")
    except OSError as exc:
        raise UserError(f"{path}: cannot read ({exc.strerror})") from None


def damaged_gzip(path: Path, exc: BaseException) -> UserError:
    """The error for a gzip file that does not decompress (bad CRC, truncated, not gzip)."""
    return UserError(
        f"{path}: damaged or incomplete gzip file ({exc or type(exc).__name__}); "
        f"check the copy (gzip -t) or decompress it and pass the plain file"
    )


def iter_raw_lines(path: Path, offset: int = 0) -> Iterator[bytes]:
    """The raw lines of ``path`` from byte ``offset`` (0 for gzip), newline kept;
    a damaged gzip file raises ``damaged_gzip``."""
    handle = open_binary(path)
    with handle:
        if offset:
            handle.seek(offset)
        try:
            yield from handle
        except (OSError, EOFError, zlib.error) as exc:
            if not is_gzip(path):
                raise
            raise damaged_gzip(path, exc) from None


def _decode_lines(
    path: Path,
    problems: _Problems,
    for_csv: bool = False,
    start: tuple[int, int] = FILE_START,
    stop: int | None = None,
) -> Iterator[tuple[int, str]]:
    """(line number, text) pairs read lazily, and an empty line after a final newline;
    an undecodable line is reported with its byte column and skipped. ``for_csv``: the
    undecodable line is yielded too, with replacement characters, and no final empty
    line, so that a CSV parser counts lines as in the file. ``start``: the byte offset
    of a line start and its line number (reading part of a file); ``stop``: the byte
    offset of the line start to stop before (None: the end of the file)."""
    offset, first = start
    number = first - 1
    ended_with_newline = True  # an empty file reads as one empty line, as split() did
    for number, raw in enumerate(iter_raw_lines(path, offset), start=first):
        if stop is not None and offset >= stop:
            return
        offset += len(raw)
        if number == 1:
            raw = raw.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte order mark (Excel)
        ended_with_newline = raw.endswith(b"\n")
        line = raw[:-1] if ended_with_newline else raw
        try:
            yield number, line.decode("utf-8").rstrip("\r")
        except UnicodeDecodeError as exc:
            problems.add(
                number,
                f"not valid UTF-8 (byte 0x{line[exc.start]:02x} at column "
                f"{exc.start + 1}); re-encode the file as UTF-8",
            )
            if for_csv:
                yield number, line.decode("utf-8", errors="replace").rstrip("\r")
    if ended_with_newline and not for_csv:  # the empty piece after the last newline
        yield number + 1, ""


def _label_text(value: object) -> str | None:
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int | str):
        return str(value)
    return None


def read_jsonl(
    path: Path,
    text_field: str,
    label_field: str | None,
    label_kind: str = "name",
    targets: TargetFields | None = None,
) -> list[Example]:
    """Every example of a JSONL file (``iter_jsonl`` as a list)."""
    return list(iter_jsonl(path, text_field, label_field, label_kind, targets))


def iter_jsonl(
    path: Path,
    text_field: str,
    label_field: str | None,
    label_kind: str = "name",
    targets: TargetFields | None = None,
    start: tuple[int, int] = FILE_START,
) -> Iterator[Example]:
    """One JSON object a line with a text field and (unless None) a label field
    (``targets``: the target and reference fields of a seq2seq corpus), from line
    ``start`` (byte offset, line number) on."""
    problems = _Problems(path)
    for number, line in _decode_lines(path, problems, start=start):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            problems.add(number, f"not valid JSON ({exc.msg} at column {exc.colno})")
            continue
        if not isinstance(row, dict):
            problems.add(number, f"expected a JSON object, got {type(row).__name__}")
            continue
        yield from _row_example(
            row,
            f"{path}:{number}",
            number,
            text_field,
            label_field,
            problems,
            label_kind,
            targets,
        )
    problems.raise_if_any()


@dataclass(frozen=True)
class TargetFields:
    """Where a seq2seq record keeps its target (``data.target_field``) and, optionally,
    its list of references (``data.references_field``)."""

    target: str
    references: str | None = None


def _references(value: object) -> tuple[str, ...] | None:
    """A reference list from a JSON list, a JSON-list string (CSV) or one string."""
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return None
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        return None
    kept = tuple(v for v in value if v.strip())
    return kept or None


def _with_target(
    example: Example, row: dict, number: int, fields: TargetFields, problems: _Problems
) -> list[Example]:
    present = ", ".join(map(str, row)) or "none"
    target = row.get(fields.target)
    if not isinstance(target, str) or not target.strip():
        what = "missing" if target is None else "empty" if target == "" else "not a string"
        problems.add(
            number,
            f"target field '{fields.target}' (data.target_field) {what}"
            + (f": {target!r}" if what == "not a string" else "")
            + f"; fields present: {present}",
        )
        return []
    references: tuple[str, ...] | None = (target,)
    if fields.references is not None:
        references = _references(row.get(fields.references))
        if references is None:
            problems.add(
                number,
                f"references field '{fields.references}' (data.references_field) must be "
                f"a non-empty list of strings, got {row.get(fields.references)!r}",
            )
            return []
    return [replace(example, target=target, references=references)]


def _row_example(
    row: dict,
    source: str,
    number: int,
    text_field: str,
    label_field: str | None,
    problems: _Problems,
    label_kind: str = "name",
    targets: TargetFields | None = None,
) -> list[Example]:
    present = ", ".join(map(str, row)) or "none"
    text = row.get(text_field)
    if text is None:
        problems.add(
            number,
            f"missing text field '{text_field}' (data.text_field); fields present: {present}",
        )
        return []
    words_given = (
        label_kind == "tags" and isinstance(text, list) and all(isinstance(w, str) for w in text)
    )
    if not isinstance(text, str) and not words_given:
        allowed = "a string or a list of words" if label_kind == "tags" else "a string"
        problems.add(
            number, f"text field '{text_field}' must be {allowed}, got {type(text).__name__}"
        )
        return []
    if targets is not None:
        return _with_target(Example(source=source, text=text), row, number, targets, problems)
    if label_field is None:
        return [Example(source=source, text=text)]
    raw = row.get(label_field)
    if label_kind == "values":
        values = parse_values(raw)
        if values is None:
            problems.add(
                number,
                f"label field '{label_field}' (data.label_field) must be a number or a "
                f"list of numbers, got {raw!r}; fields present: {present}",
            )
            return []
        return [Example(source=source, text=text, values=values)]
    if label_kind == "tags":
        return _tagged_example(source, number, text, raw, label_field, problems)
    label = _label_text(raw)
    if label is None or label == "":
        what = "missing" if raw in (None, "") else "not a string or integer:"
        problems.add(
            number,
            f"label field '{label_field}' (data.label_field) {what} "
            f"{'' if what == 'missing' else repr(raw)}".rstrip()
            + f"; fields present: {present}",
        )
        return []
    return [Example(source=source, text=text, label=label)]


def parse_values(raw: object) -> tuple[float, ...] | None:
    """A regression label: a number, a list of numbers, or their text (CSV, FASTA
    headers: ``1.5``, ``[1.5, 2]`` or ``1.5,2``); None if it is not one (or not finite)."""
    if isinstance(raw, str):
        text = raw.strip()
        try:
            raw = json.loads(text) if text.startswith("[") else [float(v) for v in text.split(",")]
        except ValueError:
            return None
    items = raw if isinstance(raw, list) else [raw]
    numbers = [v for v in items if isinstance(v, int | float) and not isinstance(v, bool)]
    if not items or len(numbers) != len(items):
        return None
    values = tuple(float(v) for v in numbers)
    return values if all(math.isfinite(v) for v in values) else None


def _tagged_example(
    source: str,
    number: int,
    text: str | list[str],
    raw: object,
    label_field: str,
    problems: _Problems,
) -> list[Example]:
    """Words (a list, or a sequence's residues: one character each, whitespace and a
    trailing ``*`` ignored) with one tag each."""
    if isinstance(text, list):
        words = tuple(text)
    else:  # residues; a trailing stop codon is no residue
        words = tuple(c for c in text if not c.isspace())
        words = words[:-1] if words[-1:] == ("*",) else words
    if not isinstance(raw, list) or not raw or not all(isinstance(t, str) and t for t in raw):
        problems.add(
            number,
            f"label field '{label_field}' (data.label_field) must be a non-empty list of "
            f"tags (strings), one per word, got {raw!r:.60}",
        )
        return []
    if len(raw) != len(words):
        unit = "words" if isinstance(text, list) else "residues"
        problems.add(
            number, f"{len(raw)} tags in '{label_field}' for {len(words)} {unit}; need one each"
        )
        return []
    return [Example(source=source, words=words, tags=tuple(raw))]


def iter_csv(
    path: Path,
    text_field: str,
    label_field: str | None,
    delimiter: str = ",",
    label_kind: str = "name",
    targets: TargetFields | None = None,
    start: tuple[int, int] = FILE_START,
) -> Iterator[Example]:
    """A CSV file with a header row naming the text and label columns (``targets``: the
    target and reference columns of a seq2seq corpus; references as a JSON list);
    ``start`` (byte offset, line number) past the header reads from a row start on."""
    problems = _Problems(path)
    given: list[str] | None = None
    if start != FILE_START:  # the header row, from the file's first line
        head = (t + "\n" for _, t in _decode_lines(path, _Problems(path), for_csv=True))
        given = list(csv.DictReader(head, delimiter=delimiter).fieldnames or [])
        head.close()
    lines = (text + "\n" for _, text in _decode_lines(path, problems, for_csv=True, start=start))
    reader = csv.DictReader(lines, fieldnames=given, delimiter=delimiter)
    header = reader.fieldnames or []
    first_line = start[1] - 1
    wanted = [(text_field, "data.text_field"), (label_field, "data.label_field")]
    if targets is not None:
        wanted += [
            (targets.target, "data.target_field"),
            (targets.references, "data.references_field"),
        ]
    for field_name, key in wanted:
        if field_name is not None and field_name not in header:
            problems.add(
                1,
                f"no column '{field_name}' ({key}) in the header; columns: "
                f"{', '.join(header) or 'none'}",
            )
    problems.raise_if_any()
    try:
        for row in reader:
            number = first_line + reader.line_num
            if None in row:
                problems.add(
                    number, f"{len(header) + len(row[None])} columns, the header has {len(header)}"
                )
                continue
            if not any((v or "").strip() for v in row.values()):
                continue
            yield from _row_example(
                {k: v for k, v in row.items() if v is not None},
                f"{path}:{number}",
                number,
                text_field,
                label_field,
                problems,
                label_kind,
                targets,
            )
    except csv.Error as exc:
        problems.add(first_line + reader.line_num, f"malformed CSV ({exc})")
    problems.raise_if_any()


def conll_columns(line: str) -> list[str]:
    """A CoNLL line's columns: split at tabs where it has one, else at whitespace."""
    return line.split("\t") if "\t" in line else line.split()


def conll_break(line: str) -> bool:
    """Whether a CoNLL line ends a sentence: blank, or a ``-DOCSTART-`` line."""
    return not line.strip() or conll_columns(line)[0].startswith("-DOCSTART-")


def iter_conll(
    path: Path,
    token_column: int = 0,
    tag_column: int = -1,
    start: tuple[int, int] = FILE_START,
    stop: int | None = None,
) -> Iterator[Example]:
    """CoNLL: one token a line in tab- (or space-) separated columns, blank line between
    sentences, ``-DOCSTART-`` lines ignored (from ``start`` to ``stop``, as
    ``_decode_lines``)."""
    problems = _Problems(path)
    words: list[str] = []
    tags: list[str] = []
    first_line = 0  # of the sentence being read
    columns_seen: int | None = None
    need = (
        max(
            token_column if token_column >= 0 else -token_column - 1,
            tag_column if tag_column >= 0 else -tag_column - 1,
        )
        + 1
    )

    def flush() -> list[Example]:
        done = [Example(source=f"{path}:{first_line}", words=tuple(words), tags=tuple(tags))]
        words.clear()
        tags.clear()
        return done if done[0].words else []

    for number, line in _decode_lines(path, problems, start=start, stop=stop):
        if conll_break(line):
            yield from flush()
            continue
        cols = conll_columns(line)
        if len(cols) < max(need, 2):
            problems.add(
                number,
                f"expected at least {max(need, 2)} columns (token and tag, "
                f"data.token_column={token_column}, data.tag_column="
                f"{tag_column}), got {len(cols)}: {line[:60]!r}",
            )
            continue
        if columns_seen is not None and len(cols) != columns_seen:
            problems.add(number, f"{len(cols)} columns where earlier lines have {columns_seen}")
            continue
        columns_seen = len(cols)
        word, tag = cols[token_column].strip(), cols[tag_column].strip()
        if not word or not tag:
            problems.add(number, "empty token or tag column")
            continue
        if not words:
            first_line = number
        words.append(word)
        tags.append(tag)
    yield from flush()
    problems.raise_if_any()


def iter_text(path: Path, start: tuple[int, int] = FILE_START) -> Iterator[Example]:
    """Plain text, one document a line; blank lines are skipped (from line ``start``:
    byte offset, line number, on)."""
    problems = _Problems(path)
    for number, line in _decode_lines(path, problems, start=start):
        if line.strip():
            yield Example(source=f"{path}:{number}", text=line)
    problems.raise_if_any()


def read_corpus(path: str | Path, fmt: str, **options: Any) -> list[Example]:
    """Every example of one corpus file: ``iter_corpus`` (same keyword options) as a list.

    Raises:
        UserError: as ``iter_corpus``.
    """
    return list(iter_corpus(path, fmt, **options))


def iter_corpus(
    path: str | Path,
    fmt: str,
    *,
    text_field: str = "text",
    label_field: str | None = "label",
    token_column: int = 0,
    tag_column: int = -1,
    csv_delimiter: str = ",",
    label_kind: str = "name",
    targets: TargetFields | None = None,
    fasta_labels: str | None = None,
    start: tuple[int, int] = FILE_START,
    stop: int | None = None,
) -> Iterator[Example]:
    """The examples of one corpus file of format ``fmt`` (``jsonl``, ``csv``, ``conll``,
    ``fasta``, ``text``, ``parquet``), read lazily; ``label_kind`` (``LABEL_KINDS``) says
    what the label field holds, ``targets`` (JSONL, CSV, Parquet) reads a seq2seq target
    and its references, ``fasta_labels`` (FASTA) is a CSV of labels by record id. A name
    ending in ``.gz`` is read through gzip. ``start`` (JSONL, CSV, text, CoNLL, FASTA;
    not gzip): the byte offset of a record's first line and that line's number, to read
    from there on (``data.ranges`` finds them); ``stop`` (CoNLL, FASTA): the byte offset
    of a line start to stop reading before.

    Raises:
        UserError: naming the file and line of every problem found (up to ten; raised
            when the iteration reaches the tenth, or the end of the file), or saying
            the file holds no example at all (at its end).
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: corpus file does not exist")
    examples: Iterator[Example]
    if start != FILE_START and (fmt not in SEEKABLE_FORMATS or is_gzip(path)):
        raise ValueError(f"{path}: {fmt} is read from its start only")
    if stop is not None and fmt not in ("conll", "fasta"):
        raise ValueError(f"{path}: {fmt} is read to its end")
    if fmt == "jsonl":
        examples = iter_jsonl(path, text_field, label_field, label_kind, targets, start)
    elif fmt == "csv":
        examples = iter_csv(
            path, text_field, label_field, csv_delimiter, label_kind, targets, start
        )
    elif fmt == "conll":
        examples = iter_conll(path, token_column, tag_column, start, stop)
    elif fmt == "fasta":
        from scilm_hpc.data.fasta import iter_fasta, read_label_table

        table = None
        if fasta_labels is not None and label_field is not None:
            table = read_label_table(fasta_labels, label_field, csv_delimiter)
        examples = iter_fasta(path, label_field, label_kind, table, start, stop)
    elif fmt == "text":
        examples = iter_text(path, start)
    elif fmt == "parquet":
        from scilm_hpc.data.parquet import iter_parquet

        examples = iter_parquet(path, text_field, label_field, label_kind, targets)
    else:
        raise UserError(
            f"data.format: got {fmt!r}; allowed: jsonl, csv, conll, fasta, text, parquet"
        )
    empty = True
    for example in examples:
        empty = False
        yield example
    if empty and start == FILE_START and stop is None:
        raise UserError(f"{path}: the corpus is empty (no {fmt} example in it)")
