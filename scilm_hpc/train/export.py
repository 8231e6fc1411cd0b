"""Export the trained model as a HF directory (safetensors, label maps, tokenizer).

Under ZeRO-3 each rank holds a slice of every parameter, so every rank must
take part in gathering the full weights; only rank 0 writes.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

from scilm_hpc.rundir import (
    CHECKPOINT_STATE,
    checkpoint_root,
    latest_tag,
    read_checkpoint_state,
    replace_dir,
)


def gathered_state_dict(engine: Any, zero_stage: int) -> dict[str, torch.Tensor] | None:
    """Full model weights on rank 0 (None on other ranks). Collective under ZeRO-3.

    Under ZeRO-3 the parameters are gathered with DeepSpeed's public
    ``GatheredParameters`` (read-only: ``modifier_rank=None``), so every rank must call.
    """
    if zero_stage != 3:
        if engine.global_rank != 0:
            return None
        return {k: v.detach().clone() for k, v in engine.module.state_dict().items()}
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None):
        if engine.global_rank != 0:
            return None
        return {k: v.detach().clone() for k, v in engine.module.state_dict().items()}


def write_export(
    model: Any, tokenizer: Any, out_dir: str | Path, state: dict[str, torch.Tensor] | None = None
) -> Path:
    """Write ``model`` (or ``state`` into its architecture) and ``tokenizer`` to ``out_dir``
    in fp32 safetensors, through a temporary directory renamed into place."""
    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():  # left by a killed export
        shutil.rmtree(tmp)
    if state is not None:
        state = {k: v.to(torch.float32) if v.is_floating_point() else v for k, v in state.items()}
    model.config.torch_dtype = "float32"
    model.save_pretrained(tmp, state_dict=state, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    replace_dir(tmp, out)
    return out


def export_model(engine: Any, tokenizer: Any, out_dir: str | Path, zero_stage: int) -> None:
    """Write ``out_dir`` loadable with ``AutoModelFor*.from_pretrained`` and ``pipeline``."""
    state = gathered_state_dict(engine, zero_stage)
    if engine.global_rank != 0:
        return
    assert state is not None
    write_export(engine.module, tokenizer, out_dir, state)


def export_checkpoint(run_dir: str | Path, tag: str | None = None) -> Path:
    """Write ``RUN_DIR/export`` from a checkpoint (default: the latest), without training.

    For a run that stopped before its end (preempted, out of requeues): the
    checkpoint's weights are consolidated from any ZeRO stage and any number of
    ranks, then written like the export a finished run writes.

    Raises:
        UserError: if ``run_dir`` is not a finetune run or has no such checkpoint.
    """
    from scilm_hpc.config import load_config, resolve
    from scilm_hpc.data.dataset import ShardDataset
    from scilm_hpc.errors import UserError
    from scilm_hpc.model_source import load_tokenizer
    from scilm_hpc.models import build_model
    from scilm_hpc.tasks import get_task
    from scilm_hpc.train import checkpoint as ckpt

    run = Path(run_dir)
    if not (run / "config.yaml").is_file():
        raise UserError(f"{run_dir}: no config.yaml; not a finetune run directory")
    job = resolve(load_config(run / "config.yaml", [], "finetune"))
    tag = tag or latest_tag(run)
    if tag is None or not (checkpoint_root(run) / tag / CHECKPOINT_STATE).is_file():
        raise UserError(f"{run_dir}: no complete checkpoint {tag or '(checkpoints/latest)'}")
    state = read_checkpoint_state(run, tag)
    weights = ckpt.consolidated_weights(run, tag, state["zero_stage"])
    train_set = ShardDataset(job.data.shards, "train")
    tokenizer = load_tokenizer(job.model.name_or_path, job.model.revision)
    if job.model.lora.r:
        from scilm_hpc.train.lora import lora_model, write_lora_export

        model = lora_model(job, train_set.label_names, weights)
        return write_lora_export(model, tokenizer, run / "export")
    model = build_model(
        get_task(job.task, train_set.manifest).for_job(job),
        job.model.name_or_path,
        train_set.label_names,
        job.model.revision,
        state_dict=weights,
        decoder_name_or_path=job.model.decoder_name_or_path,
    )
    return write_export(model, tokenizer, run / "export")
