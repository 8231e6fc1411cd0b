"""Recovery: a short fine-tune of the pruned model, distilled from the dense teacher.

It is the finetune job's ``Trainer`` (DeepSpeed engine, resumable sampler,
checkpoints, USR2 / time-limit requeue, export) with two things changed: the model
is the pruned student whose pruned layers are ``MaskedLinear`` (masks fixed, or
growing on the gradual schedule), and the loss is
``alpha * KD + (1 - alpha) * task loss``, where KD is the KL divergence between
the teacher's and the student's softened distributions (temperature ``T``,
scaled by ``T**2`` so its gradient does not shrink with ``T``).

The masks are module buffers, so a checkpoint holds them and a resumed or
requeued recovery continues with the same masks.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from scilm_hpc.compress.prune import (
    MaskedLinear,
    fold_masks,
    gradual_sparsity,
    mask_pruned,
    set_module,
    unstructured_masks,
)
from scilm_hpc.compress.saving import is_compressed_dir, load_compressed
from scilm_hpc.compress.targets import prunable_linears
from scilm_hpc.data.encode import IGNORE_INDEX
from scilm_hpc.launch.preemption import StopFlag
from scilm_hpc.schema import CompressStep, JobConfig
from scilm_hpc.train.loop import Trainer


def distillation_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    batch: dict[str, torch.Tensor],
    task: str,
    temperature: float,
) -> torch.Tensor:
    """KL(teacher || student) of softened distributions, mean over examples / tokens."""
    if task == "token_classification":
        keep = batch["labels"] != IGNORE_INDEX
        student, teacher = student[keep], teacher[keep]
    elif task == "causal_lm":
        keep = batch["attention_mask"].bool()
        student, teacher = student[keep], teacher[keep]
    log_student = F.log_softmax(student.float() / temperature, dim=-1)
    log_teacher = F.log_softmax(teacher.float() / temperature, dim=-1)
    kl = F.kl_div(log_student, log_teacher, log_target=True, reduction="batchmean")
    return kl * temperature**2


def load_student(model_dir: str | Path, task: str) -> nn.Module:
    """The model of a step directory (compressed format) or of a plain HF export."""
    if is_compressed_dir(model_dir):
        return load_compressed(model_dir).train()
    from scilm_hpc.model_source import resolve_model_path
    from scilm_hpc.train.model import auto_class

    return auto_class(task).from_pretrained(resolve_model_path(str(model_dir)))


def masked_student(model_dir: str | Path, task: str, gradual: bool) -> nn.Module:
    """The student with its pruned layers masked (every prunable layer if ``gradual``)."""
    model = load_student(model_dir, task)
    linears = prunable_linears(model)
    if gradual:
        for name, linear in linears.items():
            set_module(model, name, MaskedLinear.wrap(linear, torch.ones_like(linear.weight)))
    else:
        mask_pruned(model, linears)
    return model


def recovered_model(
    model_dir: str | Path, export_dir: str | Path, task: str, gradual: bool
) -> nn.Module:
    """The recovered student: the recovery export's weights, masks folded in."""
    model = masked_student(model_dir, task, gradual)
    tensors = load_file(str(Path(export_dir) / "model.safetensors"))
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if unexpected or [k for k in missing if "position_ids" not in k]:
        raise RuntimeError(f"recovery export does not fit: {missing[:3]} {unexpected[:3]}")
    fold_masks(model)
    return model.eval()


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
        out = engine(**batch)
        with torch.no_grad():
            teacher = self.teacher(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
            ).logits
        kd = distillation_loss(out.logits, teacher, batch, self.job.task, self.step.temperature)
        return self.step.alpha * kd + (1.0 - self.step.alpha) * out.loss


def recovery_job(job: JobConfig, run_dir: Path, student_dir: Path, steps: int) -> JobConfig:
    """The finetune-shaped config a recovery runs under."""
    recovery = copy.deepcopy(job)
    recovery.job = "finetune"
    recovery.run.dir = str(run_dir)
    recovery.model.name_or_path = str(student_dir)
    recovery.model.revision = None
    recovery.train.max_steps = steps
    recovery.train.eval_every = 0
    recovery.train.best_metric = None
    recovery.train.early_stopping_patience = 0
    return recovery
