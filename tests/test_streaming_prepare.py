"""Streaming prepare: readers yield lazily, the ratio split is the list shuffle's, and a
prepare's memory does not hold the corpus."""

from __future__ import annotations

import json
import random
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from scilm_hpc.data.corpus import ratio_membership
from scilm_hpc.data.readers import iter_corpus
from scilm_hpc.errors import UserError

from .conftest import REPO

GOOD = {
    "jsonl": ('{"text": "first", "label": "a"}\n', '{"text": "x", "label": "a"}\n'),
    "csv": ("text,label\nfirst,a\n", "x,a\n"),
    "text": ("first\n", "x\n"),
    "conll": ("first\tB\n\n", "x\tO\n\n"),
    "fasta": (">r1 label=a\nFIRST\n", ">r label=a\nMK\n"),
}
BROKEN = {
    "jsonl": "{not json\n",
    "csv": "too,many,columns\n",
    "text": None,  # a text line is never malformed: an undecodable one instead
    "conll": "only-one-column\n",
    "fasta": ">r label=a\n\n>s label=a\nMK\n",  # an empty record
}


@pytest.mark.parametrize("fmt", sorted(GOOD))
def test_readers_yield_before_reading_the_rest(tmp_path: Path, fmt: str) -> None:
    """The first example comes out while a broken record 2000 records later is still
    unread; the problem is raised when the iteration reaches it. A reader that reads
    the whole file first raises before yielding anything."""
    first, filler = GOOD[fmt]
    broken = BROKEN[fmt].encode() if BROKEN[fmt] else b"\xff\xfe bad bytes\n"
    path = tmp_path / f"corpus.{fmt}"
    path.write_bytes(first.encode() + filler.encode() * 2000 + broken)
    stream = iter_corpus(path, fmt, label_field="label" if fmt != "conll" else None)
    example = next(stream)
    assert (example.text or example.words[0]).lower() == "first"  # type: ignore[index]
    with pytest.raises(UserError, match=f"{path.name}:"):
        for _ in stream:
            pass


@pytest.mark.parametrize("n", [1, 2, 7, 100, 1001])
def test_ratio_membership_is_the_list_shuffle(n: int) -> None:
    """The same split as the in-memory reading: shuffle list(range(n)), cut dev then
    test off the front."""
    ratios = {"dev": 0.1, "test": 0.25}
    order = list(range(n))
    random.Random(3).shuffle(order)
    expected = np.zeros(n, dtype=np.uint8)
    cut = 0
    for code, ratio in enumerate(ratios.values(), start=1):
        count = max(1, round(ratio * n))
        expected[order[cut : cut + count]] = code
        cut += count
    if cut >= n:
        with pytest.raises(UserError, match="leaves no training example"):
            ratio_membership(n, ratios, 3)
        return
    member, names = ratio_membership(n, ratios, 3)
    assert names == ["train", "dev", "test"]
    assert np.array_equal(member, expected)


def _corpus(path: Path, documents: int) -> Path:
    words = [f"w{i}" for i in range(50)]
    rng = random.Random(0)
    with path.open("w") as fh:
        for _ in range(documents):
            fh.write(" ".join(rng.choices(words, k=100)) + "\n")
    return path


def test_prepare_memory_does_not_grow_with_the_corpus(scilm, tmp_path, tiny_model_dir) -> None:
    """Python's peak allocation while preparing a corpus and the same corpus x8 (1.6 MB)
    grows by less than a quarter of the larger corpus: it is streamed, one shard of
    100 documents at a time (reading the file whole, as the in-memory path did, costs
    more than the file itself)."""
    small = _corpus(tmp_path / "small.txt", 500)
    large = _corpus(tmp_path / "large.txt", 4000)
    assert large.stat().st_size > 1_500_000

    def prepare(corpus: Path, run: str) -> int:
        tracemalloc.reset_peak()
        code, out, err = scilm(
            "prepare",
            REPO / "jobs/prepare.yaml",
            "cluster=none",
            f"run.dir={tmp_path / run}",
            "task=causal_lm",
            "data.format=text",
            f"data.train={corpus}",
            "data.max_length=128",
            "data.examples_per_shard=100",
            f"model.name_or_path={tiny_model_dir}",
        )
        assert code == 0, err
        manifest = json.loads((tmp_path / run / "shards/manifest.json").read_text())
        assert manifest["splits"]["train"]["documents"] == len(corpus.read_text().splitlines())
        return tracemalloc.get_traced_memory()[1]

    tracemalloc.start()
    try:
        prepare(_corpus(tmp_path / "tiny.txt", 50), "warm-up")  # a first run's imports, caches
        base = prepare(small, "small")
        peak = prepare(large, "large")
    finally:
        tracemalloc.stop()
    growth = peak - base
    assert growth < large.stat().st_size / 4, f"peak {base / 1e6:.2f} -> {peak / 1e6:.2f} MB"
