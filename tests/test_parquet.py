"""Parquet input: every task prepares the same shards from a Parquet file as from the
same records in JSONL; the file is read a batch at a time; bad files are named."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from scilm_hpc.data import parquet as parquet_reader
from scilm_hpc.data.readers import iter_corpus, read_corpus
from scilm_hpc.errors import UserError

from .conftest import REPO

SENTENCES = [
    "Protein language models capture structure from sequence alone.",
    "We fine-tune a transformer on antibody binding data.",
    "The network predicts stability of designed variants.",
    "Attention maps recover contacts between residues.",
    "A small model distilled from a large one keeps most accuracy.",
]
RESIDUES = "ACDEFGHIKLMNPQRSTVWY"


def _records(task: str, n: int, seed: int) -> list[dict[str, Any]]:
    rng = random.Random(f"{task}-{seed}")
    rows = []
    for i in range(n):
        sentence = f"{SENTENCES[i % 5]} Study {i} has {rng.randint(0, 9)} results."
        sequence = "".join(rng.choices(RESIDUES, k=rng.randint(5, 14)))
        if task == "classification":
            rows.append({"text": sentence, "label": i % 3})  # an integer class, as in JSON
        elif task == "regression":  # two targets per protein
            rows.append({"sequence": sequence, "y": [rng.uniform(-1, 1), float(i % 4)]})
        elif task == "token_classification":  # one tag per residue, a list column
            rows.append({"sequence": sequence, "tags": [rng.choice("NP") for _ in sequence]})
        elif task == "seq2seq":
            target = SENTENCES[(i + 1) % 5]
            rows.append({"abstract": sentence, "tldr": target, "tldrs": [target, f"tl {i}"]})
        else:
            rows.append({"text": sentence})
    return rows


CASES = {  # task: prepare overrides besides the files (model "protein" or "text")
    "classification": ("text", ["data.split.dev_ratio=0.25"]),
    "regression": ("protein", ["data.text_field=sequence", "data.label_field=y"]),
    "token_classification": ("protein", ["data.text_field=sequence", "data.label_field=tags"]),
    "seq2seq": (
        "text",
        ["data.text_field=abstract", "data.target_field=tldr", "data.references_field=tldrs"],
    ),
    "causal_lm": ("text", ["data.max_length=32"]),
}


def _shard_arrays(shards: Path) -> dict[str, Any]:
    arrays: dict[str, Any] = {}
    for path in sorted(shards.glob("*/shard-*.h5")):
        with h5py.File(path, "r") as fh:
            for name, data in fh.items():
                arrays[f"{path.parent.name}/{path.name}/{name}"] = data[()]
    return arrays


@pytest.mark.parametrize("task", sorted(CASES))
def test_parquet_prepares_the_shards_of_the_same_jsonl(
    scilm, tmp_path, tiny_model_dir, tiny_protein_bert, monkeypatch, task
) -> None:
    """Same records as JSONL and as Parquet (row groups of 5, batches of 3 rows, so
    records cross both): the same shard arrays, shard checksums, example counts, label
    map and task state; seq2seq's per-record locator says ``row N`` where JSONL says
    line N, and nothing else differs."""
    monkeypatch.setattr(parquet_reader, "BATCH_ROWS", 3)
    kind, extra = CASES[task]
    model = tiny_protein_bert if kind == "protein" else tiny_model_dir
    if kind == "protein":
        extra = [*extra, "data.residue_separator=' '"]
    if task == "seq2seq":
        extra = [*extra, f"model.decoder_name_or_path={tiny_model_dir}"]
    splits = {"train": _records(task, 23, 0), "test": _records(task, 7, 1)}
    manifests, arrays = {}, {}
    for fmt in ("jsonl", "parquet"):
        files = {}
        for split, rows in splits.items():
            files[split] = tmp_path / fmt / f"{split}.{fmt}"
            files[split].parent.mkdir(exist_ok=True)
            if fmt == "jsonl":
                files[split].write_text("".join(json.dumps(r) + "\n" for r in rows))
            else:
                pq.write_table(pa.Table.from_pylist(rows), files[split], row_group_size=5)
        code, _, err = scilm(
            "prepare",
            REPO / "jobs/prepare.yaml",
            "cluster=none",
            f"task={task}",
            f"run.dir={tmp_path / fmt}",
            f"data.format={fmt}",
            f"data.train={files['train']}",
            f"data.test={files['test']}",
            "data.examples_per_shard=4",
            f"model.name_or_path={model}",
            *extra,
        )
        assert code == 0, err
        manifests[fmt] = json.loads((tmp_path / fmt / "shards/manifest.json").read_text())
        arrays[fmt] = _shard_arrays(tmp_path / fmt / "shards")
    jsonl, parquet = manifests["jsonl"], manifests["parquet"]
    assert parquet["data"]["format"] == "parquet"
    for key in ("labels", "task_state", "residues", "truncated"):
        assert parquet.get(key) == jsonl.get(key), key
    assert (
        set(parquet["splits"])
        == set(jsonl["splits"])
        == ({"train", "dev", "test"} if task == "classification" else {"train", "test"})
    )
    for split, entry in jsonl["splits"].items():
        assert parquet["splits"][split]["n_examples"] == entry["n_examples"]
    assert sum(e["n_examples"] for e in parquet["splits"].values()) == 30 or task == "causal_lm"
    assert arrays["parquet"].keys() == arrays["jsonl"].keys()
    for name, expected in arrays["jsonl"].items():
        got = arrays["parquet"][name]
        if name.endswith("/record"):  # seq2seq: where each record came from
            expected = [r.decode().replace(".jsonl:", ".parquet:row ") for r in expected]
            got = [r.decode() for r in got]
            assert [r.split("/")[-1] for r in got] == [r.split("/")[-1] for r in expected]
            continue
        assert np.array_equal(got, expected), name
    if task != "seq2seq":  # the files themselves, byte for byte
        assert parquet["splits"] == jsonl["splits"]


def test_parquet_values_and_locators(tmp_path) -> None:
    """Each column type becomes what the same JSON value would: an integer class as its
    text, a number list as values, a list of strings as tags, null as missing."""
    rows = [
        {"sequence": "MKV*", "tags": ["N", "P", "N"], "y": [1.5, 2.0], "c": 7},
        {"sequence": "AC", "tags": ["P", "P"], "y": [0.0, -1.0], "c": 8},
    ]
    path = tmp_path / "x.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=1)
    tagged = read_corpus(path, "parquet", text_field="sequence", label_field="tags",
                         label_kind="tags")  # fmt: skip
    assert [(e.words, e.tags, e.source) for e in tagged] == [
        (("M", "K", "V"), ("N", "P", "N"), f"{path}:row 1"),
        (("A", "C"), ("P", "P"), f"{path}:row 2"),
    ]
    values = read_corpus(path, "parquet", text_field="sequence", label_field="y",
                         label_kind="values")  # fmt: skip
    assert [e.values for e in values] == [(1.5, 2.0), (0.0, -1.0)]
    assert [e.label for e in read_corpus(path, "parquet", text_field="sequence",
                                         label_field="c")] == ["7", "8"]  # fmt: skip


def test_parquet_bad_input_is_named(tmp_path, scilm) -> None:
    """A missing column lists the file's columns; a file that is not Parquet, is cut
    short or has damaged pages names the file; a bad row names its row; a .parquet
    file read as JSONL is refused by validate with the fix."""
    path = tmp_path / "good.parquet"
    rows = [{"abstract": f"doc {i}", "label": "a"} for i in range(6)]
    rows[4] = {"abstract": None, "label": "b"}
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=2)
    with pytest.raises(UserError) as missing:
        read_corpus(path, "parquet", text_field="text", label_field="label")
    assert str(missing.value) == (
        f"{path}: no column 'text' (data.text_field); columns: abstract, label"
    )
    stream = iter_corpus(path, "parquet", text_field="abstract", label_field="label")
    assert next(stream).text == "doc 0"  # read before the bad row is reached
    with pytest.raises(UserError, match=rf"{path}:row 5: missing text field 'abstract'"):
        list(stream)

    not_parquet = tmp_path / "notes.parquet"
    not_parquet.write_text('{"text": "a JSONL line"}\n')
    cut = tmp_path / "cut.parquet"
    data = path.read_bytes()
    cut.write_bytes(data[: len(data) // 2] + data[-100:])
    damaged = tmp_path / "damaged.parquet"  # footer intact, a row group's pages not
    long = [{"abstract": f"document {i} " * 20, "label": "a"} for i in range(200)]
    pq.write_table(pa.Table.from_pylist(long), damaged, row_group_size=50)
    scrambled = bytearray(damaged.read_bytes())
    for k in range(len(scrambled) // 3, len(scrambled) // 3 + 200):
        scrambled[k] ^= 0x5A
    damaged.write_bytes(bytes(scrambled))
    for bad in (not_parquet, cut, damaged):
        with pytest.raises(UserError, match=rf"^{bad}: not a readable Parquet file \("):
            read_corpus(bad, "parquet", text_field="abstract", label_field="label")

    code, _, err = scilm(
        "validate", REPO / "jobs/prepare.yaml", f"run.dir={tmp_path}", f"data.train={path}"
    )
    assert code == 2
    assert f"data.train: '{path}' is a Parquet file but data.format is jsonl; set " in err


def test_parquet_is_read_a_row_group_at_a_time(tmp_path, monkeypatch) -> None:
    """Arrow's allocated memory while reading 4.8 MB of text in row groups and batches
    of 50 rows stays under a quarter of it (pyarrow's read-ahead defaults hold most of
    the file: 3.9 MB)."""
    monkeypatch.setattr(parquet_reader, "BATCH_ROWS", 50)
    rng = random.Random(0)
    words = [f"w{i}" for i in range(500)]
    texts = [" ".join(rng.choices(words, k=1000)) for _ in range(1000)]
    path = tmp_path / "big.parquet"
    pq.write_table(pa.table({"text": texts}), path, row_group_size=50)
    size = sum(map(len, texts))
    del texts
    base = pa.total_allocated_bytes()
    peak, n = 0, 0
    for _ in iter_corpus(path, "parquet", label_field=None):
        peak = max(peak, pa.total_allocated_bytes() - base)
        n += 1
    assert n == 1000
    assert peak < size / 4, f"{peak / 1e6:.2f} MB held while reading {size / 1e6:.2f} MB"
