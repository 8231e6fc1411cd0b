"""The HDF5 shard format and its manifest.

A shard ``SPLIT/shard-NNNNN.h5`` holds examples as flat token storage:

- ``input_ids`` int32 [n_tokens]: every example's tokens, back to back (never padded);
- ``offsets`` int64 [n_examples + 1]: example ``i`` is ``input_ids[offsets[i]:offsets[i+1]]``;
- the task's label columns (``tasks.base``): a column named ``token_*`` holds one
  value per token, aligned with ``input_ids`` (``token_labels`` int32: token
  classification, -100 where a token carries no tag; ``token_position_ids`` int32: packed
  causal LM, each token's position in its document, see ``data.packing``); any other
  column one row per example (``labels`` int64: classification). Unpacked causal LM
  stores none. A per-example column of strings is stored as variable-length UTF-8
  (seq2seq keeps its source text and references there, under the shard's checksum).

``manifest.json`` beside the split folders lists every shard with its example
count, token count, byte size and SHA-256, plus the task, label map, tokenizer
fingerprint, max length and the source files. Readers refuse a shard that does
not match its manifest, naming the file.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from scilm_hpc.errors import UserError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class ShardInfo:
    """A shard's entry in the manifest (``file`` is relative to the shard directory)."""

    file: str
    n_examples: int
    n_tokens: int
    bytes: int
    sha256: str


def shard_name(split: str, index: int) -> str:
    """Relative file name of shard ``index`` of ``split``."""
    return f"{split}/shard-{index:05d}.h5"


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


TOKEN_PREFIX = "token_"


def write_shard(
    root: Path,
    name: str,
    input_ids: list[np.ndarray],
    columns: dict[str, list[Any]],
    task: str,
    compression: str = "gzip",
    level: int = 4,
) -> ShardInfo:
    """Write one shard file and return its manifest entry.

    Args:
        root: the shard directory (the staging directory while prepare runs).
        name: relative file name, from ``shard_name``.
        input_ids: one int32 array per example.
        columns: the task's label columns, one entry per example each: an array
            aligned with the example's tokens for a ``token_*`` column, a number (or
            a row of numbers) otherwise.
        task: the task name, recorded in the file.
        compression: ``none``, ``gzip`` or ``lzf``.
        level: gzip level.
    """
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    lengths = np.fromiter((len(a) for a in input_ids), dtype=np.int64, count=len(input_ids))
    offsets = np.zeros(len(input_ids) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    flat = np.concatenate(input_ids).astype(np.int32) if input_ids else np.zeros(0, np.int32)
    opts: dict[str, Any] = {"track_times": False}
    if compression != "none" and flat.size:
        opts.update(compression=compression, shuffle=True)
        if compression == "gzip":
            opts["compression_opts"] = level
    with h5py.File(path, "w", track_order=False) as fh:
        fh.attrs["format_version"] = FORMAT_VERSION
        fh.attrs["task"] = task
        fh.create_dataset("input_ids", data=flat, **opts)
        fh.create_dataset("offsets", data=offsets, track_times=False)
        for column, values in columns.items():
            if column.startswith(TOKEN_PREFIX):
                per_token = np.concatenate(values) if values else np.zeros(0, np.int32)
                fh.create_dataset(column, data=per_token, **opts)
            elif values and isinstance(values[0], str):
                text = np.asarray(values, dtype=h5py.string_dtype("utf-8"))
                fh.create_dataset(column, data=text, track_times=False)
            else:
                fh.create_dataset(column, data=np.asarray(values), track_times=False)
    return ShardInfo(
        file=name,
        n_examples=len(input_ids),
        n_tokens=int(flat.size),
        bytes=path.stat().st_size,
        sha256=file_sha256(path),
    )


@dataclass
class ShardArrays:
    """A shard read fully into memory: token storage and the task's label columns."""

    input_ids: np.ndarray
    offsets: np.ndarray
    columns: dict[str, np.ndarray]

    def item(self, local: int) -> dict[str, Any]:
        """Example ``local``: its ``input_ids`` and one entry per column (``token_``
        dropped from per-token column names)."""
        lo, hi = self.offsets[local], self.offsets[local + 1]
        item: dict[str, Any] = {"input_ids": self.input_ids[lo:hi]}
        for column, values in self.columns.items():
            if column.startswith(TOKEN_PREFIX):
                item[column[len(TOKEN_PREFIX) :]] = values[lo:hi]
            else:
                row = values[local]
                item[column] = row.item() if getattr(row, "ndim", None) == 0 else row
        return item


def read_shard(path: Path, info: ShardInfo) -> ShardArrays:
    """Read a shard file into memory and check it against its manifest entry.

    Raises:
        UserError: naming the file, if it cannot be opened, lacks a dataset, or its
            counts differ from the manifest.
    """
    try:
        path.open("rb").close()  # the OS's reason first: h5py reports any failure as corrupt
    except FileNotFoundError:
        raise UserError(
            f"{path}: shard file is missing (manifest.json lists it); prepare the shards "
            f"again (scilm prepare ... data.overwrite=true)"
        ) from None
    except OSError as exc:
        raise UserError(
            f"{path}: cannot read the shard ({exc.strerror or exc}); check the file's "
            f"permissions and the filesystem, the shard itself may be intact"
        ) from None
    try:
        with h5py.File(path, "r") as fh:
            input_ids = fh["input_ids"][()]
            offsets = fh["offsets"][()]
            columns = {
                k: fh[k].asstr()[()] if h5py.check_string_dtype(fh[k].dtype) else fh[k][()]
                for k in fh
                if k not in ("input_ids", "offsets")
            }
    except (OSError, KeyError, ValueError) as exc:
        raise UserError(
            f"{path}: shard is corrupt or truncated ({exc}); prepare the shards "
            f"again (scilm prepare ... data.overwrite=true)"
        ) from None
    counts = (len(offsets) - 1, int(input_ids.size))
    if counts != (info.n_examples, info.n_tokens) or (offsets.size and offsets[-1] != counts[1]):
        raise UserError(
            f"{path}: shard holds {counts[0]} examples / {counts[1]} tokens, the "
            f"manifest says {info.n_examples} / {info.n_tokens}; the shard does "
            f"not match its manifest"
        )
    for column, values in columns.items():
        expected = input_ids.size if column.startswith(TOKEN_PREFIX) else counts[0]
        if len(values) != expected:
            unit = "tokens" if column.startswith(TOKEN_PREFIX) else "examples"
            raise UserError(
                f"{path}: {column} has {len(values)} entries for {expected} "
                f"{unit}; the shard is corrupt"
            )
    return ShardArrays(input_ids, offsets, columns)


def write_manifest(root: Path, manifest: dict[str, Any]) -> None:
    """Write ``manifest.json`` atomically (temporary file, fsync, rename)."""
    tmp = root / (MANIFEST + ".tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        json.dump(manifest, fh, indent=1, sort_keys=True)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, root / MANIFEST)


def read_manifest(root: str | Path) -> dict[str, Any]:
    """Load and sanity-check ``manifest.json`` of a shard directory.

    Raises:
        UserError: if the directory or manifest is missing, unreadable or of another format.
    """
    root = Path(root)
    path = root / MANIFEST
    if not path.is_file():
        hint = " (the directory does not exist)" if not root.is_dir() else ""
        raise UserError(
            f"data.shards: no {MANIFEST} in '{root}'{hint}; run "
            f"'scilm prepare' first, or point data.shards at its output"
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: manifest is not valid JSON ({exc})") from None
    if manifest.get("format_version") != FORMAT_VERSION:
        raise UserError(
            f"{path}: manifest format {manifest.get('format_version')!r}, this "
            f"scilm reads format {FORMAT_VERSION}"
        )
    return manifest


def split_shards(manifest: dict[str, Any], split: str, root: Path) -> list[ShardInfo]:
    """The shard entries of ``split``.

    Raises:
        UserError: if the manifest has no such split.
    """
    splits = manifest["splits"]
    if split not in splits:
        raise UserError(
            f"split '{split}' is not in {root / MANIFEST}; it has: {', '.join(splits) or 'none'}"
        )
    return [ShardInfo(**entry) for entry in splits[split]["shards"]]


def shard_entry(info: ShardInfo) -> dict[str, Any]:
    """The manifest's JSON form of a shard entry."""
    return asdict(info)
