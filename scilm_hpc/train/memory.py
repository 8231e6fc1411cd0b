"""Training memory: activation checkpointing, and the peak memory a rank has used.

``train.gradient_checkpointing`` turns on transformers' activation checkpointing
(non-reentrant: gradients are those of the plain forward, and frozen inputs such as a
LoRA model's embeddings need no ``requires_grad`` trick). ``peak_memory`` is what
``metrics.jsonl`` reports: the process's peak resident set size, and on a GPU torch's
peak allocated CUDA memory.
"""

from __future__ import annotations

import resource
import sys
from typing import Any

import torch

from scilm_hpc.errors import UserError


def enable_gradient_checkpointing(model: Any) -> None:
    """Recompute activations in the backward pass instead of keeping them.

    Raises:
        UserError: if the model does not support gradient checkpointing.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft
    if not getattr(base, "supports_gradient_checkpointing", False):
        model_type = getattr(getattr(base, "config", None), "model_type", type(base).__name__)
        raise UserError(
            f"train.gradient_checkpointing: model type '{model_type}' does not support "
            f"activation checkpointing in transformers; set train.gradient_checkpointing=false"
        )
    kwargs = {"use_reentrant": False}
    if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5 (the old name warns)
        base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if hasattr(base.config, "use_cache"):
        base.config.use_cache = False  # a cache is useless in training and warns with it


def compile_model(model: Any) -> None:
    """``torch.compile`` the model's forward in place (its parameters, state_dict keys,
    checkpoints and export stay those of the eager model). Inductor draws dropout masks
    from torch's own generator (``fallback_random``), so a compiled run consumes the same
    random numbers as an eager one and resumes exactly; shapes are dynamic, so batches of
    other lengths do not recompile."""
    import torch._inductor.config as inductor

    inductor.fallback_random = True
    model.compile(dynamic=True)


def peak_memory(on_gpu: bool) -> dict[str, float]:
    """This process's peak memory so far, in MiB: ``peak_rss_mb`` (resident set size) and,
    on a GPU, ``peak_cuda_allocated_mb``."""
    # ru_maxrss is KiB on Linux, bytes on macOS
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = {"peak_rss_mb": rss / (1 << 20 if sys.platform == "darwin" else 1 << 10)}
    if on_gpu and torch.cuda.is_available():
        out["peak_cuda_allocated_mb"] = torch.cuda.max_memory_allocated() / (1 << 20)
    return out
