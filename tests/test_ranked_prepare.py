"""Each prepare rank reads only its own part of the corpus: byte ranges of a large file,
whole files of a gzip corpus, and the shards and manifest of N ranks equal one rank's.

Ranks run as threads that talk through the file communicator, as local processes do.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import random
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from scilm_hpc.config import load_and_validate
from scilm_hpc.data import ranges, sources
from scilm_hpc.data.corpus import ReadOptions, SplitStreams, nth_member
from scilm_hpc.errors import UserError
from scilm_hpc.jobs.prepare import PrepareJob
from scilm_hpc.runtime.dist import FileCommunicator, SingleProcess

from .conftest import REPO

WORDS = [f"w{i}" for i in range(40)] + ["é", "naïve", "Δ", '"quoted"', "a,b"]


def _rows(n: int, seed: int = 0) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    return [
        {
            "text": " ".join(rng.choices(WORDS, k=rng.randint(3, 40))),
            "label": "xyz"[i * 3 // n],  # by position: each rank's part holds its own labels
            "value": round(rng.uniform(-2, 2), 3),
        }
        for i in range(n)
    ]


def _jsonl(rows: list[dict[str, Any]]) -> bytes:
    # blank lines in between: records are not lines
    return "".join(
        json.dumps(r, ensure_ascii=False) + ("\n\n" if i % 7 == 3 else "\n")
        for i, r in enumerate(rows)
    ).encode()


def _run_ranks(tmp_path: Path, name: str, ranks: int, *overrides: str) -> list[BaseException]:
    """Prepare on ``ranks`` threads; what each rank raised."""
    run = tmp_path / name
    job = load_and_validate(
        REPO / "jobs/prepare.yaml", ["cluster=none", f"run.dir={run}", *overrides]
    )
    errors: list[BaseException] = []

    def rank(r: int) -> None:
        comm = (
            SingleProcess()
            if ranks == 1
            else FileCommunicator(tmp_path / f".rdv-{name}", r, ranks, timeout_s=120)
        )
        try:
            PrepareJob(job).run(comm)
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            errors.append(exc)

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(ranks)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=180)
    return errors


def _prepare(tmp_path: Path, name: str, ranks: int, *overrides: str) -> dict[str, Any]:
    """Prepare on ``ranks`` threads; the manifest, and each shard file's bytes by name."""
    errors = _run_ranks(tmp_path, name, ranks, *overrides)
    if errors:
        raise errors[0]
    shards = tmp_path / name / "shards"
    manifest = json.loads((shards / "manifest.json").read_text())
    files = {str(p.relative_to(shards)): p.read_bytes() for p in sorted(shards.rglob("*.h5"))}
    return {"manifest": manifest, "files": files}


def _same(one: dict[str, Any], many: dict[str, Any], ranks: int) -> None:
    a, b = one["manifest"], many["manifest"]
    assert b["prepare"].pop("ranks") == ranks and a["prepare"].pop("ranks") == 1
    a["prepare"].pop("rank_seconds"), b["prepare"].pop("rank_seconds")
    assert b == a
    assert many["files"] == one["files"] and len(one["files"]) > 3


@pytest.mark.timeout(240)
def test_byte_ranges_of_one_file_give_the_shards_of_one_rank(tmp_path, tiny_model_dir):
    """One JSONL file (blank lines, non-ASCII text) cut into three byte ranges, with a
    ratio split and a label map: three ranks write the files and manifest of one."""
    corpus = tmp_path / "train.jsonl"
    corpus.write_bytes(_jsonl(_rows(300)))
    common = [
        f"data.train={corpus}",
        f"model.name_or_path={tiny_model_dir}",
        "data.examples_per_shard=40",
        "data.split.dev_ratio=0.2",
        "data.split.test_ratio=0.1",
    ]
    one = _prepare(tmp_path, "one", 1, *common)
    assert one["manifest"]["splits"]["train"]["n_examples"] == 210
    _same(one, _prepare(tmp_path, "three", 3, *common), 3)


@pytest.mark.timeout(240)
def test_many_file_gzip_corpus_is_split_by_files(tmp_path, tiny_model_dir):
    """A directory of gzip JSONL files (regression: the ranks merge what the task learns
    from the training split) gives on two ranks the shards of one rank, and the same
    shards as the plain file holding the same records."""
    rows = _rows(260, seed=1)
    folder = tmp_path / "corpus"
    folder.mkdir()
    for k in range(5):
        with gzip.open(folder / f"part-{k}.jsonl.gz", "wb") as fh:
            fh.write(_jsonl(rows[k * 52 : (k + 1) * 52]))
    plain = tmp_path / "plain.jsonl"
    plain.write_bytes(_jsonl(rows))
    common = [
        f"model.name_or_path={tiny_model_dir}",
        "task=regression",
        "data.label_field=value",
        "data.examples_per_shard=30",
        "data.split.dev_ratio=0.15",
    ]
    one = _prepare(tmp_path, "gz-one", 1, f"data.train={folder}", *common)
    assert [f["path"] for f in one["manifest"]["sources"]["train"]["files"]] == [
        str(p) for p in sorted(folder.iterdir())
    ]
    two = _prepare(tmp_path, "gz-two", 2, f"data.train={folder}", *common)
    _same(one, two, 2)
    flat = _prepare(tmp_path, "plain", 1, f"data.train={plain}", *common)
    assert flat["files"] == one["files"]
    assert flat["manifest"]["task_state"] == one["manifest"]["task_state"]


@pytest.mark.timeout(240)
def test_csv_with_quoted_newlines_is_read_whole(tmp_path, tiny_model_dir):
    """A CSV whose quoted values span lines cannot be cut at line starts: its count
    falls back to the reader, and two ranks still write what one writes."""
    corpus = tmp_path / "train.csv"
    lines = ["text,label"]
    for i, row in enumerate(_rows(120, seed=2)):
        text = row["text"].replace('"', '""')
        more = " then\na new line" if i % 5 == 0 else ""
        lines.append(f'"{text}{more}",{row["label"]}')
    corpus.write_text("\n".join(lines) + "\n")
    common = [
        f"data.train={corpus}",
        "data.format=csv",
        f"model.name_or_path={tiny_model_dir}",
        "data.examples_per_shard=25",
    ]
    one = _prepare(tmp_path, "csv-one", 1, *common)
    assert one["manifest"]["splits"]["train"]["n_examples"] == 120
    _same(one, _prepare(tmp_path, "csv-two", 2, *common), 2)


@pytest.mark.parametrize("fmt", ["jsonl", "text", "csv"])
def test_every_cut_counts_each_record_once(tmp_path, fmt):
    """Two byte ranges cut at every byte of a small file: the counts add up to the
    records, a line straddling the cut is counted by the range it starts in, and every
    mark names the byte and line of a record's start."""
    rows = _rows(12, seed=3)
    if fmt == "jsonl":
        data = _jsonl(rows)
    elif fmt == "text":
        data = "".join(
            r["text"] + ("\n  \n" if i % 4 == 0 else "\n") for i, r in enumerate(rows)
        ).encode()
    else:
        data = (
            "text,label\n" + "".join(f"{r['label']}{i},x\n ,\n" for i, r in enumerate(rows))
        ).encode()
    path = tmp_path / f"c.{fmt}"
    path.write_bytes(data)
    options = ReadOptions(fmt=fmt)
    truth = list(options.read(path))
    assert len(truth) == 12
    line_starts = [0] + [i + 1 for i, b in enumerate(data) if b == 0x0A]
    for cut in range(len(data) + 1):
        pieces = [ranges.Piece(0, 0, cut), ranges.Piece(0, cut, len(data))]
        counts = [ranges.count_piece(path, fmt, p) for p in pieces]
        assert sum(c.records for c in counts) == 12, cut
        [index] = ranges.index_files([path], pieces, counts)
        for record, offset, line in index.marks[1:]:
            assert offset in line_starts
            first = next(options.read(path, (offset, line)))
            assert first == truth[record], (cut, record)


def test_a_rank_starts_at_its_own_record(tmp_path):
    """Reading from any record starts at the mark before it and skips the rest: every
    start gives the records from there on."""
    path = tmp_path / "c.jsonl"
    path.write_bytes(_jsonl(_rows(50, seed=4)))
    streams = SplitStreams({"train": [path]}, ReadOptions(fmt="jsonl"), {}, 0)
    old = ranges.MARK_EVERY
    ranges.MARK_EVERY = 8
    try:
        streams.count(SingleProcess())
    finally:
        ranges.MARK_EVERY = old
    assert len(streams.index["train"][0].marks) == 1 + 7
    truth = list(streams.examples("train"))
    for start in (0, 1, 7, 8, 9, 31, 49):
        assert list(streams.examples("train", start)) == truth[start:]


def _damaged(tmp_path: Path, how: str) -> Path:
    blob = gzip.compress(_jsonl(_rows(400, seed=5)))
    if how == "crc":  # the trailer's CRC-32, wrong
        blob = blob[:-8] + bytes([blob[-8] ^ 0xFF]) + blob[-7:]
    else:
        blob = blob[: len(blob) // 2]
    path = tmp_path / f"{how}.jsonl.gz"
    path.write_bytes(blob)
    return path


@pytest.mark.parametrize("how", ["crc", "truncated"])
def test_a_damaged_gzip_file_is_named(tmp_path, how):
    path = _damaged(tmp_path, how)
    streams = SplitStreams({"train": [path]}, ReadOptions(fmt="jsonl"), {}, 0)
    with pytest.raises(UserError, match=rf"{path}: damaged or incomplete gzip file"):
        streams.count(SingleProcess())


@pytest.mark.timeout(120)
def test_a_problem_in_one_rank_s_range_stops_every_rank(tmp_path, tiny_model_dir):
    """Bad JSON in the second half of the file, which rank 1 reads: both ranks fail
    with the file and its line number, counted from the start of the file."""
    rows = _jsonl(_rows(80, seed=6)).decode().splitlines()
    rows[-10] = "{not json"
    corpus = tmp_path / "train.jsonl"
    corpus.write_text("\n".join(rows) + "\n")
    errors = _run_ranks(
        tmp_path,
        "bad",
        2,
        f"data.train={corpus}",
        f"model.name_or_path={tiny_model_dir}",
        "data.examples_per_shard=20",
    )
    assert len(errors) == 2
    for error in errors:
        assert isinstance(error, UserError)
        assert f"{corpus}:{len(rows) - 9}: not valid JSON" in str(error)


def test_a_pattern_that_matches_nothing_is_refused(tmp_path):
    with pytest.raises(UserError, match="data.train: no file matches the pattern"):
        ranges.corpus_files(str(tmp_path / "*.jsonl.gz"), "data.train")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="holds no corpus file"):
        ranges.corpus_files(str(tmp_path / "empty"), "data.train")


def test_nth_member_is_the_index_of_the_nth_record_of_a_split():
    member = np.random.default_rng(0).integers(0, 3, 1000).astype(np.uint8)
    for code in range(3):
        where = np.flatnonzero(member == code)
        for n in (0, 1, 17, len(where) - 1, len(where)):
            expected = int(where[n]) if n < len(where) else 1000
            assert nth_member(member, code, n, chunk=64) == expected


def test_the_ranks_share_the_hashing_of_the_source_files(tmp_path, monkeypatch):
    """Three ranks hash disjoint shares of the files (a large file in blocks), none
    reads them all, and every rank records what one rank records: a small file's
    SHA-256, a large one's per-block SHA-256s."""
    monkeypatch.setattr(sources, "BLOCK_BYTES", 1000)
    files = []
    for k, size in enumerate([2500, 300, 0, 1000, 700]):
        files.append(tmp_path / f"part-{k}.txt")
        files[-1].write_bytes(random.Random(k).randbytes(size))
    read: dict[int, list[tuple[str, int, int]]] = {}
    hash_block = sources.hash_block

    def recording(path: Path, start: int, length: int) -> str:
        read.setdefault(threading.get_ident(), []).append((path.name, start, length))
        return hash_block(path, start, length)

    monkeypatch.setattr(sources, "hash_block", recording)
    one = sources.file_records(files, SingleProcess())
    assert len(read) == 1 and sum(n for *_, n in read.popitem()[1]) == 4500
    results: dict[int, list[dict[str, Any]]] = {}

    def rank(r: int) -> None:
        results[r] = sources.file_records(files, FileCommunicator(tmp_path / ".rdv", r, 3, 60))

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert results == {0: one, 1: one, 2: one}
    shares = list(read.values())
    assert len(shares) == 3 and all(sum(n for *_, n in s) < 4500 for s in shares)
    blocks = sorted(b for s in shares for b in s)
    assert len(blocks) == len(set(blocks)) == 7  # 3 blocks, then one per file (one empty)
    data = files[0].read_bytes()
    assert one[0]["sha256_blocks"] == {
        "block_bytes": 1000,
        "digests": [hashlib.sha256(data[i : i + 1000]).hexdigest() for i in (0, 1000, 2000)],
    }
    assert one[0]["bytes"] == 2500 and "sha256" not in one[0]
    assert one[3]["sha256"] == hashlib.sha256(files[3].read_bytes()).hexdigest()
    assert one[2]["sha256"] == hashlib.sha256(b"").hexdigest()


def _conll(n: int, seed: int = 0) -> bytes:
    """``n`` sentences: tab- or space-separated, ``-DOCSTART-`` lines (and a token that
    looks like one), break lines blank, doubled, of whitespace (tab, no-break space), CRLF."""
    rng = random.Random(seed)
    out = ["\n"]
    for i in range(n):
        if i % 9 == 0:
            out.append("-DOCSTART- O\n" + "\n" * rng.randint(0, 2))
        sep = "\t" if i % 4 else " "
        for _ in range(rng.randint(1, 6)):
            out.append(f"{rng.choice(WORDS)}{sep}{rng.choice(['O', 'B-x', 'I-x'])}\n")
        if i % 5 == 1:  # a tagged "-DOCSTART-" token after a space: no break (tab columns)
            out.append(" -DOCSTART-\tO\n")
        out.append(rng.choice(["\n", "\n\n", " \t\n", "\u00a0\n", "\r\n"]))
    return "".join(out).encode()


def _fasta(n: int, seed: int = 0) -> bytes:
    """``n`` records: sequences over several lines, comments and blank lines between."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        out.append(f">p{i} kind={'xyz'[i * 3 // n]}\n")
        for _ in range(rng.randint(1, 3)):
            out.append("".join(rng.choices("ACDEFGHIKLMNPQRSTVWY", k=rng.randint(1, 12))) + "\n")
        out.append(rng.choice(["", "\n", "; a comment\n"]))
    return "".join(out).encode()


@pytest.mark.parametrize("fmt", ["conll", "fasta"])
def test_every_cut_of_a_conll_or_fasta_file_counts_each_record_once(tmp_path, fmt):
    """Two byte ranges cut at every byte: the counts add up to the records (a sentence
    belongs to the range its break line starts in, a FASTA record to its header's), the
    marks start the reader at those records, and each range's span parses to its own."""
    data = _conll(8, seed=3) if fmt == "conll" else _fasta(8, seed=3)
    path = tmp_path / f"c.{fmt}"
    path.write_bytes(data)
    options = ReadOptions(fmt=fmt, label_field="kind" if fmt == "fasta" else None)
    truth = list(options.read(path))
    assert len(truth) == 8
    for cut in range(len(data) + 1):
        pieces = [ranges.Piece(0, 0, cut), ranges.Piece(0, cut, len(data))]
        counts = [ranges.count_records(path, fmt, p) for p in pieces]
        assert sum(c.records for c in counts) == 8, cut
        [index] = ranges.index_files([path], pieces, counts)
        for record, offset, line in index.marks:
            assert next(options.read(path, (offset, line))) == truth[record], (cut, record)
        first = 0
        for count, before in zip(counts, ranges.lines_before(pieces, counts), strict=True):
            if count.span is not None:
                offset, line, stop = count.span
                parsed = list(options.read(path, (offset, before + line + 1), stop))
                assert parsed == truth[first : first + count.records], cut
            first += count.records


@pytest.mark.timeout(240)
def test_one_conll_file_on_three_ranks_gives_the_shards_of_one(tmp_path, tiny_model_dir):
    """A single CoNLL file cut into byte ranges (marks every 8 sentences): three ranks
    write the files and manifest of one."""
    corpus = tmp_path / "train.conll"
    corpus.write_bytes(_conll(150, seed=7))
    common = [
        f"data.train={corpus}",
        "data.format=conll",
        "task=token_classification",
        f"model.name_or_path={tiny_model_dir}",
        "data.examples_per_shard=20",
        "data.split.dev_ratio=0.1",
    ]
    old, ranges.MARK_EVERY = ranges.MARK_EVERY, 8
    try:
        one = _prepare(tmp_path, "conll-one", 1, *common)
        three = _prepare(tmp_path, "conll-three", 3, *common)
    finally:
        ranges.MARK_EVERY = old
    assert one["manifest"]["splits"]["train"]["n_examples"] == 135
    assert len(ranges.plan_pieces([corpus], "conll", 3)) == 3  # counted as byte ranges
    _same(one, three, 3)


@pytest.mark.timeout(240)
def test_one_fasta_file_on_two_ranks_gives_the_shards_of_one(tmp_path, tiny_protein_bert):
    """A single FASTA file cut into byte ranges: two ranks write the files, labels and
    manifest of one."""
    corpus = tmp_path / "train.fasta"
    corpus.write_bytes(_fasta(120, seed=8))
    common = [
        f"data.train={corpus}",
        "data.format=fasta",
        "data.label_field=kind",
        "data.residue_separator=' '",
        f"model.name_or_path={tiny_protein_bert}",
        "data.examples_per_shard=25",
    ]
    one = _prepare(tmp_path, "fasta-one", 1, *common)
    assert one["manifest"]["labels"] == ["x", "y", "z"]
    assert len(ranges.plan_pieces([corpus], "fasta", 2)) == 2  # counted as byte ranges
    _same(one, _prepare(tmp_path, "fasta-two", 2, *common), 2)


@pytest.mark.timeout(120)
def test_a_bad_conll_line_in_one_rank_s_range_stops_every_rank(tmp_path, tiny_model_dir):
    """A CoNLL line without a tag in the second half of the file, which rank 1 parses:
    both ranks fail naming it by its line from the start of the file."""
    lines = _conll(60, seed=9).decode().splitlines(keepends=True)
    bad = next(i for i in range(len(lines) * 3 // 4, len(lines)) if "\t" in lines[i])
    lines[bad] = lines[bad].split("\t")[0] + "\n"
    corpus = tmp_path / "train.conll"
    corpus.write_text("".join(lines))
    errors = _run_ranks(
        tmp_path,
        "bad-conll",
        2,
        f"data.train={corpus}",
        "data.format=conll",
        "task=token_classification",
        f"model.name_or_path={tiny_model_dir}",
    )
    assert len(errors) == 2
    for error in errors:
        assert isinstance(error, UserError)
        assert f"{corpus}:{bad + 1}: expected at least 2 columns" in str(error)


def test_a_sequence_before_the_first_fasta_header_is_refused_on_two_ranks(tmp_path):
    """What precedes the first record is parsed too (by the rank of the file's first
    range): both ranks fail naming the line."""
    path = tmp_path / "bad.fasta"
    path.write_bytes(b"ACDE\n" + _fasta(20, seed=10))
    errors: list[BaseException] = []

    def rank(r: int) -> None:
        streams = SplitStreams(
            {"train": [path]}, ReadOptions(fmt="fasta", label_field="kind"), {}, 0
        )
        try:
            streams.count(FileCommunicator(tmp_path / ".rdv", r, 2, 60))
        except UserError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(errors) == 2
    assert all(f"{path}:1: sequence line before the first '>' header" in str(e) for e in errors)
