"""The run directory's files: atomic writes, directory swaps, tolerant readers, status
on damaged files."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from scilm_hpc import rundir
from scilm_hpc.errors import UserError
from scilm_hpc.rundir import (
    RunLock,
    live_owner,
    read_json,
    read_jsonl,
    read_owner,
    replace_dir,
    write_json_atomic,
)

from .conftest import REPO


def test_atomic_write_replaces_and_leaves_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    write_json_atomic(path, {"a": 1})
    write_json_atomic(path, {"a": 2})
    assert json.loads(path.read_text()) == {"a": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


def test_a_failed_write_keeps_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "state.json"
    write_json_atomic(path, {"a": 1})

    def full_disk(fd: int) -> None:  # fsync is where a full disk (NFS, quota) shows up
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(rundir.os, "fsync", full_disk)
    with pytest.raises(OSError, match="No space"):
        write_json_atomic(path, {"a": 2})
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {"a": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


def test_replace_dir_never_leaves_neither(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target, staging = tmp_path / "export", tmp_path / "export.tmp"
    target.mkdir()
    (target / "old").write_text("old")
    staging.mkdir()
    (staging / "new").write_text("new")
    seen = []
    real_replace = os.replace

    def watching_replace(src: str | Path, dst: str | Path) -> None:
        real_replace(src, dst)
        # after every rename one complete directory exists: at target or set aside
        seen.append(target.is_dir() or any(tmp_path.glob(".export.old-*")))

    monkeypatch.setattr(rundir.os, "replace", watching_replace)
    replace_dir(staging, target)
    assert seen == [True, True]
    assert sorted(p.name for p in target.iterdir()) == ["new"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def test_partial_last_line_is_skipped_with_a_warning(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
    with pytest.warns(UserWarning, match=r"metrics.jsonl: line 3 is not valid JSON"):
        rows = read_jsonl(path)
    assert [r["step"] for r in rows] == [1, 2]


def test_truncated_json_reads_as_absent_with_a_warning(tmp_path: Path) -> None:
    path = tmp_path / "jobs.json"
    path.write_text('[{"job_id": "12", "kind": "fin')
    with pytest.warns(UserWarning, match="jobs.json: unreadable JSON"):
        assert read_json(path, []) == []
    assert read_json(tmp_path / "missing.json", {}) == {}


def test_metrics_truncation_drops_a_partial_line_before_appending(tmp_path: Path) -> None:
    from scilm_hpc.train.report import MetricsLog

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
    log = MetricsLog(path, enabled=True)
    with pytest.warns(UserWarning, match="line 3"):
        log.truncate_after(2)
    log.write({"step": 3, "loss": 1.0})
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [1, 2, 3]


def test_status_survives_damaged_state_jobs_and_metrics(tmp_path: Path, scilm) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "state.json").write_text('{"state": "runn')
    (run / "jobs.json").write_text('[{"job_id": "1')
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo')
    with pytest.warns(UserWarning):
        code, out, err = scilm("status", str(run))
    assert code == 0, err
    status = json.loads(out)
    assert status["state"] == "unknown" and status["jobs"] == []
    assert status["step"] == 1 and status["last_metrics"] == {"step": 1, "loss": 2.0}


# --- one run per directory ------------------------------------------------------------------

HOLD_LOCK = """
import sys, time
from scilm_hpc.rundir import RunLock
RunLock(sys.argv[1], "finetune", job_id="4242").acquire()
print("locked", flush=True)
time.sleep(120)
"""


def hold_lock(run: Path) -> subprocess.Popen:
    """Another process holding ``run``'s lock (as a running job's rank 0 does)."""
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(run)], stdout=subprocess.PIPE, text=True
    )
    assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
    return holder


@pytest.mark.timeout(60)
def test_a_live_lock_is_refused_naming_its_owner_and_a_dead_one_taken_over(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    holder = hold_lock(tmp_path)
    try:
        with pytest.raises(UserError) as err:
            RunLock(tmp_path, "compress").acquire()
        message = str(err.value)
        assert f"is in use by finetune job 4242 (pid {holder.pid} on {socket.gethostname()}" in (
            message
        )
        assert live_owner(tmp_path)["pid"] == holder.pid
    finally:
        holder.kill()  # SIGKILL: no chance to release
        holder.wait()
    assert live_owner(tmp_path) is None
    with RunLock(tmp_path, "finetune"):
        assert f"taking over the lock of finetune job 4242 (pid {holder.pid}" in (
            capsys.readouterr().out
        )
        assert read_owner(tmp_path)["pid"] == os.getpid()
    assert read_owner(tmp_path)["released"] is True
    with RunLock(tmp_path, "finetune"):  # after a clean release: no message
        assert capsys.readouterr().out == ""


@pytest.mark.timeout(60)
def test_a_second_job_on_a_live_directory_is_refused_before_config_is_rewritten(
    tmp_path: Path, scilm
) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("the live run's config\n")
    holder = hold_lock(run)
    try:
        code, _, err = scilm("finetune", REPO / "jobs" / "finetune.yaml", f"run.dir={run}")
    finally:
        holder.kill()
        holder.wait()
    assert code == 2
    assert f"error: run.dir: '{run}' is in use by finetune job 4242 (pid {holder.pid}" in err
    assert (run / "config.yaml").read_text() == "the live run's config\n"


@pytest.mark.timeout(60)
def test_status_names_the_live_owner(tmp_path: Path, scilm) -> None:
    holder = hold_lock(tmp_path)
    try:
        code, out, _ = scilm("status", str(tmp_path))
    finally:
        holder.kill()
        holder.wait()
    assert code == 0
    assert json.loads(out)["lock"]["pid"] == holder.pid
    assert json.loads(scilm("status", str(tmp_path))[1])["lock"] is None


@pytest.mark.parametrize(
    ("state", "refused"),
    [("PENDING", True), ("RUNNING", True), ("COMPLETED", False), ("UNKNOWN", False)],
)
def test_a_recorded_slurm_job_still_queued_or_running_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, state: str, refused: bool
) -> None:
    # scontrol's answer is faked here; the dev-cluster tier runs the real one
    from scilm_hpc.runtime import ownership, slurm

    slurm.record_job(tmp_path, "77", "finetune", "slurm")
    monkeypatch.setattr(slurm, "slurm_state", lambda job_id: {"state": state})
    if refused:
        with pytest.raises(UserError, match=f"belongs to Slurm job 77 \\(finetune, {state}\\)"):
            ownership.refuse_if_busy(tmp_path, "compress")
    else:
        ownership.refuse_if_busy(tmp_path, "compress")
    ownership.refuse_if_busy(tmp_path, "prepare")  # prepare takes no lock
