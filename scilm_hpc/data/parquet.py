"""The Parquet reader: the records of a ``.parquet`` file, one record batch at a time.

Columns are named by the same keys as JSONL / CSV (``data.text_field``,
``data.label_field``, ``data.target_field``, ``data.references_field``), and each row
becomes the same ``Example`` a JSONL line with those fields would: a string column is
text, a list-of-strings column is one tag per word (per-residue labels) or a list of
words, a numeric or list-of-numbers column a regression target, an integer or string
column a class name. Only the configured columns are read, in record batches of
``BATCH_ROWS`` rows, row group by row group without read-ahead, so memory holds about
one row group and one batch, not the table.

A record is located as ``FILE:row N`` (1-based, over the whole file), which is the line
number of the same record in a JSONL file with one record a line. A configured column
the file lacks is an error listing the file's columns; a file that is not Parquet or is
damaged is an error naming it.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from scilm_hpc.data.readers import (
    MAX_REPORTED,
    Example,
    TargetFields,
    _Problems,
    _row_example,
)
from scilm_hpc.errors import UserError

#: rows per record batch read from a Parquet file
BATCH_ROWS = 1024
#: bytes read from the file at a time (a column chunk is read in pieces of this size)
READ_BUFFER = 1 << 20


class _RowProblems(_Problems):
    """Problems located by row (``FILE:row N``) rather than by line."""

    def add(self, line: int | None, message: str) -> None:
        if line is None:
            super().add(None, message)
            return
        self.lines.append(f"{self.path}:row {line}: {message}")
        if len(self.lines) >= MAX_REPORTED:
            self.raise_if_any()


def _damaged(path: Path, exc: Exception) -> UserError:
    return UserError(
        f"{path}: not a readable Parquet file ({exc}); is it damaged, or another format?"
    )


def iter_parquet(
    path: Path,
    text_field: str,
    label_field: str | None,
    label_kind: str = "name",
    targets: TargetFields | None = None,
) -> Iterator[Example]:
    """The rows of a Parquet file as examples, read lazily batch by batch.

    Args:
        path: the Parquet file.
        text_field: the column holding the text (or sequence, or list of words).
        label_field: the label column, or None (causal LM, seq2seq).
        label_kind: what the label holds (``readers.LABEL_KINDS``).
        targets: the target and references columns of a seq2seq corpus.

    Raises:
        UserError: a file that is not Parquet or cannot be decoded (naming it), a
            configured column the file lacks (listing its columns), or the problems of
            up to ten rows (naming each row).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        # pyarrow's defaults (pre_buffer, threads) read ahead across row groups and hold
        # most of a file in memory; without them it holds about one row group
        parquet = pq.ParquetFile(path, pre_buffer=False, buffer_size=READ_BUFFER)
    except (pa.ArrowException, OSError) as exc:
        raise _damaged(path, exc) from None
    present = parquet.schema_arrow.names
    wanted = [(text_field, "data.text_field"), (label_field, "data.label_field")]
    if targets is not None:
        wanted += [
            (targets.target, "data.target_field"),
            (targets.references, "data.references_field"),
        ]
    missing = [
        f"{path}: no column '{name}' ({key}); columns: {', '.join(present) or 'none'}"
        for name, key in wanted
        if name is not None and name not in present
    ]
    if missing:
        raise UserError(missing)
    columns = list(dict.fromkeys(name for name, _ in wanted if name is not None))
    problems = _RowProblems(path)
    number = 0
    batches = parquet.iter_batches(batch_size=BATCH_ROWS, columns=columns, use_threads=False)
    while True:
        try:
            batch = next(batches, None)
        except (pa.ArrowException, OSError) as exc:
            raise _damaged(path, exc) from None
        if batch is None:
            break
        for row in batch.to_pylist():
            number += 1
            record = {k: v for k, v in row.items() if v is not None}
            yield from _row_example(
                record,
                f"{path}:row {number}",
                number,
                text_field,
                label_field,
                problems,
                label_kind,
                targets,
            )
    problems.raise_if_any()
