"""What a test needs from outside the clone, and the one rule for when it is missing:
skip with the reason on a developer's machine, fail in CI (``CI=true``; ``.ci/run`` sets it),
where no tier may be skipped silently."""

from __future__ import annotations

import os
from pathlib import Path
from typing import NoReturn

import pytest

REPO = Path(__file__).resolve().parents[1]
#: The public datasets beside the clone (``../shared/data``); ``SCILM_SHARED_DATA`` points
#: elsewhere (or at a missing folder, to see what a fresh clone sees).
SHARED_DATA = Path(os.environ.get("SCILM_SHARED_DATA") or REPO.parent / "shared" / "data")


def in_ci() -> bool:
    """Whether the tests run in CI (``CI`` set to true, 1 or yes)."""
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


def skip_unless_ci(reason: str) -> NoReturn:
    """Skip the calling test with ``reason``; in CI fail it instead."""
    if in_ci():
        pytest.fail(f"{reason} (CI=true: a missing prerequisite is a failure)", pytrace=False)
    pytest.skip(reason)


def shared_data(name: str) -> Path:
    """The shared dataset folder ``name`` (e.g. ``scicite``) under ``SHARED_DATA``.

    Raises:
        pytest.skip.Exception: the folder is missing (a fresh clone), outside CI.
        pytest.fail.Exception: the folder is missing in CI.
    """
    folder = SHARED_DATA / name
    if not folder.is_dir():
        skip_unless_ci(
            f"shared dataset folder {folder} is missing (no ../shared/data beside the clone; "
            "SCILM_SHARED_DATA names another location)"
        )
    return folder
