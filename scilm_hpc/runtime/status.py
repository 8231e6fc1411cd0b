"""``scilm status`` and ``scilm cancel``: what a run directory's jobs are doing.

The run's own record (``RUN_DIR/state.json``, written by the job: running,
requeued, completed, failed, stopped, with the reason) is combined with Slurm's
view of each recorded job id (``scontrol``, which needs no accounting database)
and with the run's history (``runtime.history``: every start, resume, stop, requeue,
hang and failure) and each rank's last heartbeat (``runtime.watchdog``).
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any

from scilm_hpc.errors import UserError
from scilm_hpc.rundir import (
    latest_tag,
    live_owner,
    read_checkpoint_state,
    read_json,
    read_jsonl,
    write_json_atomic,
)
from scilm_hpc.runtime.history import (
    append_event,
    fault_summary,
    heartbeats,
    history_rows,
    read_events,
)
from scilm_hpc.runtime.slurm import recorded_jobs, slurm_state

STATE_FILE = "state.json"
FINISHED = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
    "PREEMPTED",
}


def write_run_state(run_dir: Path, state: str, event: bool = True, **fields: Any) -> None:
    """Record the run's state (rank 0 only), atomically, and (``event``) append it to the
    run's history."""
    run_dir.mkdir(parents=True, exist_ok=True)
    record = {"state": state, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), **fields}
    write_json_atomic(run_dir / STATE_FILE, record)
    if event:
        append_event(run_dir, state, **fields)


def _last_rows(run_dir: Path) -> tuple[dict | None, dict | None]:
    rows = read_jsonl(run_dir / "metrics.jsonl")
    train = [r for r in rows if "loss" in r]
    dev = [r for r in rows if any(k.startswith("dev_") for k in r)]
    return (train[-1] if train else None), (dev[-1] if dev else None)


def run_status(run_dir: Path) -> dict[str, Any]:
    """Everything ``scilm status`` prints.

    Raises:
        UserError: if ``run_dir`` is not a run directory.
    """
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: no such run directory")
    state_path = run_dir / STATE_FILE
    own = read_json(state_path, {})
    own = own if isinstance(own, dict) else {}
    jobs = []
    for record in recorded_jobs(run_dir):
        entry = dict(record)
        if record["backend"] == "slurm":
            entry.update(slurm_state(record["job_id"]))
        jobs.append(entry)
    tag = latest_tag(run_dir)
    train, dev = _last_rows(run_dir)
    state, reason = own.get("state", "unknown"), own.get("reason")
    events = read_events(run_dir)
    if state in ("hung", "rank_lost"):
        reason = fault_summary(events) or reason
    latest = jobs[-1] if jobs else {}
    slurm = latest.get("state")
    if slurm in FINISHED and slurm != "COMPLETED" and state in ("running", "unknown"):
        # killed from outside (scancel, node failure): the job could not record it
        state, reason = slurm.lower(), f"Slurm job {latest['job_id']} {slurm}"
    elif slurm == "PENDING" and state in ("unknown", "requeued"):
        state = "pending" if state == "unknown" else "requeued"
        reason = reason or f"Slurm: {latest.get('reason', '')}"
    return {
        "run_dir": str(run_dir),
        "state": state,
        "reason": reason,
        "jobs": jobs,
        "step": train["step"] if train else 0,
        "last_checkpoint": tag,
        "checkpoint_step": read_checkpoint_state(run_dir, tag)["step"] if tag else None,
        "last_metrics": train,
        "last_eval": dev,
        "lock": live_owner(run_dir),  # who runs in the directory now (this host's view)
        "restarts": max(0, sum(e["event"] == "running" for e in events) - 1),
        "history": history_rows(events),
        "ranks": heartbeats(run_dir),
    }


def cancel_run(run_dir: Path) -> list[str]:
    """``scancel`` every recorded Slurm job of the run that has not finished."""
    lines = []
    for record in recorded_jobs(run_dir):
        if record["backend"] != "slurm":
            continue
        state = slurm_state(record["job_id"])["state"]
        if state in FINISHED or state == "UNKNOWN":
            lines.append(f"{record['job_id']}: {state}, nothing to cancel")
            continue
        subprocess.run(["scancel", record["job_id"]], check=False, timeout=30)
        lines.append(f"{record['job_id']}: {state} -> cancel requested")
    if not lines:
        lines.append(f"{run_dir}: no Slurm job recorded")
    return lines
