"""The run directory's files: atomic writes and tolerant readers.

Every marker or report a job leaves in a run directory (``config.yaml``,
``state.json``, ``jobs.json``, ``eval.json``, the compress job's step records)
is written through ``write_text_atomic``: a temporary file in the same
directory, fsync, ``os.replace``. A kill or a full disk mid-write leaves the old
file (or none), never a truncated one. ``replace_dir`` swaps a finished
directory in without a moment where neither the old nor the new one exists.

The readers treat what a killed writer can still leave (an append-only log
with a partial last line, a JSON file of another tool) as damage to report and
skip, not as a traceback.

This module is the bottom layer: it imports only the standard library and
``scilm_hpc.errors``.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
import warnings
from pathlib import Path
from typing import Any


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
