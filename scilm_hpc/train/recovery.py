"""Recovery training: the finetune ``Trainer`` on a masked student, distilled from a teacher
(and ``DistillTrainer``: the same on a smaller, unmasked student).

It keeps everything of the finetune job (DeepSpeed engine, resumable sampler,
checkpoints, USR2 / time-limit requeue, export) and changes two things: the model
is the pruned student whose pruned layers are ``MaskedLinear`` (masks fixed, or
growing on the gradual schedule), and the loss is
``compress.recover.distillation_loss`` mixed with the task loss.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from scilm_hpc.compress.distill import hidden_state_loss
from scilm_hpc.compress.prune import MaskedLinear, gradual_sparsity, unstructured_masks
from scilm_hpc.compress.recover import distillation_loss, load_student, masked_student
from scilm_hpc.runtime.preemption import StopFlag
from scilm_hpc.schema import CompressStep, JobConfig
from scilm_hpc.train.loop import Trainer


class RecoveryTrainer(Trainer):
    """The finetune ``Trainer`` on a masked student with a distillation loss."""

    def __init__(
        self,
        job: JobConfig,
        rank: int,
        world: int,
        stop: StopFlag,
        teacher: nn.Module,
        step: CompressStep,
        gradual: CompressStep | None,
    ) -> None:
        super().__init__(job, rank, world, False, stop)
        self.teacher = teacher.eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.step = step
        self.gradual = gradual
        self.masks: dict[str, MaskedLinear] = {}
        # sparsity the masks have reached; computed once, then kept (the masks change
        # ten times in a recovery, the check runs every micro-batch)
        self.mask_sparsity: float | None = None
        # distill with hidden_mse: the teacher layer each student layer is matched with
        self.hidden_layers: list[int] | None = None

    def build_model(self, weights: dict[str, torch.Tensor] | None) -> nn.Module:
        model = masked_student(self.job.model.name_or_path, self.job.task, self.gradual is not None)
        if weights is not None:
            model.load_state_dict(weights, strict=False)
        self.masks = {n: m for n, m in model.named_modules() if isinstance(m, MaskedLinear)}
        return model

    def _grow_masks(self, optimizer_step: int) -> None:
        """Gradual pruning: prune (by magnitude) up to the schedule's sparsity for this step."""
        assert self.gradual is not None and self.gradual.sparsity is not None
        target = gradual_sparsity(optimizer_step, self.total_steps, self.gradual.sparsity)
        if self.mask_sparsity is None:  # first call (fresh, or masks restored by a resume)
            total = sum(m.mask.numel() for m in self.masks.values())
            self.mask_sparsity = 1.0 - sum(float(m.mask.sum()) for m in self.masks.values()) / total
        if target <= self.mask_sparsity + 1e-6:
            return
        self.mask_sparsity = target
        with torch.no_grad():
            weights = {n: m.weight.detach() * m.mask for n, m in self.masks.items()}
            keep = unstructured_masks(weights, target, "magnitude", self.gradual.scope)
            for name, module in self.masks.items():
                module.mask.copy_(keep[name].to(module.mask.dtype))

    def compute_loss(self, engine: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.gradual is not None:
            self._grow_masks(int(engine.global_steps))
        hidden = {"output_hidden_states": True} if self.hidden_layers is not None else {}
        out = engine(**self.task.model_inputs(batch, engine), **hidden)
        with torch.no_grad():
            # no labels (an encoder-decoder keeps its target: the decoder reads it)
            inputs = self.task.model_inputs(self.task.forward_inputs(batch), self.teacher)
            teacher = self.teacher(**inputs, **hidden)
        kd = distillation_loss(
            out.logits, teacher.logits, batch, self.job.task, self.step.temperature
        )
        task_loss = self.task.training_loss(out, batch, self.job.train, self.labels)
        loss = self.step.alpha * kd + (1.0 - self.step.alpha) * task_loss
        if self.hidden_layers is not None:
            matched = hidden_state_loss(
                out.hidden_states, teacher.hidden_states, self.hidden_layers,
                batch["attention_mask"],
            )  # fmt: skip
            loss = loss + self.step.hidden_mse * matched
        return loss


class DistillTrainer(RecoveryTrainer):
    """Distillation into a smaller student: the recovery trainer (same loss, engine,
    checkpoints, resume and requeue) on the student saved in ``model.name_or_path``,
    nothing masked; ``hidden_layers`` (the step's ``hidden_mse`` on) adds the hidden-state
    term, student layer ``i`` matched with teacher layer ``hidden_layers[i]``."""

    def __init__(
        self,
        job: JobConfig,
        rank: int,
        world: int,
        stop: StopFlag,
        teacher: nn.Module,
        step: CompressStep,
        hidden_layers: list[int] | None = None,
    ) -> None:
        super().__init__(job, rank, world, stop, teacher, step, None)
        self.hidden_layers = hidden_layers

    def build_model(self, weights: dict[str, torch.Tensor] | None) -> nn.Module:
        model = load_student(self.job.model.name_or_path, self.job.task)
        if weights is not None:
            model.load_state_dict(weights, strict=False)
        return model
