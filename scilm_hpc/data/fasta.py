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
"""

from __future__ import annotations

import re
from pathlib import Path

from scilm_hpc.data.readers import Example, _decode_lines, _Problems, parse_values

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


def read_fasta(path: Path, label_field: str | None, label_kind: str = "name") -> list[Example]:
    """Records of a FASTA file as examples (``text`` = the sequence).

    Args:
        path: the FASTA file.
        label_field: the header key holding the label (None: no label, causal LM).
        label_kind: ``name`` (a class) or ``values`` (numbers: ``1.5`` or ``1.5,2``).

    Raises:
        UserError: naming file and line of every problem (up to ten).
    """
    problems = _Problems(path)
    examples: list[Example] = []
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
        raw = fields.get(label_field)
        present = ", ".join(fields) or "none"
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

    for number, line in _decode_lines(path, problems):
        if line.startswith(">"):
            flush()
            header, chunks = (number, line[1:]), []
        elif line.startswith(";") or not line.strip():
            continue
        elif header is None:
            problems.add(number, "sequence line before the first '>' header; not a FASTA file?")
        else:
            chunks.append("".join(line.split()))
    flush()
    problems.raise_if_any()
    return examples
