"""The DeepSpeed configuration, generated from the schema (and a user JSON merged in).

Stage, offload, precision, accumulation, clipping and AdamW all come from ``zero.*``
and ``train.*``; ``zero.config_file`` may add or override any DeepSpeed key (merged
recursively, the user's file wins). The learning-rate schedule is not in it: the engine
gets ``train.schedule.StepSchedule`` (HF's schedules, step for step) unless the user's
file names a DeepSpeed ``scheduler``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from scilm_hpc.errors import UserError
from scilm_hpc.schema import JobConfig


def cpu_autocast(job: JobConfig, on_gpu: bool) -> bool:
    """Whether ``train.precision=bf16`` runs as ``torch.autocast`` on CPU ranks.

    On CPU ranks bf16 is autocast around the forward and loss with fp32 weights (the
    weights, the optimizer and the export stay fp32); DeepSpeed's own ``bf16`` mode
    (bf16 weights, fp32 master copy in the optimizer) is used on GPUs only. See
    docs/decisions.md, "Training throughput (issue 7)".
    """
    return job.train.precision == "bf16" and not on_gpu


def read_user_json(path: str) -> dict[str, Any]:
    """A user's DeepSpeed JSON.

    Raises:
        UserError: if missing or not a JSON object.
    """
    file = Path(path)
    if not file.is_file():
        raise UserError(f"zero.config_file: '{path}' does not exist")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise UserError(
            f"zero.config_file: {path}:{exc.lineno}: not valid JSON ({exc.msg})"
        ) from None
    if not isinstance(data, dict):
        raise UserError(f"zero.config_file: {path} must hold a JSON object")
    return data


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        out[key] = (
            _merge(out[key], value)
            if isinstance(value, dict) and isinstance(out.get(key), dict)
            else value
        )
    return out


def deepspeed_config(job: JobConfig, on_gpu: bool) -> dict[str, Any]:
    """The DeepSpeed config dict for ``job``.

    Args:
        job: the resolved job config.
        on_gpu: True with CUDA (DeepSpeed's fused Adam); False on CPU ranks (torch's
            AdamW, its fused CPU kernel unless ``train.adamw=foreach``).
    """
    t, z = job.train, job.zero
    zero: dict[str, Any] = {"stage": z.stage}
    if z.stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    if z.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": on_gpu}
    if z.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": on_gpu}
    torch_adam = not on_gpu and not z.offload_optimizer
    optimizer_params: dict[str, Any] = {
        "lr": t.lr,
        "betas": [0.9, 0.999],
        "eps": 1e-8,
        "weight_decay": t.weight_decay,
        # on CPU ranks DeepSpeed's fused Adam does not exist; CPU offload uses its CPU Adam
        "torch_adam": torch_adam,
    }
    if torch_adam:
        # torch's fused CPU AdamW: one vectorised pass per tensor, a third of the per-tensor
        # loop's time and about two thirds of foreach's (not bit-identical to them: the same
        # update, rounded in another order); foreach on request
        optimizer_params["foreach" if t.adamw == "foreach" else "fused"] = True
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.gradient_accumulation,
        "gradient_clipping": t.clip_grad,
        "zero_optimization": zero,
        "optimizer": {"type": "AdamW", "params": optimizer_params},
        "bf16": {"enabled": t.precision == "bf16" and not cpu_autocast(job, on_gpu)},
        "fp16": {"enabled": t.precision == "fp16"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if t.global_batch_size is not None:
        config["train_batch_size"] = t.global_batch_size
    if z.config_file:
        config = _merge(config, read_user_json(z.config_file))
    return config
