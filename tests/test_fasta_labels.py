"""FASTA labels from a side CSV (``data.fasta_labels``): matched by record id, problems
named with file and line, refused for other formats."""

from __future__ import annotations

from pathlib import Path

import pytest

from scilm_hpc.data.readers import read_corpus
from scilm_hpc.errors import UserError

from .conftest import REPO

FASTA = ">p1 kind=ignored\nMQYKL\n>sp|p2|x\nACDEF*\n>p3\nGGW\n"


def write(root: Path, name: str, text: str) -> Path:
    path = root / name
    path.write_text(text, encoding="utf-8")
    return path


def test_labels_come_from_the_side_table_by_record_id(tmp_path):
    fasta = write(tmp_path, "s.fasta", FASTA)
    table = write(tmp_path, "labels.csv", "id,kind,fitness\np3,c,0.5\np1,a,1.5\nsp|p2|x,b,-2\n")
    examples = read_corpus(fasta, "fasta", label_field="kind", fasta_labels=str(table))
    assert [(e.text, e.label) for e in examples] == [("MQYKL", "a"), ("ACDEF", "b"), ("GGW", "c")]
    values = read_corpus(
        fasta, "fasta", label_field="fitness", label_kind="values", fasta_labels=str(table)
    )
    assert [e.values for e in values] == [(1.5,), (-2.0,), (0.5,)]


@pytest.mark.parametrize(
    "table,message",
    [
        ("id,kind\np1,a\nsp|p2|x,b\n", "s.fasta:5: record 'p3': no label in data.fasta_labels"),
        ("name,kind\np1,a\n", "labels.csv:1: no column 'id' (record ids)"),
        ("id,class\np1,a\n", "no column 'kind' (data.label_field)"),
        ("id,kind\np1,a\np1,b\n", "labels.csv:3: record id 'p1' appears twice"),
    ],
)
def test_side_table_problems_name_file_and_line(tmp_path, table, message):
    fasta = write(tmp_path, "s.fasta", FASTA)
    labels = write(tmp_path, "labels.csv", table)
    with pytest.raises(UserError) as err:
        read_corpus(fasta, "fasta", label_field="kind", fasta_labels=str(labels))
    assert message in str(err.value)


def test_side_table_only_for_fasta(scilm, tmp_path):
    code, _, err = scilm(
        "validate",
        str(REPO / "jobs/prepare.yaml"),
        f"run.dir={tmp_path}",
        "data.format=jsonl",
        f"data.fasta_labels={tmp_path / 'x.csv'}",
    )
    assert code == 2 and "data.fasta_labels: labels of FASTA records" in err
