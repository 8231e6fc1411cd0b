"""prepare: round trip, real corpora, parallel equals serial, readers."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer

from scilm_hpc.data.dataset import ShardDataset
from scilm_hpc.data.readers import read_corpus

from .conftest import REPO, shared_data

JOB = REPO / "jobs" / "prepare.yaml"


def _prepare(scilm, *overrides: str) -> None:
    code, out, err = scilm("prepare", JOB, "cluster=none", *overrides)
    assert code == 0, err
    assert json.loads(out)["ranks"] >= 1
    assert re.search(r"^prepare rank 0: (\d+)/\1 records \| ", err, re.M)  # the final line


def test_round_trip_tokens_and_labels(scilm, tmp_path, demo_corpus, tiny_model_dir):
    shards = tmp_path / "shards"
    _prepare(
        scilm,
        f"run.dir={tmp_path}",
        f"data.train={demo_corpus['train']}",
        f"data.dev={demo_corpus['dev']}",
        f"data.shards={shards}",
        f"model.name_or_path={tiny_model_dir}",
        "data.examples_per_shard=32",
        "data.max_length=24",
    )
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows = [json.loads(line) for line in demo_corpus["train"].read_text().splitlines()]
    dataset = ShardDataset(shards, "train")
    assert len(dataset) == len(rows) == 90
    assert len(dataset.shards) == 3  # 90 examples at 32 a shard
    assert dataset.label_names == ["background", "method", "result"]
    for i, row in enumerate(rows):
        expected = tokenizer(row["text"], truncation=True, max_length=24)["input_ids"]
        item = dataset[i]
        assert item["input_ids"].tolist() == expected
        assert dataset.label_names[item["labels"]] == row["label"]
    assert int(dataset.lengths().max()) <= 24
    manifest = json.loads((shards / "manifest.json").read_text())
    assert manifest["splits"]["train"]["n_tokens"] == int(dataset.lengths().sum())
    assert set(manifest["splits"]) == {"train", "dev"}
    assert (tmp_path / "prepare.config.yaml").is_file()
    assert not list(tmp_path.glob(".shards.tmp-*"))


def test_ratio_split_is_deterministic_and_disjoint(scilm, tmp_path, demo_corpus, tiny_model_dir):
    common = [
        f"data.train={demo_corpus['train']}",
        f"model.name_or_path={tiny_model_dir}",
        "data.split.dev_ratio=0.2",
        "data.split.test_ratio=0.1",
        "data.split.seed=3",
    ]
    for name in ("a", "b"):
        _prepare(scilm, f"run.dir={tmp_path / name}", *common)
    texts = {}
    for name in ("a", "b"):
        texts[name] = {
            s: [
                tuple(ShardDataset(tmp_path / name / "shards", s)[i]["input_ids"])
                for i in range(len(ShardDataset(tmp_path / name / "shards", s)))
            ]
            for s in ("train", "dev", "test")
        }
    assert texts["a"] == texts["b"]
    sizes = {s: len(v) for s, v in texts["a"].items()}
    assert sizes == {"train": 63, "dev": 18, "test": 9}


def test_token_classification_alignment(tmp_path, scilm, tiny_model_dir):
    conll = tmp_path / "tiny.conll"
    conll.write_text(
        "Familial\tNN\tO\tB-Disease\nhypercholesterolaemia\tNN\tO\tI-Disease\n"
        "is\tNN\tO\tO\nrare\tNN\tO\tO\n\nBRCA1\tNN\tO\tO\nmutations\tNN\tO\tO\n",
        encoding="utf-8",
    )
    _prepare(
        scilm,
        f"run.dir={tmp_path}",
        f"data.train={conll}",
        "data.format=conll",
        "task=token_classification",
        f"model.name_or_path={tiny_model_dir}",
    )
    dataset = ShardDataset(tmp_path / "shards", "train")
    assert dataset.label_names == ["B-Disease", "I-Disease", "O"]
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    words = ["Familial", "hypercholesterolaemia", "is", "rare"]
    enc = tokenizer(words, is_split_into_words=True)
    item = dataset[0]
    assert item["input_ids"].tolist() == enc["input_ids"]
    expected, previous = [], None
    for word in enc.word_ids():
        tag = {0: 0, 1: 1}.get(word, 2) if word is not None and word != previous else -100
        expected.append(tag)
        previous = word
    assert item["labels"].tolist() == expected
    assert item["labels"][0] == -100 and item["labels"][-1] == -100  # [CLS], [SEP]
    assert sum(1 for t in expected if t != -100) == len(words)


@pytest.mark.integration
def test_scicite_prepared_for_real(scilm, tmp_path):
    data = shared_data("scicite")
    _prepare(
        scilm,
        f"run.dir={tmp_path}",
        f"data.train={data / 'train.jsonl'}",
        f"data.dev={data / 'dev.jsonl'}",
        f"data.test={data / 'test.jsonl'}",
    )
    counts = {s: len(ShardDataset(tmp_path / "shards", s)) for s in ("train", "dev", "test")}
    assert counts == {"train": 7320, "dev": 916, "test": 1861}
    dataset = ShardDataset(tmp_path / "shards", "test")
    assert dataset.label_names == ["background", "method", "result"]
    dataset.verify_checksums()
    labels = np.array([dataset[i]["labels"] for i in range(len(dataset))])
    assert set(np.unique(labels)) == {0, 1, 2}


@pytest.mark.integration
def test_ncbi_disease_prepared_for_real(scilm, tmp_path):
    data = shared_data("ncbi-disease")
    _prepare(
        scilm,
        f"run.dir={tmp_path}",
        "data.format=conll",
        "task=token_classification",
        f"data.train={data / 'train.conll'}",
        f"data.test={data / 'test.conll'}",
    )
    sentences = read_corpus(data / "train.conll", "conll")
    dataset = ShardDataset(tmp_path / "shards", "train")
    assert len(dataset) == len(sentences) == 5424
    assert dataset.label_names == ["B-Disease", "I-Disease", "O"]
    # every word that survives truncation has its tag on its first sub-word
    b_tag = dataset.label_names.index("B-Disease")
    n_b = sum(int((dataset[i]["labels"] == b_tag).sum()) for i in range(len(dataset)))
    n_b_words = sum(t.count("B-Disease") for ex in sentences for t in [list(ex.tags or ())])
    assert 0.98 * n_b_words <= n_b <= n_b_words


def _shard_digests(shards: Path) -> dict:
    manifest = json.loads((shards / "manifest.json").read_text())
    return {
        split: [(s["file"], s["sha256"], s["n_examples"]) for s in m["shards"]]
        for split, m in manifest["splits"].items()
    }


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_parallel_prepare_equals_serial(scilm, tmp_path, demo_corpus, tiny_model_dir):
    common = [
        str(JOB),
        f"data.train={demo_corpus['train']}",
        f"data.dev={demo_corpus['dev']}",
        f"model.name_or_path={tiny_model_dir}",
        "data.examples_per_shard=16",
    ]
    _prepare(scilm, *common[1:], f"run.dir={tmp_path / 'serial'}")
    scilm_exe = str(Path(sys.executable).with_name("scilm"))
    # two local processes through submitit
    local = subprocess.run(
        [
            scilm_exe,
            "prepare",
            *common,
            "cluster=local",
            "cluster.tasks_per_node=2",
            f"run.dir={tmp_path / 'local'}",
        ],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert local.returncode == 0, local.stderr
    assert json.loads(local.stdout[local.stdout.index("{") :])["ranks"] == 2
    serial = _shard_digests(tmp_path / "serial" / "shards")
    assert sum(len(v) for v in serial.values()) == 8  # 90/16 -> 6 train, 30/16 -> 2 dev
    assert _shard_digests(tmp_path / "local" / "shards") == serial
    # two MPI ranks
    mpirun = shutil.which("mpirun")
    assert mpirun, "mpirun is missing: install openmpi-bin (.ci/run does)"
    mpi = subprocess.run(
        [
            mpirun,
            "--allow-run-as-root",
            "--oversubscribe",
            "-n",
            "2",
            scilm_exe,
            "prepare",
            *common,
            "cluster=none",
            f"run.dir={tmp_path / 'mpi'}",
        ],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert mpi.returncode == 0, mpi.stderr
    # each rank's final progress line: its records written, all of them together
    finals = dict(re.findall(r"prepare rank (\d): (\d+)/\2 records", mpi.stderr))
    assert set(finals) == {"0", "1"} and sum(map(int, finals.values())) == 120
    manifest = json.loads((tmp_path / "mpi" / "shards" / "manifest.json").read_text())
    assert manifest["prepare"]["ranks"] == 2
    assert len(manifest["prepare"]["rank_seconds"]) == 2  # read by benchmarks/prepare.py
    assert _shard_digests(tmp_path / "mpi" / "shards") == serial


def test_dataset_reopens_after_fork(tmp_path, scilm, demo_corpus, tiny_model_dir):
    import multiprocessing as mp

    _prepare(
        scilm,
        f"run.dir={tmp_path}",
        f"data.train={demo_corpus['train']}",
        f"model.name_or_path={tiny_model_dir}",
        "data.examples_per_shard=40",
    )
    dataset = ShardDataset(tmp_path / "shards", "train")
    expected = [dataset[i]["input_ids"].tolist() for i in (0, 45, 89)]
    ctx = mp.get_context("fork")
    with ctx.Pool(2) as pool:
        got = pool.map(_read_item, [(dataset, i) for i in (0, 45, 89)])
    assert got == expected


def _read_item(args: tuple[ShardDataset, int]) -> list[int]:
    dataset, index = args
    return dataset[index]["input_ids"].tolist()
