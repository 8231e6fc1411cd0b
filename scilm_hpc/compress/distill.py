"""The student of a ``distill`` step: the teacher's architecture made smaller.

``build_student`` takes the teacher's config with fewer layers (and optionally a
narrower hidden size, FFN or fewer heads: ``schema.StudentSpec``), builds that
model and initialises it from the teacher, DistilBERT-style: student layer ``i``
starts as teacher layer ``layers[i]``; embeddings, pooler and head are the
teacher's. Where a dimension is narrower, a tensor starts as the leading slice of
the teacher's (an initialisation, not a copy of what the teacher computes).

Layers are found by name, not by architecture: the ``N`` in ``….layer.N.…``,
``….layers.N.…``, ``….h.N.…`` or ``….block.N.…`` (BERT, ESM, RoBERTa, Llama,
GPT-2), so one rule covers every task's model. The training itself is
``train.recovery.DistillTrainer``: the recovery trainer with an unmasked student; with
``hidden_mse`` its loss also matches each student layer's hidden states to those of the
teacher layer it started from (``hidden_layer_map``, ``hidden_state_loss``).
"""

from __future__ import annotations

import copy
import re
import warnings
from typing import Any

import torch
from torch import nn

from scilm_hpc.errors import UserError
from scilm_hpc.schema import StudentSpec
from scilm_hpc.tasks import Task, get_task

#: ``prefix`` + layer index + rest, for the layer stacks of the common architectures
LAYER_KEY = re.compile(r"^(.*?\.(?:layer|layers|h|block)\.)(\d+)(\..*)$")
WIDTHS = ("hidden_size", "intermediate_size", "num_attention_heads")


def default_layers(teacher_layers: int, student_layers: int) -> list[int]:
    """Teacher layers the student starts from: evenly spread, the first and the last
    kept (one layer: the last)."""
    if student_layers == 1:
        return [teacher_layers - 1]
    step = (teacher_layers - 1) / (student_layers - 1)
    return [round(i * step) for i in range(student_layers)]


def student_config(teacher_config: Any, spec: StudentSpec, key: str) -> tuple[Any, list[int]]:
    """The student's config and the teacher layer each student layer starts from.

    Raises:
        UserError: naming ``key`` (the step's dotted key) if the spec does not fit the teacher.
    """
    n_teacher = getattr(teacher_config, "num_hidden_layers", None)
    if not isinstance(n_teacher, int):
        raise UserError(
            f"{key}.student: the teacher ({teacher_config.model_type}) has no "
            f"num_hidden_layers; give a student model with {key}.student.name_or_path"
        )
    n_student = spec.num_hidden_layers or len(spec.layers) or (n_teacher + 1) // 2
    layers = list(spec.layers) or default_layers(n_teacher, n_student)
    problems = []
    if not 1 <= n_student <= n_teacher:
        problems.append(
            f"{key}.student.num_hidden_layers: got {n_student}; the teacher has {n_teacher} "
            f"layers, a student 1 to {n_teacher}"
        )
    if len(layers) != n_student or not all(0 <= i < n_teacher for i in layers):
        problems.append(
            f"{key}.student.layers: got {layers}; give {n_student} teacher layer indices "
            f"from 0 to {n_teacher - 1}"
        )
    config = copy.deepcopy(teacher_config)
    config.num_hidden_layers = n_student
    for name in WIDTHS:
        value = getattr(spec, name)
        if value is None:
            continue
        teacher_value = getattr(teacher_config, name, None)
        if not isinstance(teacher_value, int) or not 1 <= value <= teacher_value:
            problems.append(
                f"{key}.student.{name}: got {value}; a student is at most as wide as the "
                f"teacher ({teacher_value})"
            )
        setattr(config, name, value)
    heads = getattr(config, "num_attention_heads", None)
    if isinstance(heads, int) and config.hidden_size % heads:
        problems.append(
            f"{key}.student: hidden_size {config.hidden_size} is not a multiple of "
            f"num_attention_heads {heads}"
        )
    if problems:
        raise UserError("\n".join(problems))
    return config, layers


def teacher_key(student_key: str, layers: list[int]) -> str:
    """The teacher tensor a student tensor starts from (layer index mapped)."""
    match = LAYER_KEY.match(student_key)
    if match is None:
        return student_key
    prefix, index, rest = match.groups()
    return f"{prefix}{layers[int(index)]}{rest}"


@torch.no_grad()
def build_student(teacher: nn.Module, spec: StudentSpec, task: str | Task, key: str) -> nn.Module:
    """A smaller model of the teacher's architecture, initialised from the teacher.

    Args:
        teacher: the teacher (a transformers model of ``task``'s auto class).
        spec: the student's shape.
        task: the task.
        key: the step's dotted config key (for messages).

    Returns:
        The student, in train mode.

    Raises:
        UserError: if the spec does not fit the teacher.
    """
    config, layers = student_config(teacher.config, spec, key)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        student = get_task(task).auto_class().from_config(config)
    source = teacher.state_dict()
    state = student.state_dict()
    for name, tensor in state.items():
        origin = source.get(teacher_key(name, layers))
        if origin is None or origin.dim() != tensor.dim():
            continue
        if any(s > t for s, t in zip(tensor.shape, origin.shape, strict=True)):
            continue
        tensor.copy_(origin[tuple(slice(0, s) for s in tensor.shape)])
    return student.train()


def hidden_layer_map(teacher_config: Any, student: Any, spec: StudentSpec, key: str) -> list[int]:
    """The teacher layer whose hidden states each student layer is matched with
    (``hidden_mse``): the layer it was initialised from (``student_config``'s layers), or
    for a student given by path the default spread (``default_layers``).

    Raises:
        UserError: naming ``key`` for a model without hidden states per layer (an
            encoder-decoder), without ``num_hidden_layers``, or of another width than
            the teacher's (``student``: the student's config).
    """
    problems = []
    for who, config in (("teacher", teacher_config), ("student", student)):
        if getattr(config, "is_encoder_decoder", False) or not isinstance(
            getattr(config, "num_hidden_layers", None), int
        ):
            problems.append(
                f"{key}.hidden_mse: the {who} ({config.model_type}) has no single stack of "
                f"num_hidden_layers layers to match; use an encoder-only or decoder-only "
                f"model, or hidden_mse: 0"
            )
    if problems:
        raise UserError("\n".join(problems))
    width = (teacher_config.hidden_size, student.hidden_size)
    if width[0] != width[1]:
        raise UserError(
            f"{key}.hidden_mse: the student's hidden_size {width[1]} differs from the "
            f"teacher's {width[0]}; hidden states are compared as they are (no projection), "
            f"so use a student of the teacher's width or hidden_mse: 0"
        )
    if spec.name_or_path:
        return default_layers(teacher_config.num_hidden_layers, student.num_hidden_layers)
    return student_config(teacher_config, spec, key)[1]


def hidden_state_loss(
    student: tuple[torch.Tensor, ...],
    teacher: tuple[torch.Tensor, ...],
    layers: list[int],
    mask: torch.Tensor,
) -> torch.Tensor:
    """Mean over student layers ``i`` of the MSE between the output of student layer ``i``
    and that of teacher layer ``layers[i]``, over the real tokens (``mask``).

    Args:
        student: the student's ``hidden_states`` (embeddings, then one per layer).
        teacher: the teacher's.
        layers: the teacher layer of each student layer (``hidden_layer_map``).
        mask: [batch, length], nonzero at real tokens (the attention mask).
    """
    assert len(student) == len(layers) + 1, (len(student), len(layers))
    keep = mask.bool()
    terms = [
        torch.nn.functional.mse_loss(student[i + 1][keep].float(), teacher[t + 1][keep].float())
        for i, t in enumerate(layers)
    ]
    return torch.stack(terms).mean()
