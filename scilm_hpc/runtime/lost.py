"""Lost ranks: telling a peer that vanished (SIGKILL, OOM-kill, node failure) from one
that failed on an error of its own.

When a rank dies without a word, the others learn it from their next collective:
gloo raises ``RuntimeError: ... Connection closed by peer`` or ``Read error ...
Connection reset by peer`` (measured: within a second of the SIGKILL), NCCL a
``DistBackendError``. A rank that raises an ordinary error closes its connections
the same way, so the error alone does not say whether the job should requeue (the
peer is gone: run again from the last checkpoint) or fail (the peer's own error
would come back on every restart).

The heartbeats (``runtime.history``) tell them apart. A rank that fails on its own
error marks its heartbeat ``failed`` *before* it leaves (its connections close only
when it destroys the process group or exits); a rank whose collective broke marks
``peer-error``. The survivor then looks at every other rank of the same job attempt:

- ``failed``: the peer's own error caused this one: not a loss;
- ``peer-error`` (or ``ended``): a fellow survivor;
- a heartbeat from this host whose process is gone: lost (sure at once);
- otherwise: lost unless its heartbeat moves within ``grace_s`` (its watchdog
  rewrites it every few seconds; another host's process cannot be probed).

``find_lost`` returns the lost ranks' last heartbeats, or None when a peer failed on
its own. The watchdog (``Watchdog.on_exception``) then ends the job like a hang.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from typing import Any

from scilm_hpc.runtime.history import heartbeats

#: Fragments of the errors torch.distributed raises when a peer's connection breaks
#: (gloo over TCP; NCCL reports through ``DistBackendError``/``DistNetworkError``).
BROKEN_PEER = (
    "connection closed by peer",
    "connection reset by peer",
    "broken pipe",
    "remote worker",
    "nccl communicator was aborted",
    "connection refused",
)
OWN_FAILURE = "failed"  # heartbeat phase of a rank that failed on its own error
PEER_ERROR = "peer-error"  # heartbeat phase of a rank whose collective broke
SURVIVOR_PHASES = (PEER_ERROR, "ended")


def broken_collective(exc: BaseException) -> bool:
    """Whether ``exc`` (or what caused it) says a peer's connection broke."""
    seen: set[int] = set()
    error: BaseException | None = exc
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if type(error).__name__ in ("DistNetworkError", "DistBackendError"):
            return True
        text = str(error).lower()
        if any(fragment in text for fragment in BROKEN_PEER):
            return True
        error = error.__cause__ or error.__context__
    return False


def _process_gone(pid: int) -> bool:
    if pid <= 0:
        return False  # no pid to probe (never os.kill(0 or -1, ...): a process group)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # someone else's process holds the pid: alive, not ours to judge
    try:  # a zombie (killed, not yet reaped by its launcher) is gone too
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except (OSError, IndexError):
        return False


def find_lost(
    run_dir: Path, attempt: str, me: int, world: int, grace_s: float = 6.0, poll_s: float = 0.1
) -> list[dict[str, Any]] | None:
    """The ranks of this job attempt that are gone (see the module docstring).

    Args:
        run_dir: the run directory (heartbeats).
        attempt: the job attempt (``Watchdog.attempt``); older heartbeats are ignored.
        me: this rank (a survivor).
        world: number of ranks.
        grace_s: how long a rank of another host may take to show it is alive.
        poll_s: how often the heartbeats are read meanwhile.

    Returns:
        Each lost rank's last heartbeat (``{"rank": r}`` alone for a rank that never
        wrote one in this attempt), or None if a peer failed on its own error.
    """
    host = socket.gethostname()
    first: dict[int, Any] = {}
    deadline = time.monotonic() + grace_s
    while True:
        beats = {
            b["rank"]: b
            for b in heartbeats(run_dir)
            if b.get("attempt") == attempt and b["rank"] != me
        }
        if any(b.get("phase") == OWN_FAILURE for b in beats.values()):
            return None
        lost, pending = [], []
        for rank in range(world):
            if rank == me:
                continue
            beat = beats.get(rank)
            first.setdefault(rank, beat and beat.get("unix"))
            if beat is None:
                pending.append({"rank": rank})
            elif beat.get("phase") in SURVIVOR_PHASES or beat.get("unix") != first[rank]:
                continue  # alive: it says so, or its watchdog still writes
            elif beat.get("host") == host and _process_gone(int(beat.get("pid") or 0)):
                lost.append(beat)
            else:
                pending.append(beat)
        if not pending or time.monotonic() >= deadline:
            return sorted(lost + pending, key=lambda b: b["rank"])
        time.sleep(poll_s)
