"""Recovery: a short fine-tune of the pruned model, distilled from the dense teacher.

The training itself is ``train.recovery.RecoveryTrainer`` (the finetune
``Trainer`` on a masked student with a distillation loss); this module holds what
it is built from: the distillation loss ``alpha * KD + (1 - alpha) * task loss``,
where KD is the KL divergence between the teacher's and the student's softened
distributions (temperature ``T``, scaled by ``T**2`` so its gradient does not
shrink with ``T``), the masked student (pruned layers as ``MaskedLinear``; the
masks are module buffers, so a checkpoint holds them and a resumed or requeued
recovery continues with the same masks), the recovered model, and the
finetune-shaped config a recovery runs under.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from scilm_hpc.compress.prune import MaskedLinear, fold_masks, mask_pruned, set_module
from scilm_hpc.compress.saving import is_compressed_dir, load_compressed
from scilm_hpc.compress.targets import prunable_linears
from scilm_hpc.model_source import resolve_model_path
from scilm_hpc.schema import JobConfig
from scilm_hpc.tasks import Task, get_task


def distillation_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    batch: dict[str, torch.Tensor],
    task: str | Task,
    temperature: float,
) -> torch.Tensor:
    """KL(teacher || student) of softened distributions, mean over the positions the
    task compares (examples, tagged tokens or real tokens); for a task whose outputs
    are values (regression) the MSE between them, temperature unused."""
    task = get_task(task)
    keep = task.distill_positions(batch)
    if keep is not None:
        student, teacher = student[keep], teacher[keep]
    if task.outputs_values:
        return F.mse_loss(student.float(), teacher.float())
    log_student = F.log_softmax(student.float() / temperature, dim=-1)
    log_teacher = F.log_softmax(teacher.float() / temperature, dim=-1)
    kl = F.kl_div(log_student, log_teacher, log_target=True, reduction="batchmean")
    return kl * temperature**2


def load_student(model_dir: str | Path, task: str | Task) -> nn.Module:
    """The model of a step directory (compressed format) or of a plain HF export."""
    if is_compressed_dir(model_dir):
        return load_compressed(model_dir).train()
    return get_task(task).load_finished(resolve_model_path(str(model_dir))).train()


def masked_student(model_dir: str | Path, task: str | Task, gradual: bool) -> nn.Module:
    """The student with its pruned layers masked (every prunable layer if ``gradual``)."""
    model = load_student(model_dir, task)
    linears = prunable_linears(model)
    if gradual:
        for name, linear in linears.items():
            set_module(model, name, MaskedLinear.wrap(linear, torch.ones_like(linear.weight)))
    else:
        mask_pruned(model, linears)
    return model


def _module_names(tensors: dict[str, torch.Tensor], expected: set[str]) -> dict[str, torch.Tensor]:
    """``tensors`` under the model's own names: transformers' save_pretrained writes some
    models' LayerNorm parameters under their legacy names (ESM: ``LayerNorm.gamma`` /
    ``.beta``), which only its from_pretrained maps back."""
    out = {}
    for key, value in tensors.items():
        for legacy, name in ((".gamma", ".weight"), (".beta", ".bias")):
            if key not in expected and key.endswith(legacy):
                if (renamed := key[: -len(legacy)] + name) in expected:
                    key = renamed
        out[key] = value
    return out


def recovered_model(
    model_dir: str | Path, export_dir: str | Path, task: str | Task, gradual: bool
) -> nn.Module:
    """The recovered student: the recovery export's weights, masks folded in."""
    model = masked_student(model_dir, task, gradual)
    tensors = load_file(str(Path(export_dir) / "model.safetensors"))
    tensors = _module_names(tensors, set(model.state_dict()))
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if unexpected or [k for k in missing if "position_ids" not in k]:
        raise RuntimeError(f"recovery export does not fit: {missing[:3]} {unexpected[:3]}")
    fold_masks(model)
    return model.eval()


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
