"""Checkpoints: DeepSpeed state + data position + RNG states, made ``latest`` atomically.

Layout: ``RUN_DIR/checkpoints/step_N/`` holds DeepSpeed's files, ``scilm_state.json``
(step, sampler position, world size, best metric, scheduler state) and
``rng_rank{R}.pt`` per rank. ``checkpoints/latest`` names the newest complete
checkpoint; it is written (temporary file + rename) only after every rank has
finished writing, so a job killed mid-save resumes from the previous one.

Fault injection for tests (a real SIGKILL at a precise point, which cannot be
timed from outside): ``SCILM_FAULT=kill_in_checkpoint:N`` kills every rank after
DeepSpeed wrote step N but before ``latest``; ``kill_after_checkpoint:N`` right
after step N became ``latest``.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
from pathlib import Path
from typing import Any

import numpy as np
import torch

LATEST = "latest"
STATE = "scilm_state.json"


def checkpoint_root(run_dir: str | Path) -> Path:
    """``RUN_DIR/checkpoints``."""
    return Path(run_dir) / "checkpoints"


def latest_tag(run_dir: str | Path) -> str | None:
    """Tag of the newest complete checkpoint, or None."""
    path = checkpoint_root(run_dir) / LATEST
    if not path.is_file():
        return None
    tag = path.read_text(encoding="utf-8").strip()
    return tag if (checkpoint_root(run_dir) / tag / STATE).is_file() else None


def read_state(run_dir: str | Path, tag: str) -> dict[str, Any]:
    """The ``scilm_state.json`` of a checkpoint."""
    return json.loads((checkpoint_root(run_dir) / tag / STATE).read_text(encoding="utf-8"))


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


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


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
    if rank == 0 and (root / tag).exists():  # a partial save of a killed job
        shutil.rmtree(root / tag)
    dist.barrier()
    engine.save_checkpoint(str(root), tag=tag, save_latest=False)
    torch.save(rng_state(), root / tag / f"rng_rank{rank}.pt")
    _fault("kill_in_checkpoint", step)
    dist.barrier()
    if rank == 0:
        _write_atomic(root / tag / STATE, json.dumps(state, indent=1))
        _write_atomic(root / LATEST, tag + "\n")
        _prune(root, keep_last, keep | {tag})
    dist.barrier()
    _fault("kill_after_checkpoint", step)
    return tag


def _prune(root: Path, keep_last: int, keep: set[str]) -> None:
    steps = sorted(
        (int(p.name.split("_")[1]), p)
        for p in root.glob("step_*")
        if p.is_dir() and (p / STATE).is_file()
    )
    for _, path in steps[:-keep_last] if keep_last > 0 else []:
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
