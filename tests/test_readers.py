"""Corpus readers: CSV (header order, quoting, delimiters, bad rows), JSONL labels,
plain text line numbers, CoNLL columns; and a CSV corpus through ``scilm prepare``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from scilm_hpc.data.dataset import ShardDataset
from scilm_hpc.data.readers import read_corpus
from scilm_hpc.errors import UserError

from .conftest import REPO


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_bytes(text.encode("utf-8"))
    return path


# ---------------------------------------------------------------- CSV


@pytest.mark.parametrize(
    "header", ["text,label", "label,text", "id,label,note,text"], ids=["tl", "lt", "extra"]
)
def test_csv_header_columns_in_any_order(tmp_path, header):
    columns = header.split(",")
    values = {"id": "7", "note": "n", "text": "protein binds", "label": "method"}
    path = write(tmp_path, "c.csv", header + "\n" + ",".join(values[c] for c in columns) + "\n")
    [example] = read_corpus(path, "csv")
    assert (example.text, example.label, example.source) == ("protein binds", "method", f"{path}:2")


def test_csv_quoted_commas_newlines_and_line_of_a_later_bad_row(tmp_path):
    path = write(
        tmp_path,
        "q.csv",
        "label,text\n"  # line 1
        'a,"one, two"\n'  # line 2
        'b,"multi\n'  # line 3: a quoted field over lines 3-5
        "line, with comma\n"  # line 4
        'end"\n'  # line 5
        'c,"say ""hi"""\n'  # line 6
        "d,ok\n",  # line 7
    )
    examples = read_corpus(path, "csv")
    assert [(e.label, e.text) for e in examples] == [
        ("a", "one, two"),
        ("b", "multi\nline, with comma\nend"),
        ("c", 'say "hi"'),
        ("d", "ok"),
    ]
    # csv's line_num after a row is the physical line where the row *ends*
    assert [e.source for e in examples] == [f"{path}:{n}" for n in (2, 5, 6, 7)]

    bad = write(tmp_path, "bad.csv", path.read_text(encoding="utf-8") + "e,too,many\n")  # line 8
    with pytest.raises(UserError) as info:
        read_corpus(bad, "csv")
    assert str(info.value) == f"{bad}:8: 3 columns, the header has 2"


def test_csv_bad_row_spanning_lines_reported_at_its_last_line(tmp_path):
    path = write(tmp_path, "span.csv", 'text,label\nfine,a\n"two\nlines",b,extra\nok,c\n')
    with pytest.raises(UserError) as info:
        read_corpus(path, "csv")
    # the bad row occupies lines 3-4; the reader names line 4 (where it ends)
    assert info.value.problems == [f"{path}:4: 3 columns, the header has 2"]


@pytest.mark.parametrize("delimiter", [";", "\t"], ids=["semicolon", "tab"])
def test_csv_custom_delimiter(tmp_path, delimiter):
    d = delimiter
    path = write(tmp_path, "d.csv", f'label{d}text\nx{d}a, b, c\ny{d}"q{d}uoted"\n')
    examples = read_corpus(path, "csv", csv_delimiter=delimiter)
    assert [(e.label, e.text) for e in examples] == [("x", "a, b, c"), ("y", f"q{d}uoted")]
    with pytest.raises(UserError, match="no column 'text'"):  # the default ',' sees one column
        read_corpus(path, "csv")


def test_csv_missing_label_column_names_column_and_file(tmp_path):
    path = write(tmp_path, "nolabel.csv", "text,category\nhello,a\n")
    with pytest.raises(UserError) as info:
        read_corpus(path, "csv")
    [problem] = info.value.problems
    assert problem.startswith(f"{path}:1: ")
    assert "no column 'label' (data.label_field)" in problem
    assert "columns: text, category" in problem
    # a custom label field is found
    [example] = read_corpus(path, "csv", label_field="category")
    assert example.label == "a"


def test_csv_too_many_columns_names_file_and_line(tmp_path):
    path = write(tmp_path, "wide.csv", "text,label\na,1\nb,2,3,4\nc,3\n")
    with pytest.raises(UserError) as info:
        read_corpus(path, "csv")
    assert info.value.problems == [f"{path}:3: 4 columns, the header has 2"]


def test_csv_integer_labels_stay_strings(tmp_path):
    path = write(tmp_path, "ints.csv", "text,label\na,1\nb,007\nc,10\n")
    labels = [e.label for e in read_corpus(path, "csv")]
    assert labels == ["1", "007", "10"]
    assert all(isinstance(label, str) for label in labels)


def test_csv_with_utf8_bom(tmp_path):
    path = tmp_path / "bom.csv"
    path.write_bytes(b"\xef\xbb\xbftext,label\nhello,a\n")
    [example] = read_corpus(path, "csv")
    assert (example.text, example.label) == ("hello", "a")


# ---------------------------------------------------------------- JSONL, text


def test_jsonl_integer_labels_become_strings(write_jsonl):
    path = write_jsonl("ints.jsonl", [{"text": "a", "label": 0}, {"text": "b", "label": 12}])
    examples = read_corpus(path, "jsonl")
    assert [(e.text, e.label) for e in examples] == [("a", "0"), ("b", "12")]
    assert [e.source for e in examples] == [f"{path}:1", f"{path}:2"]


def test_text_skips_blank_lines_with_true_line_numbers(tmp_path):
    path = write(tmp_path, "t.txt", "\nfirst doc\n\n   \nsecond doc\r\nthird\n\n")
    examples = read_corpus(path, "text")
    assert [(e.text, e.source) for e in examples] == [
        ("first doc", f"{path}:2"),
        ("second doc", f"{path}:5"),
        ("third", f"{path}:6"),
    ]
    assert all(e.label is None and e.words is None for e in examples)


# ---------------------------------------------------------------- CoNLL


def test_conll_docstart_and_space_separated_columns(tmp_path):
    path = write(
        tmp_path,
        "s.conll",
        "-DOCSTART- -X- O\n"  # 1
        "\n"  # 2
        "BRCA1 NNP B-Gene\n"  # 3
        "mutations NNS O\n"  # 4
        "\n"  # 5
        "-DOCSTART- -X- O\n"  # 6
        "Familial JJ B-Disease\n"  # 7
        "cancer NN I-Disease\n",  # 8
    )
    examples = read_corpus(path, "conll")
    assert [(e.words, e.tags, e.source) for e in examples] == [
        (("BRCA1", "mutations"), ("B-Gene", "O"), f"{path}:3"),
        (("Familial", "cancer"), ("B-Disease", "I-Disease"), f"{path}:7"),
    ]


def test_conll_token_and_tag_columns(tmp_path):
    two = write(tmp_path, "two.conll", "B-Gene BRCA1\nO mutations\n\nO rare\n")
    examples = read_corpus(two, "conll", token_column=1, tag_column=0)
    assert [(e.words, e.tags) for e in examples] == [
        (("BRCA1", "mutations"), ("B-Gene", "O")),
        (("rare",), ("O",)),
    ]
    three = write(tmp_path, "three.conll", "BRCA1\tB-Gene\tNNP\nmutations\tO\tNNS\n")
    [example] = read_corpus(three, "conll", token_column=0, tag_column=1)
    assert (example.words, example.tags) == (("BRCA1", "mutations"), ("B-Gene", "O"))
    # the default tag column is the last one
    [example] = read_corpus(three, "conll")
    assert example.tags == ("NNP", "NNS")


# ---------------------------------------------------------------- scilm prepare on CSV


def test_prepare_csv_round_trip(scilm, tmp_path, tiny_model_dir):
    rows = [("10", "kinase, phosphorylation"), ("2", "a quoted\nmulti-line abstract")] * 3
    rows += [("neg", "plain text row")] * 2
    lines = ['"' + text.replace('"', '""') + '",' + label for label, text in rows]
    corpus = write(tmp_path, "train.csv", "text,label\n" + "\n".join(lines) + "\n")
    code, out, err = scilm(
        "prepare",
        REPO / "jobs" / "prepare.yaml",
        "cluster=none",
        f"run.dir={tmp_path / 'run'}",
        f"data.train={corpus}",
        "data.format=csv",
        f"model.name_or_path={tiny_model_dir}",
    )
    assert code == 0, err
    assert json.loads(out)["ranks"] == 1
    dataset = ShardDataset(tmp_path / "run" / "shards", "train")
    assert len(dataset) == len(rows) == 8
    assert dataset.label_names == ["10", "2", "neg"]  # string order, not numeric
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    for i, (label, text) in enumerate(rows):  # file order is kept
        item = dataset[i]
        assert dataset.label_names[int(item["labels"])] == label
        assert (
            item["input_ids"].tolist()
            == tokenizer(text, truncation=True, max_length=128)["input_ids"]
        )
