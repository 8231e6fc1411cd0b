"""Bit-exact resume with DeepSpeed's CPU Adam (``zero.offload_optimizer=true``).

DeepSpeed's CPU Adam (``deepspeed/ops/csrc/includes/cpu_adam.h``,
``Adam_Optimizer::IncrementStep``, DeepSpeed 0.19.8) keeps the bias-correction
powers ``beta1**t`` and ``beta2**t`` in C++ as fp32, outside the optimizer's
``state_dict``. A running optimizer advances them by one fp32 multiplication per
step; a fresh one (after a resume) that is asked for step ``t > 1`` computes them
once as ``std::pow(beta, t)``. The two differ in the last bit for some ``t``
(``0.999**3`` already), so the first resumed step moves the weights by a few ulps
more or less than the uninterrupted run would. ``replay_steps`` brings a restored
optimizer's C++ counter to where the uninterrupted run's is, by calling the op on a
one-element scratch tensor for steps ``1..t`` (the model's weights are not touched).
"""

from __future__ import annotations

from typing import Any

import torch


def cpu_adam_of(engine: Any) -> Any | None:
    """The DeepSpeed CPU Adam under ``engine``'s optimizer wrappers (ZeRO's), or None."""
    optimizer = getattr(engine, "optimizer", None)
    for _ in range(4):  # engine -> ZeRO optimizer -> base optimizer
        if optimizer is None or hasattr(optimizer, "ds_opt_adam"):
            return optimizer
        optimizer = getattr(optimizer, "optimizer", None)
    return None


def restored_step(optimizer: torch.optim.Optimizer) -> int:
    """The optimizer step count its loaded state holds (0 for none)."""
    steps = [int(s["step"]) for s in optimizer.state.values() if "step" in s]
    return max(steps, default=0)


def replay_steps(optimizer: Any) -> int:
    """Advance a restored CPU Adam's C++ step counter through every step its state has
    taken, as an uninterrupted run did. Returns that step count."""
    steps = restored_step(optimizer)
    group = optimizer.param_groups[0]
    beta1, beta2 = group["betas"]
    for step in range(1, steps + 1):
        scratch = [torch.zeros(1) for _ in range(4)]  # param, grad, exp_avg, exp_avg_sq
        optimizer.ds_opt_adam.adam_update(
            optimizer.opt_id,
            step,
            group["lr"],
            beta1,
            beta2,
            group["eps"],
            group["weight_decay"],
            group["bias_correction"],
            *scratch,
        )
    return steps


def realign_after_resume(engine: Any) -> None:
    """After ``engine.load_checkpoint``: make a CPU Adam continue bit-exactly."""
    optimizer = cpu_adam_of(engine)
    if optimizer is not None:
        replay_steps(optimizer)
