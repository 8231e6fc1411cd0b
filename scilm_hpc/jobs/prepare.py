"""The prepare job: raw corpus -> tokenized HDF5 shards + ``manifest.json``.

The ranks count the corpus together, each its own pieces (``data.ranges``), and
exchange the counts, so every rank plans the same shard boundaries. Each rank then
owns a contiguous block of each split's shards and reads only the part of the corpus
that holds them (from the nearest mark, never what comes before): once to survey it
where the job needs that (the label map, what the task learns from the training
split, the residue check; the ranks combine what they found) and once to tokenize
and write its shards, one shard's examples in memory at a time. Problems a rank
finds reach every rank, which all fail with them. Rank 0 gathers the shard entries,
writes the manifest and renames the staging directory into place, so the result is
the same files, in the same order, whatever the number of ranks, and a killed
prepare never leaves a directory that looks complete.
"""

from __future__ import annotations

import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from functools import partial
from itertools import islice
from pathlib import Path
from typing import Any

from scilm_hpc import __version__
from scilm_hpc.data.corpus import ReadOptions, ShardFeed, SplitStreams, on_every_rank
from scilm_hpc.data.ranges import corpus_files
from scilm_hpc.data.readers import MAX_REPORTED, Example
from scilm_hpc.data.residues import ResidueChecker
from scilm_hpc.data.shards import (
    FORMAT_VERSION,
    MANIFEST,
    ShardInfo,
    shard_entry,
    shard_name,
    write_manifest,
    write_shard,
)
from scilm_hpc.data.sources import corpus_sources
from scilm_hpc.errors import UserError
from scilm_hpc.model_source import load_tokenizer, tokenizer_fingerprint
from scilm_hpc.runtime.console import CountProgress
from scilm_hpc.runtime.dist import Communicator, communicator
from scilm_hpc.schema import SPLITS, JobConfig
from scilm_hpc.tasks import Task, get_task


def split_streams(job: JobConfig, task: Task, tokenizer: Any) -> SplitStreams:
    """The configured corpus files (and ratio split) as streams of examples per split,
    residue-checked for a protein corpus."""
    d = job.data
    files = {
        s: corpus_files(getattr(d, s), f"data.{s}") for s in SPLITS if getattr(d, s) is not None
    }
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


def survey(task: Task, corpus: SplitStreams, regions: dict[str, tuple[int, int]]) -> dict[str, Any]:
    """What one rank finds in its regions (split -> first, end example) that the ranks
    combine (``combine_surveys``): the training labels, each dev/test label with up
    to ten of its records, the task's ``fit_part`` of its training examples and the
    residue check's findings."""
    checker = corpus.checker() if corpus.checker is not None else None
    train_labels: set[str] = set()
    other: dict[str, dict[str, list[str]]] = {}
    fit_part = None
    for split, (lo, hi) in regions.items():
        examples = islice(corpus.examples(split, lo, checker), hi - lo)
        if split == "train":
            labelled = _labelled(task, examples, train_labels)
            if task.learns_from_train:
                fit_part = task.fit_part(labelled)
            for _ in labelled:  # what fit_part left unread
                pass
        else:
            found = other.setdefault(split, {})
            for ex in examples:
                for label in task.example_labels(ex):
                    sources = found.setdefault(label, [])
                    if len(sources) < MAX_REPORTED:
                        sources.append(ex.source)
    residues = None
    if checker is not None:
        residues = (checker.problems, checker.unknown, checker.records_with_unknown)
    return {"train_labels": train_labels, "other": other, "fit": fit_part, "residues": residues}


def _labelled(task: Task, examples: Iterator[Example], labels: set[str]) -> Iterator[Example]:
    """``examples``, adding the labels of each to ``labels`` as it passes."""
    for ex in examples:
        labels.update(task.example_labels(ex))
        yield ex


def combine_surveys(
    task: Task, parts: list[dict[str, Any]], checker: ResidueChecker | None
) -> tuple[list[str], dict[str, Any]]:
    """The label map (sorted training labels; dev/test may not add new ones) and the
    task state from every rank's ``survey``, in rank order; ``checker`` takes the
    residue findings.

    Raises:
        UserError: naming the records of residues the tokenizer does not know, or of
            dev/test labels absent from train.
    """
    if checker is not None:
        for part in parts:
            problems, unknown, records = part["residues"]
            checker.problems += problems
            checker.unknown.update(unknown)
            checker.records_with_unknown += records
        checker.problems = checker.problems[:MAX_REPORTED]
        checker.raise_problems()
    task_state = task.fit_merge([p["fit"] for p in parts]) if task.learns_from_train else {}
    if not task.has_label_map:
        return [], task_state
    labels = sorted(set().union(*(p["train_labels"] for p in parts)))
    known = set(labels)
    problems = []
    for split in ("dev", "test"):
        for part in parts:
            for label, sources in part["other"].get(split, {}).items():
                if label not in known:
                    problems += [
                        f"{source}: {split} label '{label}' does not occur in the training "
                        f"split (labels there: {', '.join(labels)})"
                        for source in sources
                    ]
    if problems:
        raise UserError(problems[:MAX_REPORTED])
    return labels, task_state


def plan_shards(counts: dict[str, int], per_shard: int) -> list[tuple[str, int, int, int]]:
    """(split, shard number in the split, first example, end) of every shard, in manifest
    order, from the number of examples of each split."""
    plan = []
    for split, count in counts.items():
        for number, start in enumerate(range(0, count, per_shard)):
            plan.append((split, number, start, min(start + per_shard, count)))
    return plan


def assign_shards(plan: list[tuple[str, int, int, int]], rank: int, world_size: int) -> list[int]:
    """The plan indices ``rank`` writes: a contiguous block of each split's shards (so
    it reads one stretch of the corpus per split), blocks of a split in rank order
    (a split with fewer shards than ranks starts one rank further than the split
    before it, to spread them)."""
    by_split: dict[str, list[int]] = {}
    for index, (split, _, _, _) in enumerate(plan):
        by_split.setdefault(split, []).append(index)
    mine = []
    for position, indices in enumerate(by_split.values()):
        n = len(indices)
        slot = (rank - position) % world_size if n < world_size else rank
        mine += indices[n * slot // world_size : n * (slot + 1) // world_size]
    return mine


def regions_of(
    plan: list[tuple[str, int, int, int]], mine: list[int]
) -> dict[str, tuple[int, int]]:
    """Per split, the first and end example of the shards ``mine`` (contiguous)."""
    regions: dict[str, tuple[int, int]] = {}
    for index in mine:
        split, _, lo, hi = plan[index]
        first, _ = regions.get(split, (lo, hi))
        regions[split] = (first, hi)
    return regions


class PrepareJob:
    """Submitit-callable prepare job (runs as 1 rank, N MPI ranks or N local tasks)."""

    def __init__(self, job: JobConfig) -> None:
        self.job = job

    def __call__(self) -> dict[str, Any]:
        target = Path(self.job.data.shards).absolute()
        return self.run(communicator(target.parent, self.job.cluster.collective_timeout_s))

    def run(self, comm: Communicator) -> dict[str, Any]:
        """Prepare as one of ``comm``'s ranks; rank 0 returns the summary, others ``{}``.

        Raises:
            UserError: on every rank, for a problem any rank found in the corpus.
        """
        job = self.job
        target = Path(job.data.shards).absolute()
        if comm.world_size > 1:
            # One core per rank: the tokenizer's own thread pool would oversubscribe.
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
            os.environ.setdefault("RAYON_NUM_THREADS", "1")
        tokenizer = load_tokenizer(job.model.name_or_path, job.model.revision)
        task = get_task(job.task).for_job(job)
        corpus = split_streams(job, task, tokenizer)
        split_counts = corpus.count(comm)
        residues = corpus.checker() if corpus.checker is not None else None
        if residues is not None:
            residues.check_tokenisation(next(corpus.examples("train")))
        given = {s: getattr(job.data, s) for s in SPLITS if getattr(job.data, s) is not None}
        sources = corpus_sources(given, comm)  # each rank hashes its share of the files
        plan = plan_shards(split_counts, job.data.examples_per_shard)
        mine = assign_shards(plan, comm.rank, comm.world_size)
        labels: list[str] = []
        task_state: dict[str, Any] = {}
        if task.has_label_map or task.learns_from_train or residues is not None:
            regions = regions_of(plan, mine)
            parts = on_every_rank(comm, partial(survey, task, corpus, regions))
            labels, task_state = combine_surveys(task, parts, residues)
        task = task.bind(task_state)
        label_ids = {name: i for i, name in enumerate(labels)}
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
            gathered = on_every_rank(
                comm,
                partial(
                    self._write_shards, task, tokenizer, label_ids, feed, plan, mine, staging, comm
                ),
            )
            summary: dict[str, Any] = {}
            if comm.rank == 0:
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
                    plan, infos, counts, labels, tokenizer, sources, comm, rank_seconds
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

    def _write_shards(
        self,
        task: Task,
        tokenizer: Any,
        label_ids: dict[str, int],
        feed: ShardFeed,
        plan: list[tuple[str, int, int, int]],
        mine: list[int],
        staging: Path,
        comm: Communicator,
    ) -> tuple[dict[int, ShardInfo], dict[int, dict[str, int]], float, dict[str, dict[str, int]]]:
        """Tokenize and write this rank's shards (plan indices ``mine``) into ``staging``.

        Returns:
            The shard entries and the task's token counts per plan index, the seconds it
            took, and what encoding cut per split.
        """
        job = self.job
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
        return written, counted, time.perf_counter() - started, stats

    def _manifest(
        self,
        plan: list[tuple[str, int, int, int]],
        infos: dict[int, ShardInfo],
        counts: dict[int, dict[str, int]],
        labels: list[str],
        tokenizer: Any,
        sources: dict[str, Any],
        comm: Communicator,
        rank_seconds: list[float],
    ) -> dict[str, Any]:
        """The manifest; ``sources``: the corpus files' records (``data.sources``);
        ``rank_seconds``: each rank's tokenize+write seconds, kept in its ``prepare``
        section for the prepare benchmark."""
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
