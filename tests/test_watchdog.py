"""Hung ranks, the run's history and requeue failures (``runtime.watchdog``,
``runtime.history``, ``runtime.preemption.requeue``)."""

from __future__ import annotations

import json
import os
import re
import stat
import time
import warnings
from pathlib import Path

import pytest
from safetensors.torch import load_file

from scilm_hpc.rundir import read_jsonl
from scilm_hpc.runtime.history import append_event, hang_summary, read_events
from scilm_hpc.runtime.preemption import requeue
from scilm_hpc.runtime.status import run_status, write_run_state
from scilm_hpc.runtime.watchdog import HANG_EXIT_CODE, Watchdog

from .conftest import REPO, scilm_run

FINETUNE = str(REPO / "jobs" / "finetune.yaml")


# --- the run's history ------------------------------------------------------------------


def test_history_keeps_every_state_and_survives_a_partial_line(tmp_path: Path) -> None:
    run = tmp_path / "run"
    write_run_state(run, "running", step=0, restarts=0)
    write_run_state(run, "requeued", step=4, reason="SIGUSR2 at step 4: requeued as restart 1")
    with (run / "events.jsonl").open("a") as fh:
        fh.write('{"event": "runn')  # a writer killed mid-line
    write_run_state(run, "running", step=4, restarts=1)
    write_run_state(run, "completed", step=8, reason="reached the last step")
    with pytest.warns(UserWarning, match="line 3 is not valid JSON"):
        status = run_status(run)
    assert [(h["event"], h.get("step")) for h in status["history"]] == [
        ("running", 0),
        ("requeued", 4),
        ("running", 4),
        ("completed", 8),
    ]
    assert status["state"] == "completed" and status["restarts"] == 1
    assert "requeued as restart 1" in status["history"][1]["reason"]


def test_status_names_the_rank_that_hung_and_its_stacks(tmp_path: Path, scilm) -> None:
    for rank, phase in ((0, "all-reduce"), (1, "train")):
        append_event(
            tmp_path, "hung", rank=rank, step=5, phase=phase, dump=f"hangs/rank{rank}-x.txt",
            attempt="7-0",
        )  # fmt: skip
    write_run_state(tmp_path, "hung", event=False, step=5, rank=0, reason="rank 0 hung")
    code, out, _ = scilm("status", str(tmp_path))
    status = json.loads(out)
    assert code == 0 and status["state"] == "hung"
    # the rank found outside the all-reduce comes first: the others only waited for it
    assert status["reason"] == (
        "no progress on rank 1 in train at step 5 (stacks: hangs/rank1-x.txt); "
        "rank 0 in all-reduce at step 5 (stacks: hangs/rank0-x.txt)"
    )
    assert [h["event"] for h in status["history"]] == ["hung", "hung"]


def test_hang_summary_only_names_the_last_attempt() -> None:
    events = [
        {"event": "hung", "rank": 0, "phase": "train", "step": 2, "dump": "a", "attempt": "1-0"},
        {"event": "running", "step": 2},
        {"event": "hung", "rank": 1, "phase": "save", "step": 4, "dump": "b", "attempt": "2-0"},
    ]
    assert hang_summary(events) == "no progress on rank 1 in save at step 4 (stacks: b)"
    assert hang_summary(events[1:2]) is None


# --- the watchdog's limit ---------------------------------------------------------------


def test_auto_limit_follows_the_measured_step_time(tmp_path: Path) -> None:
    dog = Watchdog(tmp_path, 0, 1, hang_timeout_s=0, collective_timeout_s=600, max_requeues=0)
    assert dog.limit() is None  # start-up is not watched
    dog.at_allreduce(1)
    assert dog.limit() is None  # nor the first step: its all-reduce waits for slow starters
    dog.beat(1)
    assert dog.limit() == 600  # warm-up: only the collectives' timeout
    for step in range(2, 9):
        dog.since -= 10.0  # each step took 10 s
        dog.beat(step)
    assert dog.step_limit() == pytest.approx(200.0, rel=0.01)  # 20 x 10 s
    dog.beat(8, "save")
    assert dog.limit() == 600  # saving may take much longer than a step
    explicit = Watchdog(tmp_path, 0, 1, hang_timeout_s=3, collective_timeout_s=600, max_requeues=0)
    explicit.beat(0)
    assert explicit.limit() == 3


WATCHED_RANK = """
import sys, time
from pathlib import Path
from scilm_hpc.runtime import watchdog
run, rank, mode = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
dog = watchdog.Watchdog(run, rank, 2, hang_timeout_s=0.5, collective_timeout_s=60, max_requeues=0)
watchdog.install(dog)
watchdog.beat(3)
def stuck_in_a_collective():
    if mode == "exception":
        try:
            raise RuntimeError("Connection closed by peer")
        except RuntimeError:
            dog.on_exception()
            raise
    time.sleep(30)
stuck_in_a_collective()
"""


def watched_rank(run: Path, rank: int, mode: str = "sleep"):
    import subprocess
    import sys

    env = {**os.environ, "SUBMITIT_LOCAL_JOB_ID": "77"}
    return subprocess.run(
        [sys.executable, "-c", WATCHED_RANK, str(run), str(rank), mode],
        capture_output=True, text=True, timeout=60, env=env,
    )  # fmt: skip


def test_a_stuck_rank_dumps_its_stacks_records_and_exits(tmp_path: Path) -> None:
    start = time.monotonic()
    done = watched_rank(tmp_path, 1)
    assert done.returncode == HANG_EXIT_CODE, done.stderr
    assert time.monotonic() - start < 20  # not the 30 s sleep
    (event,) = read_events(tmp_path)
    assert (event["event"], event["rank"], event["step"], event["phase"]) == ("hung", 1, 4, "train")
    assert 0.5 <= event["stalled_s"] < 2.0
    dump = (tmp_path / event["dump"]).read_text()
    assert dump.startswith("rank 1 of 2") and "in stuck_in_a_collective" in dump
    state = json.loads((tmp_path / "state.json").read_text())
    assert state["state"] == "hung" and state["rank"] == 1
    assert f"continue with: scilm resume {tmp_path}" in state["reason"]
    # a rank of the same job whose collective then fails ends the same way, not "failed"
    peer = watched_rank(tmp_path, 0, "exception")
    assert peer.returncode == HANG_EXIT_CODE, peer.stderr
    assert "a collective failed after another rank hung (rank 1)" in peer.stderr
    # one still waiting sees the first rank's marker and follows it at once
    waiting = watched_rank(tmp_path, 0)
    assert waiting.returncode == HANG_EXIT_CODE, waiting.stderr
    assert "another rank hung (rank 1); ending with it" in waiting.stderr
    assert [e["rank"] for e in read_events(tmp_path)] == [1, 0, 0]


# --- requeue failures -------------------------------------------------------------------


def fake_scontrol(folder: Path, exit_status: int) -> Path:
    """A real ``scontrol`` executable that logs its calls and exits with ``exit_status``."""
    folder.mkdir()
    script = folder / "scontrol"
    script.write_text(
        f'#!/bin/sh\necho "$@" >> "{folder}/calls"\n'
        f'[ {exit_status} -eq 0 ] || echo "slurm_requeue error: Socket timed out" >&2\n'
        f"exit {exit_status}\n"
    )
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return folder


def test_requeue_retries_with_backoff_then_reports(tmp_path, monkeypatch) -> None:
    folder = fake_scontrol(tmp_path / "bin", 1)
    monkeypatch.setenv("PATH", f"{folder}:/usr/bin:/bin")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    start = time.monotonic()
    requeued, reason = requeue(3, attempts=3, first_delay_s=0.1)
    waited = time.monotonic() - start
    assert not requeued
    assert reason.startswith("scontrol requeue 4242 failed after 3 attempt(s): slurm_requeue")
    assert (folder / "calls").read_text().splitlines() == ["requeue 4242"] * 3
    assert waited >= 0.3  # 0.1 s, then 0.2 s between the attempts


def test_requeue_without_scontrol_is_a_message(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no scontrol anywhere
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    requeued, reason = requeue(3, attempts=3, first_delay_s=0.1)
    assert not requeued
    assert "failed after 1 attempt(s): scontrol is not on the PATH" in reason


def test_a_job_slurm_requeued_itself_counts_as_requeued(tmp_path, monkeypatch) -> None:
    # a node failure: Slurm requeues the job (JobRequeue=1) before the ranks ask; the real
    # scontrol 22.05 then answers exactly this (on the dev cluster, exit status 1)
    folder = tmp_path / "bin"
    folder.mkdir()
    script = folder / "scontrol"
    script.write_text(
        f'#!/bin/sh\necho "$@" >> "{folder}/calls"\n'
        'echo "Job is pending execution for job 4242" >&2\nexit 1\n'
    )
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{folder}:/usr/bin:/bin")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    assert requeue(3, first_delay_s=5) == (True, "requeued by Slurm already, as restart 1")
    assert (folder / "calls").read_text().splitlines() == ["requeue 4242"]  # no retries


def test_requeue_succeeds_and_counts(tmp_path, monkeypatch) -> None:
    folder = fake_scontrol(tmp_path / "bin", 0)
    monkeypatch.setenv("PATH", f"{folder}:/usr/bin:/bin")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    assert requeue(3, first_delay_s=0.1) == (True, "requeued as restart 2")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "3")
    assert requeue(3) == (False, "requeued 3 times already (cluster.max_requeues)")


# --- a hung rank in a real two-rank finetune ---------------------------------------------


def finetune(run: Path, shards: Path, model: Path, *overrides: str, fault: str | None = None):
    return scilm_run(
        "finetune",
        FINETUNE,
        f"run.dir={run}",
        f"data.shards={shards}",
        f"model.name_or_path={model}",
        "cluster=local",
        "cluster.tasks_per_node=2",
        "zero.stage=2",
        "train.micro_batch_size=4",
        "train.log_every=1",
        "train.seed=7",
        "train.max_steps=6",
        "train.checkpoint_every=2",
        "train.eval_every=0",
        *overrides,
        fault=fault,
        timeout=480,  # a DeepSpeed op build on a loaded machine can take minutes
    )


def assert_same_export(run: Path, reference: Path) -> None:
    a, b = (
        load_file(run / "export" / "model.safetensors"),
        load_file(reference / "export" / "model.safetensors"),
    )
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


@pytest.mark.integration
@pytest.mark.timeout(1800)
def test_a_hung_rank_then_a_lost_one_end_the_job_and_resume_finishes_equal(
    tmp_path, shards, tiny_model_dir
) -> None:
    """One run meets both faults (one start-up fewer than two tests): rank 1 hangs at
    step 5; the resume loses rank 1 to a SIGKILL at step 5; the next resume finishes."""
    straight = tmp_path / "straight"
    done = finetune(straight, shards, tiny_model_dir)
    assert done.returncode == 0, done.stderr[-3000:]
    # each rank's work before the step's first collective, by rank (train.stragglers)
    rows = [r for r in read_jsonl(straight / "metrics.jsonl") if "loss" in r]
    assert len(rows) == 6 and all(len(r["rank_local_s"]) == 2 for r in rows)
    assert all(0 < s < 60 for r in rows for s in r["rank_local_s"])

    run = tmp_path / "hung"
    hung = finetune(
        run, shards, tiny_model_dir, "train.hang_timeout_s=5", fault="hang_before_allreduce:5"
    )
    ended = time.time()
    assert hung.returncode == HANG_EXIT_CODE, hung.stderr[-3000:]
    assert f"continue from the last checkpoint with: scilm resume {run}" in hung.stderr
    events = [e for e in read_events(run) if e["event"] == "hung"]
    assert {e["rank"] for e in events} == {0, 1}  # both ranks ended, neither waited on
    sleeper = next(e for e in events if e["rank"] == 1)
    assert sleeper["step"] == 5 and sleeper["phase"] == "train"
    assert 5.0 <= sleeper["stalled_s"] < 9.0, sleeper  # detected within the limit
    dump = (run / sleeper["dump"]).read_text()
    assert "_test_hang_before_allreduce" in dump and "Thread" in dump
    # every rank gone and scilm returned within seconds of the detection, not at the
    # 600 s collective timeout
    seconds = ended - max(e["unix"] for e in events)
    assert seconds < 60, seconds
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no damaged line in the history
        hung_status = run_status(run)
    assert hung_status["state"] == "hung" and "rank 1 in train at step 5" in hung_status["reason"]
    assert re.search(r"rank 1 hung in train at step 5", _logs(run, 1))

    # the resume loses rank 1 (SIGKILL before the all-reduce of step 5): the survivor
    # ends like a hang (exit 4, resume advised), not as a failed run
    lost = scilm_run("resume", str(run), fault="kill_before_allreduce:5", timeout=480)
    ended = time.time()
    assert lost.returncode == HANG_EXIT_CODE, lost.stderr[-3000:]
    assert "lost rank 1" in lost.stderr
    assert f"continue from the last checkpoint with: scilm resume {run}" in lost.stderr
    killed = re.search(
        r"SIGKILL before the all-reduce of step 5 at ([0-9.]+)", _logs(run, 1, "out")
    )
    assert killed, _logs(run, 1, "out")
    (event,) = [e for e in read_events(run) if e["event"] == "rank_lost"]
    assert (event["rank"], event["reported_by"], event["step"]) == (1, 0, 5), event
    assert event["phase"] == "all-reduce" and 0 <= event["last_heartbeat"]["step"] <= 5
    assert "Connection" in event["reason"]  # gloo's own words
    detected = event["unix"] - float(killed.group(1))
    assert 0 <= detected < 15, detected  # seconds, not the 600 s collective timeout
    assert ended - event["unix"] < 60
    lost_status = run_status(run)
    assert lost_status["state"] == "rank_lost"
    assert (
        lost_status["reason"].startswith("lost rank 1 on ") and "at step 5" in lost_status["reason"]
    )

    resumed = scilm_run("resume", str(run), timeout=480)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from step_4" in "".join(
        p.read_text() for p in (run / "submitit").glob("*_0_log.out")
    )
    assert_same_export(run, straight)

    status = run_status(run)
    assert status["state"] == "completed" and status["restarts"] == 2
    history = [(h["event"], h.get("step"), h.get("rank")) for h in status["history"]]
    assert sorted(h for h in history if h[0] == "hung") == [("hung", 5, 0), ("hung", 5, 1)]
    assert [h for h in history if h[0] != "hung"] == [
        ("running", 0, None),
        ("running", 4, None),  # resumed at the last checkpoint
        ("rank_lost", 5, 1),
        ("running", 4, None),
        ("completed", 6, None),
    ]
    assert not any(h[0] == "failed" for h in history)
    beats = {b["rank"]: b for b in status["ranks"]}
    assert beats[0]["phase"] == beats[1]["phase"] == "ended" and beats[1]["step"] == 6
    # latencies (for the note): hang: last step to the dump; lost: SIGKILL to the event
    print(
        f"hang detected after {sleeper['stalled_s']} s; lost rank detected after "
        f"{detected:.2f} s; scilm ended {ended - event['unix']:.1f} s later"
    )


def _logs(run: Path, rank: int, kind: str = "err") -> str:
    return "".join(p.read_text() for p in (run / "submitit").glob(f"*_{rank}_log.{kind}"))


@pytest.fixture(autouse=True)
def _no_fault(monkeypatch) -> None:
    monkeypatch.delenv("SCILM_FAULT", raising=False)
    os.environ.pop("SCILM_FAULT", None)


def test_timeouts_are_checked(scilm, tmp_path) -> None:
    code, _, err = scilm(
        "validate",
        FINETUNE,
        f"run.dir={tmp_path / 'run'}",
        "cluster.collective_timeout_s=0",
        "train.hang_timeout_s=-1",
    )
    assert code == 2
    assert "error: cluster.collective_timeout_s: " in err and "error: train.hang_timeout_s: " in err


# --- a lost rank: real gloo ranks, one SIGKILLed or failing on its own --------------------

GLOO_RANK = """
import os, sys, time
from datetime import timedelta
import torch, torch.distributed as dist
from scilm_hpc.runtime import watchdog
run, rank, port, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
dist.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=120))
dog = watchdog.Watchdog(Path := __import__("pathlib").Path(run), rank, 2, 60, 120, 0)
watchdog.install(dog)
try:
    for step in range(1, 6):
        if mode == "fail" and rank == 1 and step == 3:
            raise ValueError("rank 1's own mistake")
        watchdog.at_allreduce(step)
        dist.all_reduce(torch.ones(2))
        watchdog.beat(step)
        dog._heartbeat()  # every step (the thread writes every 5 s)
except Exception as exc:
    dog.on_exception(exc)
    print(f"rank {rank} failed: {exc}", flush=True)
    sys.exit(1)
"""


def gloo_pair(run: Path, mode: str, fault: str | None = None):
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    env = {**os.environ, "SUBMITIT_LOCAL_JOB_ID": f"gloo-{mode}"}
    env.pop("SLURM_JOB_ID", None)
    if fault:
        env["SCILM_FAULT"] = fault
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", GLOO_RANK, str(run), str(rank), port, mode],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )  # fmt: skip
        for rank in (0, 1)
    ]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    return [p.returncode for p in procs], outs


@pytest.mark.timeout(300)
def test_a_peer_failing_on_its_own_error_is_not_lost(tmp_path: Path) -> None:
    """Real gloo: rank 1 fails on its own error, which breaks rank 0's all-reduce with
    the same "Connection closed/reset by peer" as a SIGKILL would. Rank 0 fails too
    (no requeue: the error would come back), and nothing is called lost. (A SIGKILLed
    rank: ``test_a_lost_rank_ends_the_job_like_a_hang_and_resume_finishes_equal``.)"""
    codes, outs = gloo_pair(tmp_path, "fail", None)
    assert codes == [1, 1], outs
    assert "rank 0 failed: " in outs[0] and "by peer" in outs[0], outs[0]
    assert not (tmp_path / "events.jsonl").exists() and not (tmp_path / "hangs").exists()
    beat = json.loads((tmp_path / "heartbeat" / "rank1.json").read_text())
    assert beat["phase"] == "failed" and beat["error"] == "rank 1's own mistake"
    assert json.loads((tmp_path / "heartbeat" / "rank0.json").read_text())["phase"] == "peer-error"


SILENT_PEER = """
import sys, time
from pathlib import Path
from scilm_hpc.runtime import watchdog
from scilm_hpc.runtime.history import write_heartbeat
run = Path(sys.argv[1])
watchdog.PEER_SILENT_S, watchdog.HEARTBEAT_S = 1.0, 0.2  # 30 s and 5 s, scaled down
dog = watchdog.Watchdog(run, 0, 2, hang_timeout_s=60, collective_timeout_s=60, max_requeues=0)
watchdog.install(dog)
watchdog.beat(3)
watchdog.at_allreduce(4)
# rank 1's last heartbeat, from another host, then nothing: its node vanished silently
beat = {"step": 3, "phase": "train", "time": "t", "unix": time.time(), "host": "node-gone"}
write_heartbeat(run, 1, {**beat, "pid": 12345, "attempt": dog.attempt})
time.sleep(30)  # waiting in the all-reduce for a peer that will never answer
"""


def test_a_peer_whose_heartbeat_stopped_is_lost_while_this_rank_waits(tmp_path: Path) -> None:
    import subprocess
    import sys

    env = {**os.environ, "SUBMITIT_LOCAL_JOB_ID": "88"}
    start = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-c", SILENT_PEER, str(tmp_path)],
        capture_output=True, text=True, timeout=60, env=env,
    )  # fmt: skip
    assert done.returncode == HANG_EXIT_CODE, done.stderr
    assert time.monotonic() - start < 20  # not the 30 s sleep
    (event,) = read_events(tmp_path)
    assert (event["event"], event["rank"], event["host"], event["step"]) == (
        "rank_lost", 1, "node-gone", 4,
    )  # fmt: skip
    assert event["phase"] == "all-reduce" and event["reason"] == "no heartbeat for more than 1 s"
    assert "lost rank 1 (node-gone) in all-reduce at step 4" in done.stderr
