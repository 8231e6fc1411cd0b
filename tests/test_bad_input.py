"""Bad input to ``scilm prepare`` and ``scilm validate --data``: exit status 2, a message
naming the file (and line), and no shard or staging directory left behind."""

from __future__ import annotations

import errno
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from scilm_hpc.data.shards import MANIFEST, ShardInfo, file_sha256, read_shard
from scilm_hpc.errors import UserError

Scilm = Callable[..., tuple[int, str, str]]

TRAIN_ROWS = [{"text": f"protein {i} binds the receptor", "label": "ab"[i % 2]} for i in range(6)]


def errors(err: str) -> list[str]:
    """The ``error:`` lines scilm printed on stderr."""
    return [line for line in err.splitlines() if line.startswith("error: ")]


def tree_checksums(root: Path) -> dict[str, str]:
    """SHA-256 of every file under ``root``, by relative path."""
    return {
        p.relative_to(root).as_posix(): file_sha256(p)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def assert_nothing_left(shards: Path) -> None:
    """No shard directory, no manifest and no staging / old directory beside it."""
    assert not shards.exists()
    assert not (shards / MANIFEST).exists()
    beside = sorted(p.name for p in shards.parent.glob(f".{shards.name}.*"))
    assert beside == [], beside


@pytest.fixture
def prepare(scilm: Scilm, tmp_path: Path, tiny_model_dir: Path) -> Callable[..., tuple]:
    """Run ``scilm prepare jobs/prepare.yaml`` in this process with the tiny model.

    Returns (exit status, stdout, stderr, shard directory).
    """
    from tests.conftest import REPO

    shards = tmp_path / "run" / "shards"

    def run(*overrides: str) -> tuple[int, str, str, Path]:
        code, out, err = scilm(
            "prepare",
            REPO / "jobs" / "prepare.yaml",
            "cluster=none",
            f"run.dir={tmp_path / 'run'}",
            f"model.name_or_path={tiny_model_dir}",
            *overrides,
        )
        return code, out, err, shards

    return run


# --- corpus files ---------------------------------------------------------------------------


def test_good_corpus_prepares(
    prepare: Callable[..., tuple], write_jsonl: Callable[..., Path]
) -> None:
    """The control for every case below: the same command on good input succeeds."""
    train = write_jsonl("train.jsonl", TRAIN_ROWS)
    code, _, err, shards = prepare(f"data.train={train}")
    assert (code, errors(err)) == (0, [])
    manifest = json.loads((shards / MANIFEST).read_text(encoding="utf-8"))
    assert manifest["splits"]["train"]["n_examples"] == 6
    assert manifest["labels"] == ["a", "b"]
    assert list(shards.parent.glob(f".{shards.name}.*")) == []


def test_empty_corpus(prepare: Callable[..., tuple], tmp_path: Path) -> None:
    train = tmp_path / "empty.jsonl"
    train.write_text("\n\n", encoding="utf-8")
    code, _, err, shards = prepare(f"data.train={train}")
    assert code == 2
    assert errors(err) == [f"error: {train}: the corpus is empty (no jsonl example in it)"]
    assert_nothing_left(shards)


def test_jsonl_row_missing_text_field(
    prepare: Callable[..., tuple], write_jsonl: Callable[..., Path]
) -> None:
    train = write_jsonl(
        "train.jsonl", [*TRAIN_ROWS[:2], {"body": "no text", "label": "a"}, *TRAIN_ROWS[2:]]
    )
    code, _, err, shards = prepare(f"data.train={train}")
    assert code == 2
    (line,) = errors(err)
    assert line.startswith(f"error: {train}:3: missing text field 'text' (data.text_field)")
    assert "fields present: body, label" in line
    assert_nothing_left(shards)


def test_jsonl_row_missing_label_field(
    prepare: Callable[..., tuple], write_jsonl: Callable[..., Path]
) -> None:
    train = write_jsonl(
        "train.jsonl", [*TRAIN_ROWS, {"text": "unlabelled"}, {"text": "also", "label": ""}]
    )
    code, _, err, shards = prepare(f"data.train={train}")
    assert code == 2
    lines = errors(err)
    assert len(lines) == 2, err
    for number, line in zip((7, 8), lines, strict=True):
        assert line.startswith(
            f"error: {train}:{number}: label field 'label' (data.label_field) missing"
        )
    assert_nothing_left(shards)


def test_jsonl_row_not_json(prepare: Callable[..., tuple], tmp_path: Path) -> None:
    train = tmp_path / "train.jsonl"
    train.write_text(json.dumps(TRAIN_ROWS[0]) + "\n{not json\n", encoding="utf-8")
    code, _, err, shards = prepare(f"data.train={train}")
    assert code == 2
    (line,) = errors(err)
    assert line.startswith(f"error: {train}:2: not valid JSON")
    assert_nothing_left(shards)


def test_dev_label_absent_from_train(
    prepare: Callable[..., tuple], write_jsonl: Callable[..., Path]
) -> None:
    train = write_jsonl("train.jsonl", TRAIN_ROWS)
    dev = write_jsonl("dev.jsonl", [{"text": "ok", "label": "a"}, {"text": "new", "label": "zzz"}])
    code, _, err, shards = prepare(f"data.train={train}", f"data.dev={dev}")
    assert code == 2
    (line,) = errors(err)
    assert line.startswith(
        f"error: {dev}:2: dev label 'zzz' does not occur in the training split (labels there: a, b)"
    )
    assert_nothing_left(shards)


def test_malformed_conll(prepare: Callable[..., tuple], tmp_path: Path) -> None:
    train = tmp_path / "train.conll"
    train.write_text("Aspirin\tO\nreduces\tO\nfever\n\nAPC2\tNN\tB-Disease\n", encoding="utf-8")
    code, _, err, shards = prepare(
        f"data.train={train}", "data.format=conll", "task=token_classification"
    )
    assert code == 2
    lines = errors(err)
    assert len(lines) == 2, err
    assert lines[0].startswith(f"error: {train}:3: expected at least 2 columns")
    assert "got 1: 'fever'" in lines[0]
    assert lines[1] == f"error: {train}:5: 3 columns where earlier lines have 2"
    assert_nothing_left(shards)


def test_not_utf8(prepare: Callable[..., tuple], tmp_path: Path) -> None:
    train = tmp_path / "train.jsonl"
    good = json.dumps(TRAIN_ROWS[0]).encode()
    train.write_bytes(good + b"\n" + b'{"text": "caf\xe9", "label": "a"}\n' + good + b"\n")
    code, _, err, shards = prepare(f"data.train={train}")
    assert code == 2
    (line,) = errors(err)
    assert line.startswith(f"error: {train}:2: not valid UTF-8 (byte 0xe9 at column 14)")
    assert_nothing_left(shards)


def test_missing_model_directory(
    prepare: Callable[..., tuple], tmp_path: Path, write_jsonl: Callable[..., Path]
) -> None:
    train = write_jsonl("train.jsonl", TRAIN_ROWS)
    code, _, err, shards = prepare(f"data.train={train}", "model.name_or_path=/nonexistent/x")
    assert code == 2
    (line,) = errors(err)
    assert line.startswith("error: model.name_or_path: directory '/nonexistent/x' does not exist")
    assert not (tmp_path / "run").exists()  # refused by validation, before anything is written


@pytest.mark.parametrize("name", ["ft/export", "runs-x/compressed"])
def test_missing_run_model_folder_is_a_path_not_a_hub_id(name: str) -> None:
    from scilm_hpc.model_source import looks_like_path, path_problem

    assert looks_like_path(name)
    problem = path_problem(name)
    assert problem is not None and f"directory '{name}' does not exist" in problem


@pytest.mark.parametrize("name", ["bert-base-uncased", "allenai/scibert_scivocab_uncased"])
def test_hub_ids_stay_hub_ids(name: str) -> None:
    from scilm_hpc.model_source import looks_like_path, path_problem

    assert not looks_like_path(name)
    assert path_problem(name) is None


def test_local_model_directory_without_tokenizer_files(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    from scilm_hpc.model_source import load_tokenizer

    model = tmp_path / "model"
    model.mkdir()
    shutil.copy(tiny_model_dir / "config.json", model / "config.json")
    with pytest.raises(UserError) as caught:
        load_tokenizer(str(model))
    (problem,) = caught.value.problems
    assert problem.startswith(
        f"model.name_or_path: the local directory '{model}' holds no tokenizer files"
    )
    assert "save_pretrained" in problem
    assert "network" not in problem and "hub" not in problem


def test_failure_while_writing_removes_staging(
    prepare: Callable[..., tuple], write_jsonl: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    import scilm_hpc.jobs.prepare as prepare_module

    real_write_shard = prepare_module.write_shard
    calls = []

    # a disk that fills up at the second shard: the OSError the filesystem raises there,
    # from the shard writer's call (a real full disk cannot be provoked for one shard)
    def failing_write_shard(*args: object, **kwargs: object) -> ShardInfo:
        calls.append(args[1])
        if len(calls) == 2:
            path = Path(str(args[0])) / str(args[1])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real_write_shard(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(prepare_module, "write_shard", failing_write_shard)
    train = write_jsonl("train.jsonl", TRAIN_ROWS)
    code, _, err, shards = prepare(f"data.train={train}", "data.examples_per_shard=2")
    assert code == 3  # a storage error: neither success nor a user mistake
    (line,) = errors(err)
    assert line.startswith("error: No space left on device (ENOSPC) writing ")
    assert "train/shard-00001.h5; " in line and " MiB free there" in line
    assert calls == ["train/shard-00000.h5", "train/shard-00001.h5"]
    assert_nothing_left(shards)


# --- existing shard directories ---------------------------------------------------------------


def test_existing_shards_kept_without_overwrite(
    prepare: Callable[..., tuple], write_jsonl: Callable[..., Path]
) -> None:
    train = write_jsonl("train.jsonl", TRAIN_ROWS)
    code, _, err, shards = prepare(f"data.train={train}")
    assert code == 0, err
    before = tree_checksums(shards)
    assert "manifest.json" in before and "train/shard-00000.h5" in before

    other = write_jsonl("other.jsonl", TRAIN_ROWS[:4])
    code, _, err, _ = prepare(f"data.train={other}")
    assert code == 2
    (line,) = errors(err)
    assert line == (
        f"error: data.shards: '{shards}' already holds prepared shards; pass "
        f"data.overwrite=true to replace them"
    )
    assert tree_checksums(shards) == before
    assert list(shards.parent.glob(f".{shards.name}.*")) == []

    code, _, err, _ = prepare(f"data.train={other}", "data.overwrite=true")
    assert code == 0, err
    after = tree_checksums(shards)
    assert after["train/shard-00000.h5"] != before["train/shard-00000.h5"]
    manifest = json.loads((shards / MANIFEST).read_text(encoding="utf-8"))
    assert manifest["splits"]["train"]["n_examples"] == 4
    assert manifest["sources"]["train"]["path"] == str(other.resolve())
    assert list(shards.parent.glob(f".{shards.name}.*")) == []


def test_existing_directory_that_is_not_shards(
    prepare: Callable[..., tuple], tmp_path: Path, write_jsonl: Callable[..., Path]
) -> None:
    train = write_jsonl("train.jsonl", TRAIN_ROWS)
    shards = tmp_path / "run" / "shards"
    shards.mkdir(parents=True)
    (shards / "notes.txt").write_text("mine\n", encoding="utf-8")
    code, _, err, _ = prepare(f"data.train={train}", "data.overwrite=true")
    assert code == 2
    assert "exists and is not a shard directory" in errors(err)[0]
    assert sorted(p.name for p in shards.iterdir()) == ["notes.txt"]
    assert list(shards.parent.glob(f".{shards.name}.*")) == []


# --- damaged shards, checked by `scilm validate --data` -----------------------------------------


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> dict[str, Path]:
    """Shards prepared once (train + dev) with MiniLM's tokenizer, copied by each test."""
    from scilm_hpc.config import load_and_validate
    from scilm_hpc.jobs.prepare import PrepareJob

    root = tmp_path_factory.mktemp("pristine")
    train = root / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in TRAIN_ROWS * 3), encoding="utf-8")
    dev = root / "dev.jsonl"
    dev.write_text("".join(json.dumps(r) + "\n" for r in TRAIN_ROWS[:3]), encoding="utf-8")
    job = load_and_validate(
        None,
        [
            "cluster=none",
            f"run.dir={root / 'run'}",
            f"data.train={train}",
            f"data.dev={dev}",
            "data.examples_per_shard=8",
            f"model.name_or_path={tiny_model_dir}",
        ],
        job="prepare",
    )
    PrepareJob(job)()
    return {"train": train, "dev": dev, "shards": Path(job.data.shards)}


@pytest.fixture
def shard_job(pristine: dict[str, Path], tmp_path: Path, tiny_model_dir: Path) -> tuple[Path, Path]:
    """A fresh copy of the pristine shards and a job file pointing at it."""
    shards = tmp_path / "shards"
    shutil.copytree(pristine["shards"], shards)
    job = tmp_path / "job.yaml"
    job.write_text(
        yaml.safe_dump(
            {
                "job": "prepare",
                "run": {"dir": str(tmp_path / "run")},
                "cluster": {"backend": "none"},
                "model": {"name_or_path": str(tiny_model_dir)},
                "data": {"train": str(pristine["train"]), "shards": str(shards)},
            }
        ),
        encoding="utf-8",
    )
    return job, shards


def test_intact_shards_validate(scilm: Scilm, shard_job: tuple[Path, Path]) -> None:
    job, shards = shard_job
    code, out, err = scilm("validate", job, "--data")
    assert (code, err) == (0, "")
    assert f"{shards}: train: 18 examples" in out
    assert "in 3 shard(s), checksums match" in out
    assert f"{shards}: dev: 3 examples" in out


def test_missing_shard_directory(scilm: Scilm, shard_job: tuple[Path, Path]) -> None:
    job, shards = shard_job
    shutil.rmtree(shards)
    code, _, err = scilm("validate", job, "--data")
    assert code == 2
    assert f"data.shards: no manifest.json in '{shards}' (the directory does not exist)" in err


def test_truncated_shard(scilm: Scilm, shard_job: tuple[Path, Path]) -> None:
    job, shards = shard_job
    shard = shards / "train" / "shard-00001.h5"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    code, _, err = scilm("validate", job, "--data")
    assert code == 2
    (line,) = errors(err)
    assert line == (
        f"error: {shard}: shard is {len(data) // 2} bytes, the manifest says "
        f"{len(data)}; it is truncated or was replaced"
    )


def test_truncated_shard_refused_by_reader(shard_job: tuple[Path, Path]) -> None:
    _, shards = shard_job
    manifest = json.loads((shards / MANIFEST).read_text(encoding="utf-8"))
    info = ShardInfo(**manifest["splits"]["train"]["shards"][0])
    shard = shards / info.file
    shard.write_bytes(shard.read_bytes()[:700])
    with pytest.raises(UserError) as caught:
        read_shard(shard, info)
    assert caught.value.problems[0].startswith(f"{shard}: shard is corrupt or truncated")


@pytest.fixture
def first_shard(shard_job: tuple[Path, Path]) -> tuple[Path, ShardInfo]:
    """The first train shard of ``shard_job`` and its manifest entry."""
    _, shards = shard_job
    manifest = json.loads((shards / MANIFEST).read_text(encoding="utf-8"))
    info = ShardInfo(**manifest["splits"]["train"]["shards"][0])
    return shards / info.file, info


def test_missing_shard_file_is_not_called_corrupt(first_shard: tuple[Path, ShardInfo]) -> None:
    shard, info = first_shard
    shard.unlink()
    with pytest.raises(UserError) as caught:
        read_shard(shard, info)
    (problem,) = caught.value.problems
    assert problem.startswith(f"{shard}: shard file is missing")
    assert "corrupt" not in problem


def test_unreadable_shard_says_why_not_corrupt(
    first_shard: tuple[Path, ShardInfo], monkeypatch: pytest.MonkeyPatch
) -> None:
    shard, info = first_shard
    opened = Path.open

    def denied(self: Path, *args, **kwargs):
        if self == shard:
            raise PermissionError(13, "Permission denied", str(self))
        return opened(self, *args, **kwargs)

    # a chmod would not do: the tests may run as root, which reads any file
    monkeypatch.setattr(Path, "open", denied)
    with pytest.raises(UserError) as caught:
        read_shard(shard, info)
    (problem,) = caught.value.problems
    assert problem.startswith(f"{shard}: cannot read the shard (Permission denied)")
    assert "corrupt" not in problem and "permissions" in problem


def test_flipped_bytes_same_size(scilm: Scilm, shard_job: tuple[Path, Path]) -> None:
    job, shards = shard_job
    shard = shards / "dev" / "shard-00000.h5"
    data = bytearray(shard.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 4] = bytes(b ^ 0xFF for b in data[middle : middle + 4])
    shard.write_bytes(bytes(data))
    assert shard.stat().st_size == len(data)
    code, _, err = scilm("validate", job, "--data")
    assert code == 2
    (line,) = errors(err)
    assert line.startswith(f"error: {shard}: SHA-256 differs from the manifest")


def test_counts_differ_from_manifest(scilm: Scilm, shard_job: tuple[Path, Path]) -> None:
    from scilm_hpc.data.dataset import ShardDataset

    job, shards = shard_job
    path = shards / MANIFEST
    manifest = json.loads(path.read_text(encoding="utf-8"))
    entry = manifest["splits"]["train"]["shards"][0]
    entry["n_examples"] += 1
    manifest["splits"]["train"]["n_examples"] += 1
    path.write_text(json.dumps(manifest), encoding="utf-8")
    shard = shards / entry["file"]
    expected = (
        f"{shard}: shard holds 8 examples / {entry['n_tokens']} tokens, the manifest "
        f"says 9 / {entry['n_tokens']}; the shard does not match its manifest"
    )

    dataset = ShardDataset(shards, "train")
    with pytest.raises(UserError) as caught:
        dataset[0]
    assert caught.value.problems == [expected]

    code, _, err = scilm("validate", job, "--data")
    assert code == 2
    assert errors(err) == [f"error: {expected}"]


def test_other_tokenizer_refused(
    scilm: Scilm,
    shard_job: tuple[Path, Path],
    tiny_model_dir: Path,
    other_tokenizer_model_dir: Path,
) -> None:
    job, shards = shard_job
    code, _, err = scilm(
        "validate", job, "--data", f"model.name_or_path={other_tokenizer_model_dir}"
    )
    assert code == 2
    (line,) = errors(err)
    assert line.startswith(
        f"error: data.shards: '{shards}' was prepared with the tokenizer of "
        f"'{tiny_model_dir}', which differs from the tokenizer of "
        f"model.name_or_path='{other_tokenizer_model_dir}'"
    )
    # The same tokenizer under another model name (the packaged MiniLM) is accepted.
    code, _, err = scilm("validate", job, "--data", "model.name_or_path=minilm")
    assert (code, err) == (0, "")


def dataset_byte_offset(shard: Path, name: str) -> int:
    """File offset of the first byte of dataset ``name`` in an HDF5 shard."""
    import h5py

    with h5py.File(shard, "r") as fh:
        ds = fh[name]
        offset = ds.id.get_offset()
        return int(offset if offset is not None else ds.id.get_chunk_info(0).byte_offset)


@pytest.mark.parametrize("name", ["labels", "input_ids", "offsets"])
def test_a_flipped_byte_is_refused_on_first_read(shard_job: tuple[Path, Path], name: str) -> None:
    from scilm_hpc.data.dataset import ShardDataset

    _, shards = shard_job
    shard = shards / "train" / "shard-00001.h5"
    data = bytearray(shard.read_bytes())
    data[dataset_byte_offset(shard, name)] ^= 0x01
    shard.write_bytes(bytes(data))
    dataset = ShardDataset(shards, "train")
    assert len(dataset[0]["input_ids"]) > 0  # shard 0 is intact
    with pytest.raises(UserError) as caught:
        dataset[8]  # the first example of shard 1
    assert caught.value.problems == [
        f"{shard}: SHA-256 differs from the manifest; the shard is corrupt or was "
        f"modified; prepare the shards again"
    ]


def test_an_unreadable_shard_is_not_called_corrupt(
    shard_job: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    # root reads a chmod-000 file anyway, so the open's PermissionError is raised by hand
    import scilm_hpc.data.dataset as dataset_module

    _, shards = shard_job
    shard = shards / "train" / "shard-00000.h5"

    def refused(path: Path) -> str:
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))

    monkeypatch.setattr(dataset_module, "file_sha256", refused)
    with pytest.raises(UserError) as caught:
        dataset_module.ShardDataset(shards, "train")[0]
    assert caught.value.problems == [
        f"{shard}: cannot read the shard (Permission denied); fix its permissions "
        f"(the shard itself may be intact: do not prepare it again for this)"
    ]
