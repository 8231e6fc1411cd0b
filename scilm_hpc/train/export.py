"""Export the trained model as a HF directory (safetensors, label maps, tokenizer).

Under ZeRO-3 each rank holds a slice of every parameter, so every rank must
take part in gathering the full weights; only rank 0 writes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


def gathered_state_dict(engine: Any, zero_stage: int) -> dict[str, torch.Tensor] | None:
    """Full model weights on rank 0 (None on other ranks). Collective under ZeRO-3."""
    if zero_stage == 3:
        return engine._zero3_consolidated_16bit_state_dict()
    if engine.global_rank != 0:
        return None
    return {k: v.detach().clone() for k, v in engine.module.state_dict().items()}


def export_model(engine: Any, tokenizer: Any, out_dir: str | Path, zero_stage: int) -> None:
    """Write ``out_dir`` loadable with ``AutoModelFor*.from_pretrained`` and ``pipeline``."""
    state = gathered_state_dict(engine, zero_stage)
    if engine.global_rank != 0:
        return
    assert state is not None
    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    module = engine.module
    state = {k: v.to(torch.float32) if v.is_floating_point() else v for k, v in state.items()}
    module.config.torch_dtype = "float32"
    module.save_pretrained(tmp, state_dict=state, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if out.exists():
        import shutil

        shutil.rmtree(out)
    tmp.rename(out)
