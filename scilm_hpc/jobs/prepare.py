"""The prepare job: raw corpus -> tokenized HDF5 shards + ``manifest.json``.

Every rank reads and checks the raw files as streams (cheap, and every rank then
fails the same way on bad input; memory does not grow with the corpus, see
``data.corpus``), plans the same shard boundaries from the counts, and reads again,
tokenizes and writes only the shards assigned to it (round robin), one shard's
examples in memory at a time. Rank 0 gathers the shard
entries, writes the manifest and renames the staging directory into place, so
the result is the same files, in the same order, whatever the number of ranks,
and a killed prepare never leaves a directory that looks complete.
"""

from __future__ import annotations

import os
import shutil
import time
import uuid
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from scilm_hpc import __version__
from scilm_hpc.data.corpus import ReadOptions, ShardFeed, SplitStreams
from scilm_hpc.data.residues import ResidueChecker
from scilm_hpc.data.shards import (
    FORMAT_VERSION,
    MANIFEST,
    ShardInfo,
    file_sha256,
    shard_entry,
    shard_name,
    write_manifest,
    write_shard,
)
from scilm_hpc.errors import UserError
from scilm_hpc.launch.console import CountProgress
from scilm_hpc.launch.dist import Communicator, communicator
from scilm_hpc.model_source import load_tokenizer, tokenizer_fingerprint
from scilm_hpc.schema import SPLITS, JobConfig
from scilm_hpc.tasks import Task, get_task


def split_streams(job: JobConfig, task: Task, tokenizer: Any) -> SplitStreams:
    """The configured corpus files (and ratio split) as streams of examples per split,
    residue-checked for a protein corpus."""
    d = job.data
    files = {s: Path(getattr(d, s)) for s in SPLITS if getattr(d, s) is not None}
    options = ReadOptions(
        fmt=d.format,
        text_field=d.text_field,
        label_field=task.label_field(d.label_field),
        token_column=d.token_column,
        tag_column=d.tag_column,
        csv_delimiter=d.csv_delimiter,
        label_kind=task.label_kind,
        targets=task.target_fields(d),
        fasta_labels=d.fasta_labels,
    )
    ratios = {"dev": d.split.dev_ratio, "test": d.split.test_ratio}
    return SplitStreams(files, options, ratios, d.split.seed, residue_checker(job, tokenizer))


def residue_checker(job: JobConfig, tokenizer: Any) -> Callable[[], ResidueChecker] | None:
    """What makes the protein-sequence check of a protein corpus (``data.residue_separator``
    set, or FASTA input), else None."""
    separator = job.data.residue_separator
    if separator is None and job.data.format != "fasta":
        return None
    ResidueChecker(tokenizer, separator or "", job.data.unknown_residue)  # refuses bad settings
    return partial(ResidueChecker, tokenizer, separator or "", job.data.unknown_residue)


def build_label_map(task: Task, corpus: SplitStreams) -> list[str]:
    """Sorted labels (or tags) of the training split; dev/test may not add new ones.

    Raises:
        UserError: naming file and line of a dev/test label absent from train.
    """
    if not task.has_label_map:
        return []
    train_labels: set[str] = set()
    for ex in corpus.examples("train"):
        train_labels.update(task.example_labels(ex))
    labels = sorted(train_labels)
    known = set(labels)
    problems = []
    for split in ("dev", "test"):
        if split not in corpus.counts:
            continue
        for ex in corpus.examples(split):
            unknown = [v for v in task.example_labels(ex) if v not in known]
            if unknown:
                problems.append(
                    f"{ex.source}: {split} label '{unknown[0]}' does not occur in "
                    f"the training split (labels there: {', '.join(labels)})"
                )
                if len(problems) >= 10:
                    break
    if problems:
        raise UserError(problems)
    return labels


def plan_shards(counts: dict[str, int], per_shard: int) -> list[tuple[str, int, int, int]]:
    """(split, shard number in the split, first example, end) of every shard, in manifest
    order, from the number of examples of each split."""
    plan = []
    for split, count in counts.items():
        for number, start in enumerate(range(0, count, per_shard)):
            plan.append((split, number, start, min(start + per_shard, count)))
    return plan


class PrepareJob:
    """Submitit-callable prepare job (runs as 1 rank, N MPI ranks or N local tasks)."""

    def __init__(self, job: JobConfig) -> None:
        self.job = job

    def __call__(self) -> dict[str, Any]:
        job = self.job
        target = Path(job.data.shards).absolute()
        comm = communicator(target.parent, job.cluster.collective_timeout_s)
        if comm.world_size > 1:
            # One core per rank: the tokenizer's own thread pool would oversubscribe.
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
            os.environ.setdefault("RAYON_NUM_THREADS", "1")
        tokenizer = load_tokenizer(job.model.name_or_path, job.model.revision)
        task = get_task(job.task).for_job(job)
        corpus = split_streams(job, task, tokenizer)
        split_counts = corpus.count()
        residues = corpus.residues
        if residues is not None:
            residues.check_tokenisation(next(corpus.examples("train")))
        labels = build_label_map(task, corpus)
        task_state = task.fit(corpus.examples("train"))
        task = task.bind(task_state)
        label_ids = {name: i for i, name in enumerate(labels)}
        plan = plan_shards(split_counts, job.data.examples_per_shard)
        feed = ShardFeed(corpus)

        decided: Path | UserError | None = None
        if comm.rank == 0:
            if (target / MANIFEST).exists() and not job.data.overwrite:
                decided = UserError(
                    f"data.shards: '{target}' already holds prepared shards; "
                    f"pass data.overwrite=true to replace them"
                )
            elif (
                target.exists()
                and not (target / MANIFEST).exists()
                and (not target.is_dir() or any(target.iterdir()))
            ):
                decided = UserError(
                    f"data.shards: '{target}' exists and is not a shard "
                    f"directory; choose a new or empty directory"
                )
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                decided = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
                decided.mkdir()
        shared = comm.bcast(decided)
        if isinstance(shared, UserError):
            raise shared
        staging: Path = shared
        try:
            mine = [i for i in range(len(plan)) if i % comm.world_size == comm.rank]
            written: dict[int, ShardInfo] = {}
            counted: dict[int, dict[str, int]] = {}  # per shard: the task's token counts
            stats: dict[str, dict[str, int]] = {}  # per split: what encoding cut (targets)
            started = time.perf_counter()
            records = sum(plan[i][3] - plan[i][2] for i in mine)
            progress = CountProgress(f"prepare rank {comm.rank}", "records", records)
            for index in mine:
                split, shard_no, lo, hi = plan[index]
                ids, columns, counted[index] = task.encode_shard(
                    tokenizer, feed.take(split, lo, hi), label_ids, job.data
                )
                written[index] = write_shard(
                    staging,
                    shard_name(split, shard_no),
                    ids,
                    columns,
                    job.task,
                    job.data.compression,
                    job.data.compression_level,
                )
                for key, count in task.take_stats().items():
                    stats.setdefault(split, {}).setdefault(key, 0)
                    stats[split][key] += count
                progress.update(hi - lo)
            progress.close()
            elapsed = time.perf_counter() - started
            gathered = comm.gather((written, counted, elapsed, stats))
            summary: dict[str, Any] = {}
            if comm.rank == 0:
                assert gathered is not None
                infos: dict[int, ShardInfo] = {}
                counts: dict[int, dict[str, int]] = {}
                truncated: dict[str, dict[str, int]] = {}
                for part, part_counts, _, part_stats in gathered:
                    infos.update(part)
                    counts.update(part_counts)
                    for split, values in part_stats.items():
                        for key, count in values.items():
                            truncated.setdefault(split, {}).setdefault(key, 0)
                            truncated[split][key] += count
                rank_seconds = [e for _, _, e, _ in gathered]
                manifest = self._manifest(
                    plan, infos, counts, labels, tokenizer, comm, rank_seconds
                )
                manifest["task_state"] = task_state
                if residues is not None:
                    manifest["residues"] = residues.summary()
                if truncated or task.manifest_options():
                    manifest["task_options"] = task.manifest_options()
                    manifest["truncated"] = truncated
                    self._log_truncation(truncated, manifest["splits"])
                write_manifest(staging, manifest)
                self._publish(staging, target)
                summary = {
                    "shards": str(target),
                    "ranks": comm.world_size,
                    "rank_seconds": rank_seconds,
                    "splits": {
                        s: {k: v for k, v in m.items() if k != "shards"}
                        for s, m in manifest["splits"].items()
                    },
                }
            comm.close()
            return summary
        except BaseException:
            if comm.rank == 0 and staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
            raise

    def _manifest(
        self,
        plan: list[tuple[str, int, int, int]],
        infos: dict[int, ShardInfo],
        counts: dict[int, dict[str, int]],
        labels: list[str],
        tokenizer: Any,
        comm: Communicator,
        rank_seconds: list[float],
    ) -> dict[str, Any]:
        """The manifest; ``rank_seconds``: each rank's tokenize+write seconds, kept in its
        ``prepare`` section for the prepare benchmark."""
        job = self.job
        splits: dict[str, Any] = {}
        for index, (split, _, _, _) in enumerate(plan):
            entry = splits.setdefault(split, {"n_examples": 0, "n_tokens": 0, "shards": []})
            info = infos[index]
            entry["n_examples"] += info.n_examples
            entry["n_tokens"] += info.n_tokens
            entry["shards"].append(shard_entry(info))
            # the task's token counts (causal LM: tokens in, kept, truncated)
            for key, value in counts[index].items():
                entry[key] = entry.get(key, 0) + value
        sources = {}
        for split in SPLITS:
            path = getattr(job.data, split)
            if path is not None:
                sources[split] = {
                    "path": str(Path(path).resolve()),
                    "sha256": file_sha256(Path(path)),
                }
        return {
            "format_version": FORMAT_VERSION,
            "scilm_version": __version__,
            "task": job.task,
            "labels": labels,
            "max_length": job.data.max_length,
            "tokenizer": {
                "name_or_path": job.model.name_or_path,
                "class": type(tokenizer).__name__,
                "fingerprint": tokenizer_fingerprint(tokenizer),
                "vocab_size": len(tokenizer),
            },
            "sources": sources,
            "data": {
                "format": job.data.format,
                "text_field": job.data.text_field,
                "label_field": job.data.label_field,
                "packing": job.data.packing,
                "split": vars(job.data.split),
            },
            "prepare": {
                "ranks": comm.world_size,
                "examples_per_shard": job.data.examples_per_shard,
                "compression": job.data.compression,
                "rank_seconds": rank_seconds,
            },
            "splits": splits,
        }

    def _log_truncation(
        self, counts: dict[str, dict[str, int]], splits: dict[str, dict[str, Any]]
    ) -> None:
        """One line per split and kind of cut (targets, sources) that happened."""
        limits = {
            "truncated_targets": f"data.max_target_length={self.job.data.max_target_length}",
            "truncated_sources": f"data.max_length={self.job.data.max_length}",
        }
        for split, values in counts.items():
            for key, count in values.items():
                if count:
                    print(
                        f"prepare: {split}: {count} of {splits[split]['n_examples']} "
                        f"{key.removeprefix('truncated_')} cut to "
                        f"{limits.get(key, key)}",
                        flush=True,
                    )

    @staticmethod
    def _publish(staging: Path, target: Path) -> None:
        """Move the finished staging directory to ``target``, replacing an old one last."""
        old = None
        if target.exists():
            old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(target, old)
        os.replace(staging, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
