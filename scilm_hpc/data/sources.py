"""The manifest's record of the corpus files a prepare read: each file's path and
SHA-256, hashed by the ranks together.

A file of at most ``BLOCK_BYTES`` is recorded with the SHA-256 of its bytes
(``sha256``, what ``sha256sum`` prints). A larger one is cut into blocks of
``BLOCK_BYTES`` (the last shorter) and recorded with each block's SHA-256 in order
(``sha256_blocks``: ``block_bytes`` and ``digests``; ``split -b 64M`` + ``sha256sum``
gives the same), so that one large file can be hashed by several ranks. The blocks
and small files are dealt to the ranks by size (largest first, to the rank with the
fewest bytes so far), each rank reads only its own, and the ranks exchange the
digests. Neither the cut nor the record depends on the number of ranks, so the
manifest of N ranks is the one of one rank.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from scilm_hpc.data.corpus import on_every_rank
from scilm_hpc.data.ranges import corpus_files
from scilm_hpc.runtime.dist import Communicator

BLOCK_BYTES = 64 << 20
_READ = 1 << 20


def hash_block(path: Path, start: int, length: int) -> str:
    """SHA-256 of ``length`` bytes of ``path`` from ``start``, read 1 MiB at a time."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        handle.seek(start)
        left = length
        while left > 0:
            block = handle.read(min(_READ, left))
            if not block:
                break
            digest.update(block)
            left -= len(block)
    return digest.hexdigest()


def plan_hashing(sizes: list[int], world_size: int) -> list[list[tuple[int, int, int]]]:
    """Per rank, the ``(file, start, length)`` blocks it hashes: every file in blocks of
    ``BLOCK_BYTES`` (an empty file one empty block), dealt largest first to the rank
    with the fewest bytes so far (the lowest such rank on a tie)."""
    block = BLOCK_BYTES
    items = [
        (number, start, min(block, size - start))
        for number, size in enumerate(sizes)
        for start in range(0, max(size, 1), block)
    ]
    items.sort(key=lambda item: (-item[2], item[0], item[1]))
    load = [0] * world_size
    plan: list[list[tuple[int, int, int]]] = [[] for _ in range(world_size)]
    for item in items:
        rank = load.index(min(load))
        plan[rank].append(item)
        load[rank] += item[2]
    return plan


def file_records(files: list[Path], comm: Communicator) -> list[dict[str, Any]]:
    """Each file's manifest record (``path`` and ``sha256`` or ``sha256_blocks``), the
    hashing shared by ``comm``'s ranks; every rank gets the records. Call on every rank."""
    sizes = [path.stat().st_size for path in files]
    mine = plan_hashing(sizes, comm.world_size)[comm.rank]
    parts = on_every_rank(comm, lambda: {(f, s): hash_block(files[f], s, n) for f, s, n in mine})
    digests = {key: value for part in parts for key, value in part.items()}
    records = []
    for number, (path, size) in enumerate(zip(files, sizes, strict=True)):
        record: dict[str, Any] = {"path": str(path.resolve())}
        if size <= BLOCK_BYTES:
            record["sha256"] = digests[(number, 0)]
        else:
            record["bytes"] = size
            record["sha256_blocks"] = {
                "block_bytes": BLOCK_BYTES,
                "digests": [digests[(number, s)] for s in range(0, size, BLOCK_BYTES)],
            }
        records.append(record)
    return records


def corpus_sources(given: dict[str, str], comm: Communicator) -> dict[str, Any]:
    """The manifest's ``sources``: per split (``given``: split -> ``data.<split>``), a
    file as its record; a directory or pattern as ``{path, files: [record, ...]}``.
    Call on every rank."""
    files = {split: corpus_files(value, f"data.{split}") for split, value in given.items()}
    flat = [path for split_files in files.values() for path in split_files]
    records = iter(file_records(flat, comm))
    sources: dict[str, Any] = {}
    for split, value in given.items():
        split_records = [next(records) for _ in files[split]]
        if Path(value).is_file():
            sources[split] = split_records[0]
        else:
            sources[split] = {"path": value, "files": split_records}
    return sources
