"""Reading shards: a map-style dataset over every shard of one split.

Files are opened lazily and read whole into memory one shard at a time (a
small LRU), and nothing stays open between calls, so the dataset is safe to
use from DataLoader workers and forked processes. At construction it checks
that every shard exists with the manifest's byte size; when a shard is first
read in a process its SHA-256 is compared with the manifest's (the checksum
covers the whole file: token ids, offsets and labels) and its counts are
checked; ``verify_checksums`` does the same for every shard at once. A shard
that cannot be read (permission, I/O error) is reported as such, not as corrupt.
"""

from __future__ import annotations

import bisect
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

from scilm_hpc.data.shards import (
    ShardArrays,
    ShardInfo,
    file_sha256,
    read_manifest,
    read_shard,
    split_shards,
)
from scilm_hpc.errors import UserError
from scilm_hpc.model_source import tokenizer_fingerprint


class ShardDataset:
    """Examples of one split, indexable ``0 .. len-1`` in prepare's order.

    Args:
        root: the shard directory (``data.shards``).
        split: ``train``, ``dev`` or ``test``.
        cache_shards: how many shards to keep in memory per process.

    Raises:
        UserError: if the manifest or split is missing, or a shard file is missing or
            has another size than the manifest says (the message names the file).
    """

    def __init__(self, root: str | Path, split: str, cache_shards: int = 4) -> None:
        self.root = Path(root)
        self.split = split
        self.manifest = read_manifest(self.root)
        self.task: str = self.manifest["task"]
        self.label_names: list[str] = list(self.manifest["labels"])
        self.shards: list[ShardInfo] = split_shards(self.manifest, split, self.root)
        for info in self.shards:
            path = self.root / info.file
            if not path.is_file():
                raise UserError(f"{path}: shard listed in the manifest is missing")
            size = path.stat().st_size
            if size != info.bytes:
                raise UserError(
                    f"{path}: shard is {size} bytes, the manifest says "
                    f"{info.bytes}; it is truncated or was replaced"
                )
        counts = np.array([s.n_examples for s in self.shards], dtype=np.int64)
        self._starts = np.concatenate([[0], np.cumsum(counts)])
        self._start_list: list[int] = self._starts.tolist()  # bisect beats searchsorted here
        self._cache_size = max(1, cache_shards)
        self._cache: OrderedDict[int, ShardArrays] = OrderedDict()
        self._lengths: np.ndarray | None = None
        self._pid = os.getpid()
        self._verified: set[int] = set()

    def __len__(self) -> int:
        return int(self._starts[-1])

    @property
    def n_tokens(self) -> int:
        """Total tokens in the split, from the manifest."""
        return sum(s.n_tokens for s in self.shards)

    def shard(self, index: int) -> ShardArrays:
        """Shard ``index`` of the split, read on first use (per process)."""
        if self._pid != os.getpid():  # forked: never share cached state across processes
            self._cache = OrderedDict()
            self._pid = os.getpid()
        arrays = self._cache.get(index)
        if arrays is None:
            if index not in self._verified:
                self._verify(index)
            arrays = read_shard(self.root / self.shards[index].file, self.shards[index])
            self._cache[index] = arrays
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(index)
        return arrays

    def locate(self, index: int) -> tuple[int, int]:
        """(shard, position in shard) of a global example index."""
        if not 0 <= index < len(self):
            raise IndexError(f"example {index} out of range for {len(self)} examples")
        shard = bisect.bisect_right(self._start_list, index) - 1
        return shard, index - int(self._starts[shard])

    def __getitem__(self, index: int) -> dict[str, Any]:
        shard, local = self.locate(index)
        return self.shard(shard).item(local)

    def lengths(self) -> np.ndarray:
        """Token count of every example (each shard's offsets are read once)."""
        if self._lengths is None:
            self._lengths = np.concatenate(
                [np.diff(self.shard(i).offsets) for i in range(len(self.shards))]
                or [np.zeros(0, np.int64)]
            )
        return self._lengths

    def verify_checksums(self) -> None:
        """Compare each shard's SHA-256 with the manifest and read its counts.

        Raises:
            UserError: naming the first shard that does not match.
        """
        for i, info in enumerate(self.shards):
            self._verify(i)
            read_shard(self.root / info.file, info)

    def _verify(self, index: int) -> None:
        """Compare shard ``index``'s SHA-256 with the manifest (once per process)."""
        info = self.shards[index]
        path = self.root / info.file
        try:
            digest = file_sha256(path)
        except PermissionError as exc:
            raise UserError(
                f"{path}: cannot read the shard ({exc.strerror}); fix its permissions "
                f"(the shard itself may be intact: do not prepare it again for this)"
            ) from None
        except OSError as exc:
            raise UserError(
                f"{path}: I/O error reading the shard ({exc.strerror or exc}); check the "
                f"filesystem before preparing the shards again"
            ) from None
        if digest != info.sha256:
            raise UserError(
                f"{path}: SHA-256 differs from the manifest; the shard is "
                f"corrupt or was modified; prepare the shards again"
            )
        self._verified.add(index)

    def check_tokenizer(self, tokenizer: Any, model_name: str) -> None:
        """Refuse a model whose tokenizer is not the one the shards were made with.

        Raises:
            UserError: naming both tokenizers' sources.
        """
        check_tokenizer(self.manifest, self.root, tokenizer, model_name)


def check_tokenizer(manifest: dict[str, Any], root: Path, tokenizer: Any, model_name: str) -> None:
    """Raise UserError if ``tokenizer`` differs from the one recorded in ``manifest``."""
    recorded = manifest["tokenizer"]
    if tokenizer_fingerprint(tokenizer) != recorded["fingerprint"]:
        raise UserError(
            f"data.shards: '{root}' was prepared with the tokenizer of "
            f"'{recorded['name_or_path']}', which differs from the tokenizer of "
            f"model.name_or_path='{model_name}'; prepare the corpus again with "
            f"this model (scilm prepare ... model.name_or_path={model_name})"
        )
