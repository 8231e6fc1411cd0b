"""Errors a user can cause (the CLI exits with status 2) and storage errors (status 3)."""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path


class UserError(Exception):
    """A mistake in the user's input: config, corpus, paths or shards.

    The message says what was given and what is allowed. Instances pickle
    cleanly (submitit ships a job's exception back to the submitter), so the
    only constructor argument is the message (or the list of problems).
    """

    def __init__(self, message: str | list[str]) -> None:
        problems = [message] if isinstance(message, str) else list(message)
        super().__init__("\n".join(problems))
        self.problems = problems

    def __reduce__(self) -> tuple[type, tuple[list[str]]]:
        return (type(self), (self.problems,))


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name when it has none): the
    part worth quoting in a ``UserError`` about a library's failure."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class ConfigError(UserError):
    """One or more problems in a job configuration, each naming its dotted key."""


STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EROFS})


class StorageError(Exception):
    """The filesystem refused a write: disk full, quota exceeded, no permission, read-only.

    Not the user's config, not a bug: the CLI prints the message (which names the
    path) and exits with status 3. Picklable like ``UserError``.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __reduce__(self) -> tuple[type, tuple[str]]:
        return (type(self), (self.message,))


def free_space_note(path: str | os.PathLike[str]) -> str:
    """``; 120.5 MiB free there`` for the filesystem holding ``path`` (or its nearest
    existing parent); empty if that cannot be told."""
    probe = Path(path)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        free = shutil.disk_usage(probe).free
    except OSError:
        return ""
    return f"; {free / 2**20:.1f} MiB free there"


def storage_error(exc: OSError, path: str | os.PathLike[str] | None = None) -> StorageError:
    """A ``StorageError`` naming the path of ``exc`` (or ``path``) and, for a full disk
    or quota, the space left."""
    where = exc.filename if exc.filename is not None else path
    name = errno.errorcode.get(exc.errno or 0, "OSError")
    what = f"{exc.strerror or exc} ({name})"
    text = f"{what} writing {where}" if where is not None else what
    if exc.errno in (errno.ENOSPC, errno.EDQUOT) and where is not None:
        text += free_space_note(where)
    return StorageError(text)
