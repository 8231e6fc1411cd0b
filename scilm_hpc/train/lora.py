"""LoRA through peft: wrapping the model a run trains, and exporting what it learnt.

With ``model.lora.r > 0`` the pretrained model is wrapped by ``peft`` before
DeepSpeed sees it: the adapters of ``model.lora.target_modules`` (peft's default
for the model family when null) and a new task head (peft's ``modules_to_save``
for classification heads) are the only parameters that require gradients, so only
they reach the optimizer. DeepSpeed checkpoints the whole wrapped model, so resume
is what it is without LoRA.

The export merges the adapters into the base weights (``W + B @ A * alpha / r``) and
writes a plain HF directory that loads without peft, and writes the adapter alone
(peft's ``save_pretrained``) under ``export/adapter/``. Under ZeRO-3 the weights are
gathered first (``export.gathered_state_dict``) and loaded into a fresh wrapped model
on rank 0, so the adapter written is never a rank's empty partition.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

from scilm_hpc.errors import UserError, first_line
from scilm_hpc.models import build_model
from scilm_hpc.schema import JobConfig, LoraConfig
from scilm_hpc.tasks import get_task
from scilm_hpc.train.export import gathered_state_dict, write_export

#: peft's task type for each task's auto class (it decides which head is trained whole)
PEFT_TASK_TYPES = {
    "AutoModelForSequenceClassification": "SEQ_CLS",
    "AutoModelForTokenClassification": "TOKEN_CLS",
    "AutoModelForCausalLM": "CAUSAL_LM",
    "AutoModelForSeq2SeqLM": "SEQ_2_SEQ_LM",
}
ADAPTER_DIR = "adapter"


def lora_enabled(lora: LoraConfig) -> bool:
    """Whether ``model.lora`` asks for adapters (``r`` > 0)."""
    return bool(lora.r)


def linear_module_names(model: torch.nn.Module) -> list[str]:
    """The distinct last names of the model's linear layers (what ``target_modules`` names)."""
    from transformers.pytorch_utils import Conv1D

    return sorted(
        {
            name.rpartition(".")[2]
            for name, module in model.named_modules()
            if name and isinstance(module, torch.nn.Linear | Conv1D)
        }
    )


def apply_lora(model: torch.nn.Module, lora: LoraConfig, task_name: str) -> Any:
    """``model`` wrapped with LoRA adapters (a peft ``PeftModel``).

    Raises:
        UserError: if a target module does not exist (the message lists the model's
            linear modules) or peft has no default targets for this model type.
    """
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    task = get_task(task_name)
    names = linear_module_names(model)
    full_names = [n for n, _ in model.named_modules()]
    model_type = getattr(model.config, "model_type", type(model).__name__)
    targets = list(lora.target_modules) if lora.target_modules is not None else None
    if targets is not None:
        unknown = [t for t in targets if not any(n == t or n.endswith("." + t) for n in full_names)]
        if unknown:
            raise UserError(
                f"model.lora.target_modules: {', '.join(unknown)} not in the model "
                f"({model_type}); its linear modules are: {', '.join(names)}"
            )
    config = PeftLoraConfig(
        r=int(lora.r or 0),
        lora_alpha=lora.alpha,  # type: ignore[arg-type]  # peft annotates int; floats scale alike
        lora_dropout=lora.dropout,
        target_modules=targets,
        task_type=PEFT_TASK_TYPES.get(task.auto_class_name),
    )
    try:
        return get_peft_model(model, config)
    except ValueError as exc:
        detail = first_line(exc)
        raise UserError(
            f"model.lora: peft cannot wrap model type '{model_type}' with "
            f"target_modules={targets} ({detail}); set model.lora.target_modules to "
            f"some of its linear modules: {', '.join(names)}"
        ) from None


def lora_model(job: JobConfig, labels: list[str], weights: dict[str, torch.Tensor] | None) -> Any:
    """The model a LoRA run trains: the pretrained model wrapped by peft, with
    ``weights`` (a consolidated checkpoint of the wrapped model) loaded when given.

    Raises:
        UserError: as ``apply_lora``, or if ``weights`` do not fit the wrapped model.
    """
    base = build_model(job.task, job.model.name_or_path, labels, job.model.revision)
    model = apply_lora(base, job.model.lora, job.task)
    if weights is not None:
        missing, unexpected = model.load_state_dict(weights, strict=False)
        if unexpected or [k for k in missing if "position_ids" not in k]:
            raise UserError(
                f"checkpoint weights do not fit the LoRA model: missing {missing[:3]}, "
                f"unexpected {unexpected[:3]}"
            )
    return model


def trainable_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(parameters that train, all parameters)."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


def write_lora_export(model: Any, tokenizer: Any, out_dir: str | Path) -> Path:
    """Write ``out_dir`` as a plain HF directory with the adapters merged in, and the
    adapter alone under ``out_dir/adapter``. ``model`` (a ``PeftModel``) is merged in
    place."""
    out = Path(out_dir)
    adapter_tmp = out.with_name(out.name + ".adapter.tmp")
    if adapter_tmp.exists():
        shutil.rmtree(adapter_tmp)
    model.save_pretrained(adapter_tmp, safe_serialization=True)
    merged = model.merge_and_unload()
    write_export(merged, tokenizer, out)
    adapter_tmp.rename(out / ADAPTER_DIR)
    return out


def export_lora(
    engine: Any, job: JobConfig, labels: list[str], tokenizer: Any, out_dir: str | Path
) -> None:
    """Export a LoRA run: gather the weights (collective under ZeRO-3), then rank 0
    loads them into a fresh wrapped model and writes ``write_lora_export``."""
    state = gathered_state_dict(engine, job.zero.stage_for(engine.world_size))
    if engine.global_rank != 0:
        return
    assert state is not None
    model = lora_model(job, labels, {k: v.float() for k, v in state.items()})
    write_lora_export(model, tokenizer, out_dir)
