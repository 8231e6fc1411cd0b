"""The run directory's files: atomic writes, tolerant readers, and the run lock.

Every marker or report a job leaves in a run directory (``config.yaml``,
``state.json``, ``jobs.json``, ``eval.json``, the compress job's step records)
is written through ``write_text_atomic``: a temporary file in the same
directory, fsync, ``os.replace``. A kill or a full disk mid-write leaves the old
file (or none), never a truncated one. ``replace_dir`` swaps a finished
directory in without a moment where neither the old nor the new one exists.

The readers treat what a killed writer can still leave (an append-only log
with a partial last line, a JSON file of another tool) as damage to report and
skip, not as a traceback.

``RunLock`` makes one run own a directory: an ``fcntl.flock`` on ``RUN_DIR/.lock``
held by the process that runs the job (rank 0), with host, pid and Slurm job id
written in the file so that a refused second run can name the owner. The kernel
drops the lock when its holder dies, so a stale lock needs no clean-up. (Lustre
needs its ``flock`` mount option for this across nodes; NFSv4 maps flock to its
own byte-range locks.)

The checkpoint pointer (``checkpoints/latest`` and a checkpoint's ``scilm_state.json``)
is read here, for ``scilm status`` as for the trainer; ``train.checkpoint`` writes it.

This module is the bottom layer: it imports only the standard library and
``scilm_hpc.errors``.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import socket
import time
import uuid
import warnings
from pathlib import Path
from typing import Any

from scilm_hpc.errors import UserError

LOCK_FILE = ".lock"


def config_file(run_dir: str | Path, job: str) -> Path:
    """Where a job of kind ``job`` saves its resolved config in ``run_dir``: finetune's is
    ``config.yaml`` (what ``scilm resume`` reads), the others' ``JOB.config.yaml``."""
    return Path(run_dir) / ("config.yaml" if job == "finetune" else f"{job}.config.yaml")


def _fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable (best effort: some filesystems refuse)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same directory.

    Raises:
        OSError: what the filesystem reported (disk full, permission); the old
            ``path`` is then untouched and the temporary file removed.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:6]}")
    try:
        with tmp.open("wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if exc.filename is None:  # write() and fsync() name no file: name the target
            raise OSError(exc.errno, exc.strerror, str(path)) from exc
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def write_text_atomic(path: str | Path, text: str) -> None:
    """``write_bytes_atomic`` of UTF-8 text."""
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """``obj`` as indented JSON (with a final newline), written atomically."""
    write_text_atomic(path, json.dumps(obj, indent=1) + "\n")


def replace_dir(staging: str | Path, target: str | Path) -> None:
    """Put the finished directory ``staging`` at ``target``, replacing an old one.

    The old directory is renamed aside first, the new one renamed in, and only
    then the old one deleted: at every moment one complete directory is at
    ``target`` or beside it (``.NAME.old-*``), never neither.
    """
    staging, target = Path(staging), Path(target)
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(target, old)
    os.replace(staging, target)
    _fsync_dir(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def read_json(path: str | Path, default: Any = None) -> Any:
    """The JSON content of ``path``; ``default`` if it is absent, and ``default`` with a
    warning if it is unparsable (truncated by a kill before writes were atomic)."""
    path = Path(path)
    if not path.is_file():
        return default
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        warnings.warn(f"{path}: unreadable JSON ({exc}); ignored", stacklevel=2)
        return default


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a JSON-lines file; unparsable lines (a partial last line written by a
    killed process) are skipped with a warning naming the file and line."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    for number, line in enumerate(
        path.read_text(encoding="utf-8", errors="replace").splitlines(), 1
    ):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            warnings.warn(
                f"{path}: line {number} is not valid JSON (a partial write?); skipped",
                stacklevel=2,
            )
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


# --- the checkpoint pointer -----------------------------------------------------------------

#: ``RUN_DIR/checkpoints/latest`` names the newest complete ``step_N`` directory.
LATEST = "latest"
#: A checkpoint's own record (step, sampler position, best metric); its manifest follows it.
CHECKPOINT_STATE = "scilm_state.json"
STEP_DIR = re.compile(r"step_(\d+)")


def checkpoint_root(run_dir: str | Path) -> Path:
    """``RUN_DIR/checkpoints``."""
    return Path(run_dir) / "checkpoints"


def latest_checkpoint_name(run_dir: str | Path) -> str | None:
    """The ``step_N`` that ``checkpoints/latest`` names, whether or not it exists (None if
    the pointer is missing, unreadable or names no step directory)."""
    path = checkpoint_root(run_dir) / LATEST
    try:
        tag = path.read_text(encoding="utf-8", errors="replace").strip()
    except OSError:
        return None
    return tag if STEP_DIR.fullmatch(tag) else None


def latest_tag(run_dir: str | Path) -> str | None:
    """The tag ``checkpoints/latest`` names if that checkpoint has its state, else None
    (no verification: ``train.checkpoint.find_resume_tag`` decides where a run resumes)."""
    tag = latest_checkpoint_name(run_dir)
    return tag if tag and (checkpoint_root(run_dir) / tag / CHECKPOINT_STATE).is_file() else None


def read_checkpoint_state(run_dir: str | Path, tag: str) -> dict[str, Any]:
    """The ``scilm_state.json`` of checkpoint ``tag``."""
    path = checkpoint_root(run_dir) / tag / CHECKPOINT_STATE
    return json.loads(path.read_text(encoding="utf-8"))


# --- the run lock ---------------------------------------------------------------------------


def describe_owner(owner: dict[str, Any]) -> str:
    """``job 123 (pid 456 on node1, since ...)`` for a lock's owner record."""
    job = f"job {owner['job_id']} " if owner.get("job_id") else ""
    return (
        f"{owner.get('command', 'a run')} {job}(pid {owner.get('pid')} on "
        f"{owner.get('host')}, since {owner.get('since')})"
    )


def read_owner(run_dir: str | Path) -> dict[str, Any]:
    """The owner recorded in ``RUN_DIR/.lock`` ({} if none; an empty file is a lock
    just created, not a damaged one)."""
    path = Path(run_dir) / LOCK_FILE
    if not path.is_file() or path.stat().st_size == 0:
        return {}
    owner = read_json(path, {})
    return owner if isinstance(owner, dict) else {}


class RunLock:
    """An exclusive ``fcntl`` lock on ``RUN_DIR/.lock``, held while a job runs.

    The kernel drops the lock when its process dies (also by SIGKILL or on a
    lost node's restart), so a lock whose holder is gone is free: it is taken
    over with a message naming the previous owner. A live holder on this host is
    named in the refusal; one on another host is named as recorded.

    Args:
        run_dir: the run directory.
        command: what takes it (``finetune``, ``compress``, ``evaluate``).
        job_id: the Slurm job id, if any (recorded for ``scilm status`` and refusals).
    """

    def __init__(self, run_dir: str | Path, command: str, job_id: str | None = None) -> None:
        self.path = Path(run_dir) / LOCK_FILE
        self.command, self.job_id = command, job_id
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock.

        Raises:
            UserError: if another live process holds it (named in the message).
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            owner = read_owner(self.path.parent)
            raise UserError(
                f"run.dir: '{self.path.parent}' is in use by {describe_owner(owner)}; "
                f"wait for it, cancel it, or use another run.dir"
            ) from None
        previous = read_owner(self.path.parent)
        if previous.get("pid") and previous.get("released") is not True:
            print(
                f"{self.path.parent}: taking over the lock of {describe_owner(previous)}, "
                f"which is no longer running",
                flush=True,
            )
        owner = {
            "command": self.command,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "job_id": self.job_id,
            "since": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        data = (json.dumps(owner, indent=1) + "\n").encode("utf-8")
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
        os.fsync(fd)
        self._fd = fd

    def release(self) -> None:
        """Mark the lock released (so the next run takes it silently) and drop it."""
        if self._fd is None:
            return
        owner = read_owner(self.path.parent)
        owner["released"] = True
        data = (json.dumps(owner, indent=1) + "\n").encode("utf-8")
        try:
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, data, 0)
        except OSError:
            pass  # a full disk must not hide the job's own result
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def live_owner(run_dir: str | Path) -> dict[str, Any] | None:
    """The owner of a run directory's lock if it is held now (on this host), else None."""
    path = Path(run_dir) / LOCK_FILE
    if not path.is_file():
        return None
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return read_owner(run_dir)
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)
