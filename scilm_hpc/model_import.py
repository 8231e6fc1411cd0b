"""Import pretrained models shipped inside PyPI packages as plain HF directories.

``scilm import-model antiberty OUT_DIR`` writes AntiBERTy (Ruffolo et al. 2021, a BERT
pretrained on 558 M antibody sequences; 8 layers, hidden 512, 25 tokens, MIT), from
the package ``antiberty==0.1.3`` (``pip install --no-deps antiberty==0.1.3``; 1.0
dropped the weights), as a directory every job accepts as ``model.name_or_path``:

- ``model.safetensors``: the encoder (``bert.*``, pooler included) and the masked-LM
  head without ``cls.predictions.decoder.*``, which the checkpoint ties to the word
  embeddings (``from_pretrained`` ties it again); AntiBERTy's own species / chain /
  graft heads are left out;
- ``config.json``: the package's BERT config, ``architectures = ["BertForMaskedLM"]``;
- the tokenizer: ``BertTokenizer(vocab=..., do_lower_case=False)`` saved beside it
  (``vocab_file=`` or lower-casing silently turn every residue into ``[UNK]``).

Residues must be separated by spaces (``data.residue_separator=' '``): one token per
residue. Loading the directory with ``AutoModelForSequenceClassification`` or
``AutoModelForTokenClassification`` keeps the pretrained pooler.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

from scilm_hpc.errors import UserError

ANTIBERTY_PIN = "antiberty==0.1.3"


def antiberty_package_dir() -> Path:
    """``trained_models/`` of the installed antiberty package.

    Raises:
        UserError: if the package, or the weights of its 0.1.3 release, are missing.
    """
    try:
        import antiberty
    except ImportError:
        raise UserError(
            f"import-model antiberty: the package is not installed "
            f"(pip install --no-deps {ANTIBERTY_PIN})"
        ) from None
    root = Path(antiberty.__file__).parent / "trained_models"
    if not (root / "AntiBERTy_md_smooth" / "pytorch_model.bin").is_file():
        raise UserError(
            f"import-model antiberty: no weights under {root}; install {ANTIBERTY_PIN} "
            f"(later releases do not ship them)"
        )
    return root


def import_antiberty(out_dir: str | Path) -> Path:
    """Write AntiBERTy as a plain HF directory (see the module docstring).

    Raises:
        UserError: if the package is missing or ``out_dir`` exists and is not empty.
    """
    import torch
    from safetensors.torch import save_file
    from transformers import BertConfig, BertTokenizer

    root = antiberty_package_dir()
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"import-model: '{out}' exists and is not empty; choose a new directory")
    weights = root / "AntiBERTy_md_smooth"
    state = torch.load(weights / "pytorch_model.bin", map_location="cpu", weights_only=True)
    keep = {
        key: tensor.contiguous().clone()
        for key, tensor in state.items()
        if (key.startswith("bert.") and not key.endswith("position_ids"))
        or (key.startswith("cls.predictions.") and not key.startswith("cls.predictions.decoder."))
    }
    config = BertConfig.from_pretrained(weights)
    config.architectures = ["BertForMaskedLM"]
    tokenizer = BertTokenizer(vocab=str(root / "vocab.txt"), do_lower_case=False)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(keep, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if out.exists():
        out.rmdir()
    tmp.rename(out)
    return out


IMPORTERS: dict[str, Callable[[str | Path], Path]] = {"antiberty": import_antiberty}


def import_model(name: str, out_dir: str | Path) -> Path:
    """Write the packaged model ``name`` (``IMPORTERS``) to ``out_dir``.

    Raises:
        UserError: for an unknown name, or what the importer raises.
    """
    if name not in IMPORTERS:
        raise UserError(f"import-model: got '{name}'; allowed: {', '.join(IMPORTERS)}")
    return IMPORTERS[name](out_dir)
