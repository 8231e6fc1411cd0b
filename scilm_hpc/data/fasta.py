"""The FASTA reader: protein (or nucleotide) sequences with labels in their headers.

A record is a ``>`` header line followed by sequence lines (any number; a line may
be wrapped anywhere). Sequences are upper-cased, whitespace inside them is dropped
and one trailing ``*`` (a stop codon) is stripped. A record's label comes from a
``key=value`` field of its header, the key named by ``data.label_field``::

    >GB1_VDGV fitness=1.0 variant=VDGV
    MQYKLILNGKTLKGETTTEAVDAATAEKVFKQYANDNGVDGEWTYDDATKTFTVTE

Fields are separated by whitespace or ``|``; the header's first whitespace-separated
word is the record's id. Lines starting with ``;`` are comments. A record with no residue, a
sequence line before the first header or a missing label field is reported with
its line number.

Labels may instead come from a side CSV (``data.fasta_labels``): an ``id`` column
matching the records' ids and the ``data.label_field`` column; one table can serve
every split. A record without a row, a duplicated id or a missing column is an error.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Iterator
from pathlib import Path

from scilm_hpc.data.readers import FILE_START, Example, _decode_lines, _Problems, parse_values
from scilm_hpc.errors import UserError

#: the column of a side label table (``data.fasta_labels``) holding the record id
ID_COLUMN = "id"

_FIELD_SEPARATORS = re.compile(r"[\s|]+")


def header_fields(header: str) -> tuple[str, dict[str, str]]:
    """The record id (the header's first whitespace-separated word, ``sp|P69905|HBA``
    as a whole) and its ``key=value`` fields."""
    record_id = header.split()[0] if header.strip() else ""
    fields = {}
    for word in _FIELD_SEPARATORS.split(header.strip()):
        key, sep, value = word.partition("=")
        if sep and key:
            fields[key] = value
    return record_id, fields


def read_label_table(path: str | Path, label_field: str, delimiter: str = ",") -> dict[str, str]:
    """The side label table of FASTA records: record id -> the raw label.

    Raises:
        UserError: naming the file (and line) of a missing column or a duplicated id.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"data.fasta_labels: '{path}' does not exist")
    problems = _Problems(path)
    lines = list(_decode_lines(path, problems))  # a side table: small
    problems.raise_if_any()
    reader = csv.DictReader(io.StringIO("\n".join(text for _, text in lines)), delimiter=delimiter)
    header = reader.fieldnames or []
    for column, key in ((ID_COLUMN, "record ids"), (label_field, "data.label_field")):
        if column not in header:
            problems.add(
                1, f"no column '{column}' ({key}) in the header; columns: {', '.join(header)}"
            )
    problems.raise_if_any()
    table: dict[str, str] = {}
    for row in reader:
        record_id = (row.get(ID_COLUMN) or "").strip()
        if not record_id:
            continue
        if record_id in table:
            problems.add(reader.line_num, f"record id '{record_id}' appears twice")
        table[record_id] = (row.get(label_field) or "").strip()
    problems.raise_if_any()
    return table


def iter_fasta(
    path: Path,
    label_field: str | None,
    label_kind: str = "name",
    labels: dict[str, str] | None = None,
    start: tuple[int, int] = FILE_START,
    stop: int | None = None,
) -> Iterator[Example]:
    """Records of a FASTA file as examples (``text`` = the sequence), read lazily (from
    ``start`` to ``stop``: byte offsets of line starts, as ``readers._decode_lines``).

    Args:
        path: the FASTA file.
        label_field: the header key holding the label (None: no label, causal LM).
        label_kind: ``name`` (a class) or ``values`` (numbers: ``1.5`` or ``1.5,2``).
        labels: labels by record id (``read_label_table``) instead of header fields.

    Raises:
        UserError: naming file and line of every problem (up to ten).
    """
    problems = _Problems(path)
    examples: list[Example] = []  # the record just completed (none, or one)
    header: tuple[int, str] | None = None
    chunks: list[str] = []

    def flush() -> None:
        if header is None:
            return
        number, text = header
        record_id, fields = header_fields(text)
        name = f"record '{record_id}'" if record_id else "a record without an id"
        sequence = "".join(chunks).upper()
        sequence = sequence[:-1] if sequence.endswith("*") else sequence
        if not sequence:
            problems.add(number, f"{name} has no sequence (an empty record)")
            return
        source = f"{path}:{number}"
        if label_field is None:
            examples.append(Example(source=source, text=sequence))
            return
        present = ", ".join(fields) or "none"
        if labels is not None:
            raw = labels.get(record_id)
            if not raw:
                problems.add(number, f"{name}: no label in data.fasta_labels (id column)")
                return
        else:
            raw = fields.get(label_field)
        if raw is None or raw == "":
            problems.add(
                number,
                f"{name}: no '{label_field}=...' field (data.label_field) in the header; "
                f"fields present: {present}",
            )
            return
        if label_kind == "values":
            values = parse_values(raw)
            if values is None:
                problems.add(
                    number,
                    f"{name}: label '{label_field}={raw}' is not a number or a "
                    f"comma-separated list of numbers",
                )
                return
            examples.append(Example(source=source, text=sequence, values=values))
        else:
            examples.append(Example(source=source, text=sequence, label=raw))

    for number, line in _decode_lines(path, problems, start=start, stop=stop):
        if line.startswith(">"):
            flush()
            yield from examples
            examples.clear()
            header, chunks = (number, line[1:]), []
        elif line.startswith(";") or not line.strip():
            continue
        elif header is None:
            problems.add(number, "sequence line before the first '>' header; not a FASTA file?")
        else:
            chunks.append("".join(line.split()))
    flush()
    yield from examples
    problems.raise_if_any()
