"""A run's record: its history (every start, resume, stop, requeue, hang, lost rank
and failure, in order) and each rank's heartbeat.

``RUN_DIR/events.jsonl`` gets one JSON line per event, appended with a single
``write`` on an ``O_APPEND`` descriptor and fsynced, so lines from several ranks or
jobs never interleave on a local filesystem and a kill leaves at most one partial
last line (skipped with a warning by the reader, ``rundir.read_jsonl``). It is
the record ``scilm status`` shows after the job is gone, requeued or completed,
with or without Slurm accounting: ``state.json`` holds only the latest state.

Each event carries the Slurm (or submitit local) job id and the restart count
(``SLURM_RESTART_COUNT``) of the job that wrote it.

``RUN_DIR/heartbeat/rank<N>.json`` holds where rank N was when it last reported
(step, phase, time, host, pid), rewritten atomically every few seconds by the
rank's watchdog (``runtime.watchdog``).
"""

from __future__ import annotations

import json
import os
import time
import warnings
from pathlib import Path
from typing import Any

from scilm_hpc.rundir import read_json, read_jsonl, write_json_atomic

EVENTS_FILE = "events.jsonl"
HEARTBEAT_DIR = "heartbeat"


def job_id() -> str | None:
    """The id of the job this process belongs to (Slurm, else submitit local), or None."""
    return os.environ.get("SLURM_JOB_ID") or os.environ.get("SUBMITIT_LOCAL_JOB_ID")


def append_event(run_dir: Path, event: str, **fields: Any) -> None:
    """Append one event to ``RUN_DIR/events.jsonl``.

    Best effort: a filesystem that refuses the line (full disk) costs the history
    line and a warning, never the job's own result or error.
    """
    record = {
        "event": event,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "unix": round(time.time(), 3),
        "job_id": job_id(),
        "restart": int(os.environ.get("SLURM_RESTART_COUNT", "0")),
        **fields,
    }
    line = (json.dumps(record, default=str) + "\n").encode("utf-8")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(run_dir / EVENTS_FILE, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                line = b"\n" + line  # after a killed writer's partial line: a line of its own
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        warnings.warn(
            f"{run_dir / EVENTS_FILE}: event {event!r} not recorded ({exc})", stacklevel=2
        )


def read_events(run_dir: Path) -> list[dict[str, Any]]:
    """The run's events, oldest first (damaged lines skipped with a warning)."""
    return [row for row in read_jsonl(run_dir / EVENTS_FILE) if "event" in row]


def hang_summary(events: list[dict[str, Any]]) -> str | None:
    """One line about the last hang: which rank stopped progressing, in which phase, at
    which step, and where its stacks are. A rank found waiting in the all-reduce is only
    the victim of another one; the rank found elsewhere is named first."""
    hangs = [e for e in events if e["event"] == "hung"]
    if not hangs:
        return None
    attempt = hangs[-1].get("attempt")
    same = [e for e in hangs if e.get("attempt") == attempt]
    same.sort(key=lambda e: e.get("phase") == "all-reduce")
    parts = [
        f"rank {e.get('rank')} in {e.get('phase')} at step {e.get('step')} "
        f"(stacks: {e.get('dump')})"
        for e in same
    ]
    return "no progress on " + "; ".join(parts)


def lost_summary(events: list[dict[str, Any]]) -> str | None:
    """One line about the last lost rank(s): which, on which host, where the job was,
    and the lost rank's last heartbeat."""
    lost = [e for e in events if e["event"] == "rank_lost"]
    if not lost:
        return None
    attempt = lost[-1].get("attempt")
    parts = []
    for e in (e for e in lost if e.get("attempt") == attempt):
        rank = "a rank" if e.get("rank") is None else f"rank {e['rank']}"
        host = f" on {e['host']}" if e.get("host") else ""
        beat = e.get("last_heartbeat") or {}
        last = (
            f" (its last heartbeat: step {beat['step']}, {beat.get('phase')}, {beat.get('time')})"
            if beat.get("step") is not None
            else ""
        )
        parts.append(f"{rank}{host}{last}")
    first = lost[-1]
    return (
        f"lost {'; '.join(parts)} in {first.get('phase')} at step {first.get('step')}: "
        f"{first.get('reason')}"
    )


def fault_summary(events: list[dict[str, Any]]) -> str | None:
    """``hang_summary`` or ``lost_summary``, whichever happened last."""
    faults = [e for e in events if e["event"] in ("hung", "rank_lost")]
    if not faults:
        return None
    return lost_summary(events) if faults[-1]["event"] == "rank_lost" else hang_summary(events)


def history_rows(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The events as ``scilm status`` shows them: the fields that tell what happened."""
    keep = (
        "time", "event", "job_id", "restart", "step", "rank", "host", "phase", "reason", "dump",
    )  # fmt: skip
    return [{k: e[k] for k in keep if e.get(k) is not None} for e in events]


def write_heartbeat(run_dir: Path, rank: int, record: dict[str, Any]) -> None:
    """Rewrite rank ``rank``'s heartbeat file atomically."""
    folder = run_dir / HEARTBEAT_DIR
    folder.mkdir(parents=True, exist_ok=True)
    write_json_atomic(folder / f"rank{rank}.json", {"rank": rank, **record})


def heartbeats(run_dir: Path) -> list[dict[str, Any]]:
    """Every rank's last heartbeat, by rank (unreadable files skipped)."""
    folder = run_dir / HEARTBEAT_DIR
    if not folder.is_dir():
        return []
    found = [read_json(p, None) for p in folder.glob("rank*.json")]
    beats = [b for b in found if isinstance(b, dict) and isinstance(b.get("rank"), int)]
    return sorted(beats, key=lambda b: b["rank"])
