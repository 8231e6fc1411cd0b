"""Where a run resumes: the newest checkpoint that verifies, never a silent fresh start.

Checkpoint directories are built by hand here (the files DeepSpeed would write are
stand-ins); ``test_finetune.py`` shows the same on real DeepSpeed runs.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from scilm_hpc.errors import UserError
from scilm_hpc.train.checkpoint import STATE, _prune, find_resume_tag
from scilm_hpc.train.manifest import checkpoint_files, hash_files, write_manifest
from scilm_hpc.train.report import MetricsLog


def fake_checkpoint(run: Path, step: int, manifest: bool = True, state: bool = True) -> Path:
    path = run / "checkpoints" / f"step_{step}"
    path.mkdir(parents=True)
    (path / "mp_rank_00_model_states.pt").write_bytes(bytes(range(256)) * 8)
    (path / "rng_rank0.pt").write_bytes(b"rng")
    if state:
        (path / STATE).write_text(json.dumps({"step": step}))
    if manifest:
        write_manifest(path, hash_files(path, checkpoint_files(path)))
    return path


def point_latest(run: Path, step: int) -> None:
    (run / "checkpoints" / "latest").write_text(f"step_{step}\n")


def test_no_checkpoint_is_a_fresh_start(tmp_path: Path) -> None:
    assert find_resume_tag(tmp_path) == (None, [])


def test_latest_is_followed_when_it_verifies(tmp_path: Path) -> None:
    fake_checkpoint(tmp_path, 2)
    fake_checkpoint(tmp_path, 4)
    point_latest(tmp_path, 4)
    assert find_resume_tag(tmp_path) == ("step_4", [])


@pytest.mark.parametrize("latest", ["missing", "garbage", "partial"])
def test_a_bad_latest_falls_back_to_the_newest_complete(tmp_path: Path, latest: str) -> None:
    fake_checkpoint(tmp_path, 2)
    fake_checkpoint(tmp_path, 4)
    if latest == "garbage":
        (tmp_path / "checkpoints" / "latest").write_bytes(b"\xff\x00st")
    if latest == "partial":  # latest names a directory a killed save left half-written
        fake_checkpoint(tmp_path, 6, manifest=False, state=False)
        point_latest(tmp_path, 6)
    tag, notes = find_resume_tag(tmp_path)
    assert tag == "step_4"
    assert notes[-1].endswith("resuming from step_4, the newest complete checkpoint that verifies")


def test_truncated_and_corrupt_files_are_named_and_skipped(tmp_path: Path) -> None:
    fake_checkpoint(tmp_path, 2)
    four = fake_checkpoint(tmp_path, 4)
    six = fake_checkpoint(tmp_path, 6)
    point_latest(tmp_path, 6)
    weights = six / "mp_rank_00_model_states.pt"
    data = bytearray(weights.read_bytes())
    data[100] ^= 0x40
    weights.write_bytes(bytes(data))
    (four / "rng_rank0.pt").write_bytes(b"rn")
    tag, notes = find_resume_tag(tmp_path)
    assert tag == "step_2"
    assert notes[0] == (
        f"checkpoint step_6 skipped (kept on disk): {weights}: checksum does not match "
        f"the manifest (corrupt)"
    )
    assert notes[1] == (
        f"checkpoint step_4 skipped (kept on disk): {four / 'rng_rank0.pt'}: 2 bytes, "
        f"the manifest says 3 (truncated?)"
    )
    assert six.is_dir() and four.is_dir()  # never deleted


def test_no_verifiable_checkpoint_is_refused_with_a_listing(tmp_path: Path, scilm) -> None:
    run = tmp_path / "run"
    two = fake_checkpoint(run, 2)
    (two / "rng_rank0.pt").unlink()
    fake_checkpoint(run, 4, manifest=False, state=False)
    with pytest.raises(UserError) as err:
        find_resume_tag(run)
    assert err.value.problems[1:3] == [
        "  step_4: incomplete (no scilm_state.json: a save that did not finish)",
        f"  step_2: {two / 'rng_rank0.pt'}: missing",
    ]
    (run / "config.yaml").write_text("job: finetune\n")
    code, _, stderr = scilm("resume", str(run))
    assert code == 2
    assert "none is complete and verifies, so the run would start over; refusing" in stderr
    assert "step_2:" in stderr and "step_4: incomplete" in stderr


def test_a_run_that_died_in_its_first_save_starts_from_the_beginning(tmp_path: Path) -> None:
    fake_checkpoint(tmp_path, 2, manifest=False, state=False)
    tag, notes = find_resume_tag(tmp_path)
    assert tag is None
    assert notes == [
        "checkpoint step_2 skipped: incomplete (no scilm_state.json: a save that did not finish)",
        "no checkpoint was ever completed; starting from the beginning",
    ]


def test_a_checkpoint_without_manifest_but_with_its_state_is_complete(tmp_path: Path) -> None:
    fake_checkpoint(tmp_path, 2, manifest=False)  # saved before manifests existed
    point_latest(tmp_path, 2)
    tag, notes = find_resume_tag(tmp_path)
    assert tag == "step_2" and "not verified" in notes[0]


def test_retention_counts_complete_checkpoints_up_to_the_new_one(tmp_path: Path) -> None:
    for step in (2, 4, 6, 8):
        fake_checkpoint(tmp_path, step)
    fake_checkpoint(tmp_path, 10, manifest=False, state=False)  # a partial save, not counted
    # resumed from step_4 (step_6 and step_8 were skipped), now step_5 is saved
    fake_checkpoint(tmp_path, 5)
    _prune(tmp_path / "checkpoints", 2, set(), step=5)
    left = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert left == ["step_10", "step_4", "step_5", "step_6", "step_8"]


def test_a_fresh_start_keeps_earlier_metrics(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n')
    MetricsLog(path, enabled=True).set_aside()
    assert not path.exists()
    (kept,) = tmp_path.glob("metrics.jsonl.before-*")
    assert kept.read_text() == '{"step": 1, "loss": 2.0}\n'
