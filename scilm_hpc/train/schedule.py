"""The learning-rate schedule of a run: HF ``transformers``' schedules, step for step.

Optimizer step k (counted from 0) runs at ``train.lr * lr_factor(schedule, k, warmup,
total)``, the factor of HF's ``get_linear_schedule_with_warmup`` /
``get_cosine_schedule_with_warmup`` / ``get_constant_schedule_with_warmup``: step 0 of a
warm-up at 0, step 1 at ``lr / warmup``, the decay reaching 0 at step ``total``.
DeepSpeed's own ``WarmupDecayLR`` is one step behind that (it applies its starting lr
twice), and its cosine and no-warm-up variants differ again, so the engine gets this
scheduler instead (``deepspeed.initialize(lr_scheduler=...)``); it is stepped by the
engine after each applied optimizer step and checkpointed with it.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

from scilm_hpc.schema import JobConfig


def warmup_steps(ratio: float, total_steps: int) -> int:
    """Warm-up steps of ``train.warmup_ratio`` over ``total_steps`` (rounded)."""
    return int(round(ratio * total_steps))


def lr_factor(schedule: str, step: int, warmup: int, total: int) -> float:
    """Optimizer step ``step``'s (from 0) learning rate as a fraction of ``train.lr``.

    Args:
        schedule: ``linear``, ``cosine`` or ``constant`` (``train.schedule``).
        step: the optimizer step, from 0.
        warmup: warm-up steps (0: none).
        total: the run's optimizer steps.
    """
    if step < warmup:
        return step / max(1, warmup)
    if schedule == "constant":
        return 1.0
    if schedule == "linear":
        return max(0.0, (total - step) / max(1, total - warmup))
    if schedule == "cosine":
        progress = (step - warmup) / max(1, total - warmup)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
    raise ValueError(f"unknown schedule {schedule!r}")


class StepSchedule:
    """Sets the optimizer's learning rate of each step from ``lr_factor``.

    Holds ``steps``, the optimizer steps taken: the lr in the optimizer is always the one
    of step ``steps`` (the next to run). ``step()`` (DeepSpeed calls it after each applied
    optimizer step) advances it; ``state_dict`` / ``load_state_dict`` save and restore it
    and set the optimizer's lr, so a resumed run continues at the right step.
    """

    def __init__(self, optimizer: Any, schedule: str, warmup: int, total: int) -> None:
        self.optimizer = optimizer
        self.schedule, self.warmup, self.total = schedule, warmup, total
        self.base_lrs = [float(group["lr"]) for group in optimizer.param_groups]
        self.steps = 0
        self.apply()

    def lr_at(self, step: int) -> list[float]:
        """Each parameter group's learning rate at optimizer step ``step`` (from 0)."""
        factor = lr_factor(self.schedule, step, self.warmup, self.total)
        return [base * factor for base in self.base_lrs]

    def apply(self) -> None:
        """Set the optimizer's rates to those of step ``steps`` (after loading an optimizer
        state, whose saved rates would otherwise win)."""
        for group, lr in zip(self.optimizer.param_groups, self.lr_at(self.steps), strict=True):
            group["lr"] = lr

    def step(self, *_: Any, **__: Any) -> None:
        """One optimizer step taken: set the next one's rate."""
        self.steps += 1
        self.apply()

    def get_lr(self) -> list[float]:
        """The rates of the next optimizer step."""
        return self.lr_at(self.steps)

    get_last_lr = get_lr

    def state_dict(self) -> dict[str, int]:
        return {"steps": self.steps}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Restore ``state_dict`` (or a DeepSpeed scheduler's: after n steps its
        ``last_batch_iteration`` is n - 1) and set the optimizer's rate from it."""
        if "steps" in state:
            self.steps = int(state["steps"])
        else:
            self.steps = int(state["last_batch_iteration"]) + 1
        self.apply()


def scheduler_factory(
    job: JobConfig, total_steps: int, ds_config: dict[str, Any]
) -> Callable[[Any], StepSchedule] | None:
    """What ``deepspeed.initialize(lr_scheduler=...)`` gets: ``StepSchedule`` for
    ``train.schedule``, or None where the user's ``zero.config_file`` names a DeepSpeed
    ``scheduler`` (theirs then runs)."""
    if "scheduler" in ds_config:
        return None
    t = job.train
    return functools.partial(
        StepSchedule,
        schedule=t.schedule,
        warmup=warmup_steps(t.warmup_ratio, total_steps),
        total=total_steps,
    )
