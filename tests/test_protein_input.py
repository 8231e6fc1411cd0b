"""Protein input: the FASTA reader's edge cases, per-residue tags from JSONL, the
residue separator and each unknown-residue policy, through prepare and on real data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from scilm_hpc.data.dataset import ShardDataset
from scilm_hpc.data.readers import Example, read_corpus
from scilm_hpc.data.residues import ResidueChecker
from scilm_hpc.errors import UserError

from .conftest import REPO
from .protein_fixtures import protein_bert, shared_dataset

PREPARE = str(REPO / "jobs" / "prepare.yaml")


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def problems(exc: pytest.ExceptionInfo[UserError]) -> list[str]:
    return list(exc.value.problems)


@pytest.fixture(scope="module")
def tokenizer(tiny_protein_bert: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_protein_bert)


# --- FASTA ---------------------------------------------------------------------------


def test_fasta_multiline_lower_case_stop_codon_and_header_labels(tmp_path):
    path = write(
        tmp_path,
        "seqs.fasta",
        "; a comment line\n"
        ">p1 kind=binder fitness=1.5\n"  # line 2
        "mqykl\n"
        "ILNGK\n"
        "\n"
        "TLK*\n"
        ">sp|p2|kind=other|fitness=-0.25\n"  # line 7: UniProt-style id
        "ACD EF*\n",
    )
    first, second = read_corpus(path, "fasta", label_field="kind")
    assert (first.text, first.label, first.source) == ("MQYKLILNGKTLK", "binder", f"{path}:2")
    assert (second.text, second.label) == ("ACDEF", "other")
    values = read_corpus(path, "fasta", label_field="fitness", label_kind="values")
    assert [e.values for e in values] == [(1.5,), (-0.25,)]
    unlabelled = read_corpus(path, "fasta", label_field=None)
    assert [e.label for e in unlabelled] == [None, None]


def test_fasta_problems_name_their_lines(tmp_path):
    path = write(
        tmp_path,
        "bad.fasta",
        "MKV\n"  # line 1: before any header
        ">empty kind=a\n"  # line 2: no residue
        ">stop kind=a\n"  # line 3: only a stop codon
        "*\n"
        ">nolabel other=1\n"  # line 5
        "ACD\n"
        ">ok kind=a\n"
        "ACD\n",
    )
    with pytest.raises(UserError) as exc:
        read_corpus(path, "fasta", label_field="kind")
    lines = problems(exc)
    assert f"{path}:1: sequence line before the first '>' header" in lines[0]
    assert lines[1] == f"{path}:2: record 'empty' has no sequence (an empty record)"
    assert lines[2] == f"{path}:3: record 'stop' has no sequence (an empty record)"
    assert lines[3].startswith(f"{path}:5: record 'nolabel': no 'kind=...' field")
    assert "fields present: other" in lines[3]
    pair = write(tmp_path, "pair.fasta", ">a y=1,2\nAC\n")
    assert read_corpus(pair, "fasta", label_field="y", label_kind="values")[0].values == (1.0, 2.0)
    word = write(tmp_path, "word.fasta", ">a y=1\nAC\n>b y=high\nAC\n")
    with pytest.raises(UserError, match=r"word.fasta:3: record 'b': label 'y=high' is not a"):
        read_corpus(word, "fasta", label_field="y", label_kind="values")


def test_regression_labels_from_jsonl_and_csv(tmp_path, write_jsonl):
    path = write_jsonl("r.jsonl", [{"text": "AC", "y": 1}, {"text": "DE", "y": [0.5, -2]}])
    assert [e.values for e in read_corpus(path, "jsonl", label_field="y", label_kind="values")] == [
        (1.0,),
        (0.5, -2.0),
    ]
    bad = write_jsonl("b.jsonl", [{"text": "AC", "y": "x"}, {"text": "AC", "y": True}])
    with pytest.raises(UserError) as exc:
        read_corpus(bad, "jsonl", label_field="y", label_kind="values")
    assert [line.split(": label")[0] for line in problems(exc)] == [f"{bad}:1", f"{bad}:2"]
    csv = write(tmp_path, "r.csv", 'text,y\nAC,1.25\nDE,"[1, 2]"\nFG,nan\n')
    with pytest.raises(UserError, match=r"r.csv:4: label field 'y' .* must be a number"):
        read_corpus(csv, "csv", label_field="y", label_kind="values")


# --- per-residue tags from JSONL -------------------------------------------------------


def test_jsonl_sequence_with_per_residue_tags(write_jsonl):
    path = write_jsonl(
        "tags.jsonl",
        [
            {"sequence": "EVQL", "label": ["N", "P", "P", "N"]},
            {"sequence": ["Familial", "cancer"], "label": ["O", "B-Disease"]},
            {"sequence": "EVQ", "label": ["N", "P"]},
            {"sequence": "EV", "label": "NP"},
        ],
    )
    with pytest.raises(UserError) as exc:
        read_corpus(path, "jsonl", text_field="sequence", label_kind="tags")
    lines = problems(exc)
    assert lines[0] == f"{path}:3: 2 tags in 'label' for 3 residues; need one each"
    assert lines[1].startswith(f"{path}:4: label field 'label' (data.label_field) must be a")
    good = write_jsonl("good.jsonl", [{"sequence": "E V\tQL", "label": ["N", "P", "P", "N"]}])
    [ex] = read_corpus(good, "jsonl", text_field="sequence", label_kind="tags")
    assert ex.words == ("E", "V", "Q", "L") and ex.tags == ("N", "P", "P", "N")


# --- unknown residues ------------------------------------------------------------------


def examples() -> list[Example]:
    return [
        Example(source="f:1", text="acdB*"),
        Example(source="f:2", text="EVQL"),
        Example(source="f:3", words=("E", "Z", "Q"), tags=("N", "P", "N")),
    ]


def test_refuse_names_record_character_and_position(tokenizer):
    checker = ResidueChecker(tokenizer, " ", "refuse")
    with pytest.raises(UserError) as exc:
        checker.examples(examples())
    assert problems(exc) == [
        "f:1: residue 'B' at position 4 is not in the tokenizer's vocabulary "
        "(data.unknown_residue=refuse; map_x or skip to proceed)",
        "f:3: residue 'Z' at position 2 is not in the tokenizer's vocabulary "
        "(data.unknown_residue=refuse; map_x or skip to proceed)",
    ]


def test_skip_drops_residues_and_their_tags(tokenizer):
    checker = ResidueChecker(tokenizer, " ", "skip")
    first, second, third = checker.examples(examples())
    assert first.text == "A C D" and second.text == "E V Q L"
    assert third.words == ("E", "Q") and third.tags == ("N", "N")
    assert checker.summary() == {
        "separator": " ",
        "unknown_policy": "skip",
        "unknown": {"B": 1, "Z": 1},
        "records_with_unknown": 2,
    }
    with pytest.raises(UserError, match="f:9: no residue left"):
        checker.examples([Example(source="f:9", text="BZ")])


def test_map_x_needs_x_in_the_vocabulary(tmp_path, tokenizer):
    from transformers import AutoTokenizer

    with pytest.raises(UserError, match="map_x: the tokenizer does not know 'X'"):
        ResidueChecker(tokenizer, " ", "map_x")
    with_x = AutoTokenizer.from_pretrained(protein_bert(tmp_path / "with-x", extra="X"))
    checker = ResidueChecker(with_x, "", "map_x")
    first, _, third = checker.examples(examples())
    assert first.text == "ACDX" and third.words == ("E", "X", "Q")
    assert third.tags == ("N", "P", "N")
    assert checker.summary()["unknown"] == {"B": 1, "Z": 1}


def test_a_separator_the_tokenizer_cannot_split_is_refused(tokenizer):
    checker = ResidueChecker(tokenizer, "", "refuse")
    [ex] = checker.examples([Example(source="f:1", text="EVQL")])
    with pytest.raises(UserError, match=r"data.residue_separator='': .* f:1 .* try "):
        checker.check_tokenisation(ex)
    ResidueChecker(tokenizer, " ", "refuse").check_tokenisation(Example("f:1", text="E V Q L"))


# --- through prepare -------------------------------------------------------------------


def test_prepare_fasta_with_skip_counts_unknown_residues(scilm, tmp_path, tiny_protein_bert):
    train = write(
        tmp_path,
        "train.fasta",
        ">a kind=x\nEVQBL\n>b kind=y\nacdef*\n>c kind=x\nKLMZZ\n>d kind=y\nWY\n",
    )
    code, _, err = scilm(
        "prepare",
        PREPARE,
        "cluster=none",
        f"run.dir={tmp_path}",
        "data.format=fasta",
        f"data.train={train}",
        "data.label_field=kind",
        "data.residue_separator=' '",
        "data.unknown_residue=skip",
        f"model.name_or_path={tiny_protein_bert}",
    )
    assert code == 0, err
    manifest = json.loads((tmp_path / "shards/manifest.json").read_text())
    assert manifest["residues"]["unknown"] == {"B": 1, "Z": 2}
    assert manifest["residues"]["records_with_unknown"] == 2
    dataset = ShardDataset(tmp_path / "shards", "train")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_protein_bert)
    tokens = [tokenizer.convert_ids_to_tokens(dataset[i]["input_ids"].tolist()) for i in range(4)]
    assert tokens[0] == ["[CLS]", "E", "V", "Q", "L", "[SEP]"]
    assert tokens[1] == ["[CLS]", "A", "C", "D", "E", "F", "[SEP]"]
    assert tokens[2] == ["[CLS]", "K", "L", "M", "[SEP]"]

    # refuse (the default) fails with the record and character; nothing is written
    code, _, err = scilm(
        "prepare",
        PREPARE,
        "cluster=none",
        f"run.dir={tmp_path / 'refused'}",
        "data.format=fasta",
        f"data.train={train}",
        "data.label_field=kind",
        "data.residue_separator=' '",
        f"model.name_or_path={tiny_protein_bert}",
    )
    assert code == 2
    assert f"{train}:1: residue 'B' at position 4" in err
    assert not (tmp_path / "refused" / "shards").exists()


def test_prepare_per_residue_tags_one_tag_per_residue_token(
    scilm, tmp_path, tiny_protein_bert, write_jsonl
):
    rows = [
        {"sequence": "EVQLVES", "label": list("NNPPNNN")},
        {"sequence": "qvql*", "label": list("NPNN")},
    ]
    train = write_jsonl("train.jsonl", rows)
    code, _, err = scilm(
        "prepare",
        PREPARE,
        "cluster=none",
        f"run.dir={tmp_path}",
        "task=token_classification",
        f"data.train={train}",
        "data.text_field=sequence",
        "data.residue_separator=' '",
        f"model.name_or_path={tiny_protein_bert}",
    )
    assert code == 0, err
    dataset = ShardDataset(tmp_path / "shards", "train")
    assert dataset.label_names == ["N", "P"]
    first, second = dataset[0], dataset[1]
    assert len(first["input_ids"]) == 7 + 2 and len(second["input_ids"]) == 4 + 2
    assert first["labels"].tolist() == [-100, 0, 0, 1, 1, 0, 0, 0, -100]
    assert second["labels"].tolist() == [-100, 0, 1, 0, 0, -100]


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        (
            "data.unknown_residue=drop",
            "data.unknown_residue: got 'drop'; allowed: refuse, map_x, skip",
        ),
        ("data.residue_separator=','", "data.residue_separator: got ','; allowed: ''"),
        ("data.format=fasta", "data.format: 'fasta' cannot feed task 'token_classification'"),
    ],
)
def test_protein_settings_are_validated(scilm, tmp_path, override, expected):
    fasta = write(tmp_path, "x.fasta", ">a\nAC\n")
    code, _, err = scilm(
        "validate",
        PREPARE,
        f"run.dir={tmp_path}",
        f"data.train={fasta}",
        "task=token_classification",
        override,
    )
    assert code == 2 and expected in err, err


# --- real data -------------------------------------------------------------------------


@pytest.mark.integration
def test_antiberta_paratope_and_flip_gb1_prepare(scilm, tmp_path, tiny_protein_bert):
    paratope, gb1 = shared_dataset("antiberta-paratope"), shared_dataset("flip-gb1")
    code, _, err = scilm(
        "prepare",
        PREPARE,
        "cluster=none",
        f"run.dir={tmp_path / 'paratope'}",
        "task=token_classification",
        f"data.train={paratope / 'train.jsonl'}",
        f"data.dev={paratope / 'dev.jsonl'}",
        "data.text_field=sequence",
        "data.residue_separator=' '",
        "data.max_length=160",
        f"model.name_or_path={tiny_protein_bert}",
    )
    assert code == 0, err
    train = ShardDataset(tmp_path / "paratope/shards", "train")
    assert len(train) == 720 and train.label_names == ["N", "P"]
    rows = [json.loads(x) for x in (paratope / "train.jsonl").read_text().splitlines()]
    tagged = sum(int((train[i]["labels"] >= 0).sum()) for i in range(len(train)))
    assert tagged == sum(len(r["sequence"]) for r in rows)  # one tag per residue token
    positive = sum(int((train[i]["labels"] == 1).sum()) for i in range(len(train))) / tagged
    assert 0.07 < positive < 0.12  # about 9.7% paratope residues

    code, _, err = scilm(
        "prepare",
        PREPARE,
        "cluster=none",
        f"run.dir={tmp_path / 'gb1'}",
        "task=regression",
        f"data.train={gb1 / 'train.jsonl'}",
        f"data.dev={gb1 / 'dev.jsonl'}",
        "data.text_field=sequence",
        "data.residue_separator=' '",
        "data.max_length=300",
        f"model.name_or_path={tiny_protein_bert}",
    )
    assert code == 0, err
    manifest = json.loads((tmp_path / "gb1/shards/manifest.json").read_text())
    labels = np.array(
        [json.loads(x)["label"] for x in (gb1 / "train.jsonl").read_text().splitlines()]
    )
    assert manifest["task_state"]["label_mean"] == pytest.approx([labels.mean()])
    assert manifest["task_state"]["label_std"] == pytest.approx([labels.std()])
    assert manifest["splits"]["train"]["n_examples"] == 2691
