"""Checkpoints: DeepSpeed state + data position + RNG states, made ``latest`` atomically.

Layout: ``RUN_DIR/checkpoints/step_N/`` holds DeepSpeed's files, ``scilm_state.json``
(step, sampler position, world size, best metric, scheduler state) and
``rng_rank{R}.pt`` per rank. ``checkpoints/latest`` names the newest complete
checkpoint; it is written (temporary file + rename) only after every rank has
finished writing and ``scilm_manifest.json`` (every file's size and CRC-32, see
``train/manifest.py``) is in place, so a job killed mid-save resumes from the
previous one.

Resuming never starts over silently: ``find_resume_tag`` takes the newest
checkpoint that verifies against its manifest, whatever ``latest`` says (missing,
unreadable, naming a partial or corrupt directory), reports every checkpoint it
skips by file name, and refuses with the list when step directories exist but
none is usable. A skipped checkpoint is never deleted: when the run saves that
step again, the old directory is set aside as ``step_N.rejected-*``. Retention
(``keep_last``) counts only complete checkpoints up to the one just saved.

A save runs in phases after each of which the ranks agree that no write failed
(one all-reduce), so a full disk or a refused write on one rank ends every rank
at once with a ``StorageError`` naming the path, ``latest`` unchanged; a save
that cannot fit (the last checkpoint's size is not free) is refused up front.

Fault injection for tests (a real SIGKILL at a precise point, which cannot be
timed from outside): ``SCILM_FAULT=kill_in_checkpoint:N`` kills every rank after
DeepSpeed wrote step N but before ``latest``; ``kill_after_checkpoint:N`` right
after step N became ``latest``; ``kill_before_manifest:N`` after ``scilm_state.json``
but before the manifest.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from scilm_hpc.errors import (
    STORAGE_ERRNOS,
    StorageError,
    UserError,
    free_space_note,
    storage_error,
)
from scilm_hpc.rundir import CHECKPOINT_STATE as STATE
from scilm_hpc.rundir import (
    LATEST,
    STEP_DIR,
    checkpoint_root,
    latest_checkpoint_name,
    write_text_atomic,
)
from scilm_hpc.train.manifest import (
    MANIFEST,
    checkpoint_files,
    hash_files,
    manifest_problem,
    write_manifest,
)

# how torch.save's zip writer reports a write the filesystem refused (it loses the errno)
TORCH_WRITE_FAILURES = ("PytorchStreamWriter failed", "inline_container.cc")


def step_dirs(run_dir: str | Path) -> list[tuple[int, Path]]:
    """``(step, directory)`` of every ``step_N`` directory, newest first."""
    return _scan(checkpoint_root(run_dir))


def _scan(root: Path) -> list[tuple[int, Path]]:
    found = []
    for path in root.glob("step_*") if root.is_dir() else []:
        match = STEP_DIR.fullmatch(path.name)
        if match and path.is_dir():
            found.append((int(match.group(1)), path))
    return sorted(found, reverse=True)


def checkpoint_problem(ckpt_dir: Path, verify_checksums: bool = True) -> str | None:
    """Why ``ckpt_dir`` cannot be resumed from, or None.

    With a manifest, its files must match it. Without one, ``scilm_state.json``
    (written after every rank finished) marks it complete but unverified: a
    checkpoint saved before manifests existed, or one killed while hashing.
    """
    if (ckpt_dir / MANIFEST).is_file():
        problem = manifest_problem(ckpt_dir, verify_checksums)
        if problem:
            return problem
    elif not (ckpt_dir / STATE).is_file():
        return "incomplete (no scilm_state.json: a save that did not finish)"
    try:
        json.loads((ckpt_dir / STATE).read_text(encoding="utf-8"))["step"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"{ckpt_dir / STATE}: unreadable ({exc})"
    return None


def find_resume_tag(
    run_dir: str | Path, verify_checksums: bool = True
) -> tuple[str | None, list[str]]:
    """Where a run in ``run_dir`` resumes: the newest checkpoint that verifies.

    Returns:
        (tag or None for a fresh start, notes to print: skipped checkpoints and why,
        and where ``latest`` was not followed).

    Raises:
        UserError: if step directories exist but none verifies (listing each and why).
    """
    found = step_dirs(run_dir)
    if not found:
        return None, []
    latest = latest_checkpoint_name(run_dir)
    notes, listing, ever_complete = [], [], latest is not None
    for _, path in found:
        complete = (path / MANIFEST).is_file() or (path / STATE).is_file()
        ever_complete |= complete
        problem = checkpoint_problem(path, verify_checksums)
        if problem is None:
            if path.name != latest:
                why = f"names {latest}" if latest else "is missing or unreadable"
                notes.append(
                    f"checkpoints/latest {why}; resuming from {path.name}, the newest "
                    f"complete checkpoint that verifies"
                )
            elif not (path / MANIFEST).is_file():
                notes.append(f"{path.name} has no manifest (saved before manifests); not verified")
            return path.name, notes
        listing.append(f"  {path.name}: {problem}")
        kept = " (kept on disk)" if complete else ""
        notes.append(f"checkpoint {path.name} skipped{kept}: {problem}")
    if not ever_complete:  # died in its first save: nothing to lose by starting
        return None, [*notes, "no checkpoint was ever completed; starting from the beginning"]
    raise UserError(
        [
            f"run.dir: '{run_dir}' has checkpoints but none is complete and verifies, "
            f"so the run would start over; refusing. Found:",
            *listing,
            "move checkpoints/ (and metrics.jsonl) aside to start afresh, or use another run.dir",
        ]
    )


def verify_run_checkpoints(run_dir: str | Path) -> list[tuple[str, str, str]]:
    """Every checkpoint of a run directory against its manifest, checksums included:
    ``RUN_DIR/checkpoints/step_N`` and a compress run's recovery checkpoints
    (``RUN_DIR/steps/*/checkpoints/step_N``).

    Returns:
        ``(checkpoint directory relative to run_dir, verdict, detail)`` per checkpoint,
        newest first within each ``checkpoints/``; verdict ``ok``, ``unverified``
        (complete but saved without a manifest) or ``bad`` (detail: which file, why).

    Raises:
        UserError: if ``run_dir`` holds no checkpoint directory at all.
    """
    run_dir = Path(run_dir)
    roots = [checkpoint_root(run_dir), *sorted(run_dir.glob("steps/*/checkpoints"))]
    found = [(root, path) for root in roots for _, path in _scan(root)]
    if not found:
        where = "no such directory" if not run_dir.is_dir() else "no checkpoints/step_N in it"
        raise UserError(f"{run_dir}: no checkpoint to verify ({where})")
    report = []
    for root, path in found:
        problem = checkpoint_problem(path)
        name = path.relative_to(run_dir).as_posix()
        if problem:
            report.append((name, "bad", problem))
        elif not (path / MANIFEST).is_file():
            report.append((name, "unverified", "no manifest (saved before manifests)"))
        else:
            latest = " (latest)" if latest_checkpoint_name(root.parent) == path.name else ""
            files = len(json.loads((path / MANIFEST).read_text(encoding="utf-8"))["files"])
            report.append((name, "ok", f"{files} files match the manifest{latest}"))
    return report


def agree_on_resume_tag(run_dir: str | Path, rank: int) -> str | None:
    """``find_resume_tag`` on rank 0 (which prints its notes), the same answer on every rank.

    Raises:
        UserError: on every rank, if rank 0 refused.
    """
    import torch.distributed as dist

    outcome: list[Any] = [None]
    if rank == 0:
        try:
            tag, notes = find_resume_tag(run_dir)
        except UserError as exc:
            outcome = [("refused", exc.problems)]
        else:
            for note in notes:
                print(note, flush=True)
            outcome = [("resume", tag)]
    dist.broadcast_object_list(outcome, src=0)
    kind, value = outcome[0]
    if kind == "refused":
        raise UserError(value)
    return value


def rng_state() -> dict[str, Any]:
    """Every RNG a training step touches."""
    state = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()  # this rank's current device (dropout)
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Restore what ``rng_state`` captured."""
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def _fault(point: str, step: int) -> None:
    if os.environ.get("SCILM_FAULT") == f"{point}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)


def _clear_for_save(ckpt_dir: Path) -> None:
    """Remove a partial save of a killed job; set a complete one (skipped at resume as
    corrupt, or another run's) aside instead of deleting it."""
    if not ckpt_dir.exists():
        return
    if (ckpt_dir / MANIFEST).is_file() or (ckpt_dir / STATE).is_file():
        aside = ckpt_dir.with_name(f"{ckpt_dir.name}.rejected-{uuid.uuid4().hex[:6]}")
        os.replace(ckpt_dir, aside)
        print(f"{ckpt_dir.name}: the old checkpoint of this step is kept as {aside}", flush=True)
    else:
        shutil.rmtree(ckpt_dir)


def save_checkpoint(
    engine: Any,
    run_dir: str | Path,
    step: int,
    state: dict[str, Any],
    rank: int,
    keep_last: int,
    keep: set[str],
) -> str:
    """Save on every rank; returns the tag. ``keep`` names tags never pruned (the best)."""
    import torch.distributed as dist

    root = checkpoint_root(run_dir)
    tag = f"step_{step}"
    start = time.perf_counter()
    device = engine.device

    def prepare() -> None:
        _check_space(run_dir, tag)
        if rank == 0:
            _clear_for_save(root / tag)

    def write() -> None:
        engine.save_checkpoint(str(root), tag=tag, save_latest=False)
        torch.save(rng_state(), root / tag / f"rng_rank{rank}.pt")

    def write_state() -> None:
        if rank == 0:
            write_text_atomic(root / tag / STATE, json.dumps(state, indent=1))

    _on_every_rank(prepare, root / tag, device)
    _on_every_rank(write, root / tag, device)
    _fault("kill_in_checkpoint", step)
    _on_every_rank(write_state, root / tag, device)
    _fault("kill_before_manifest", step)
    hashing = time.perf_counter()
    names: list[Any] = [checkpoint_files(root / tag) if rank == 0 else None]
    dist.broadcast_object_list(names, src=0)
    world = dist.get_world_size()
    share = hash_files(root / tag, names[0][rank::world])
    shares: list[Any] = [None] * world if rank == 0 else []
    dist.gather_object(share, shares if rank == 0 else None, dst=0)

    def publish() -> None:
        if rank != 0:
            return
        write_manifest(root / tag, {k: v for part in shares for k, v in part.items()})
        manifest_s = time.perf_counter() - hashing
        write_text_atomic(root / LATEST, tag + "\n")
        _prune(root, keep_last, keep | {tag}, step)
        total = time.perf_counter() - start
        print(
            f"checkpoint {tag}: {total:.2f} s, manifest {1000 * manifest_s:.0f} ms "
            f"({100 * manifest_s / total:.1f}%)",
            flush=True,
        )

    _on_every_rank(publish, root / tag, device)
    _fault("kill_after_checkpoint", step)
    return tag


def _on_every_rank(action: Callable[[], None], where: Path, device: Any) -> None:
    """Run ``action`` on this rank, then agree (one all-reduce) that no rank failed.

    A rank whose filesystem refused a write (disk full, quota, permission) raises
    ``StorageError`` naming the path, and every other rank raises too, at once,
    instead of waiting in the next collective until the process-group timeout.
    ``latest`` has not moved when this raises.
    """
    import torch.distributed as dist

    failure: StorageError | None = None
    try:
        action()
    except StorageError as exc:
        failure = exc
    except OSError as exc:
        if exc.errno not in STORAGE_ERRNOS:
            raise
        failure = storage_error(exc, where)
    except RuntimeError as exc:  # torch.save reports a failed write as a RuntimeError
        if not any(mark in str(exc) for mark in TORCH_WRITE_FAILURES):
            raise
        failure = StorageError(
            f"could not write {where} ({str(exc).splitlines()[0]}){free_space_note(where)}"
        )
    flag = torch.tensor([0 if failure is None else 1], dtype=torch.int32, device=device)
    dist.all_reduce(flag)
    if failure is not None:
        raise failure
    if flag.item():
        raise StorageError(f"another rank could not write {where}; see its error")


def _check_space(run_dir: str | Path, tag: str) -> None:
    """Refuse to start a checkpoint that cannot fit: the last complete one's size
    (from its manifest) must be free on this rank's view of the filesystem."""
    previous = latest_checkpoint_name(run_dir)
    manifest = checkpoint_root(run_dir) / str(previous) / MANIFEST
    if previous is None or not manifest.is_file():
        return
    try:
        needed = sum(e["size"] for e in json.loads(manifest.read_text())["files"].values())
    except (OSError, ValueError, KeyError, TypeError):
        return
    free = shutil.disk_usage(checkpoint_root(run_dir)).free
    if free < needed:
        raise StorageError(
            f"no space for checkpoint {tag} in {checkpoint_root(run_dir)}: {previous} took "
            f"{needed / 2**20:.1f} MiB, {free / 2**20:.1f} MiB are free; latest stays {previous}"
        )


def _prune(root: Path, keep_last: int, keep: set[str], step: int | None = None) -> None:
    """Keep the newest ``keep_last`` complete checkpoints in ``root`` up to ``step`` (the
    one just saved and verified) and those in ``keep``; newer leftovers (skipped at
    resume) and partial saves are neither counted nor deleted."""
    complete = [
        path
        for n, path in _scan(root)
        if (step is None or n <= step) and ((path / MANIFEST).is_file() or (path / STATE).is_file())
    ]
    for path in complete[keep_last:] if keep_last > 0 else []:
        if path.name not in keep:
            shutil.rmtree(path, ignore_errors=True)


def load_rng(run_dir: str | Path, tag: str, rank: int) -> None:
    """Restore this rank's RNG state of ``tag`` (if the checkpoint has one for it)."""
    path = checkpoint_root(run_dir) / tag / f"rng_rank{rank}.pt"
    if path.is_file():
        restore_rng(torch.load(path, weights_only=False))


def consolidated_weights(run_dir: str | Path, tag: str, zero_stage: int) -> dict[str, Any]:
    """fp32 model weights of a checkpoint saved on any number of ranks, any ZeRO stage."""
    ckpt = checkpoint_root(run_dir) / tag
    if zero_stage == 0:
        states = torch.load(
            ckpt / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False
        )
        return {k: v.float() for k, v in states["module"].items()}
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_root(run_dir)), tag=tag)
