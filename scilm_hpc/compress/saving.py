"""The compressed model directory, and the one call that loads it.

Layout (a HF directory plus one file)::

    config.json, tokenizer files     as save_pretrained writes them
    model.safetensors                every tensor; quantised layers as integers + scales
    torchao_weights.pt               only with quantize.backend torchao: the weights of
                                     the torchao layers (tensor subclasses, torch.save)
    model_int8_static.pt2            only with quantize.method static: the exported,
                                     quantised graph (then no model.safetensors)
    scilm_compression.json           task, quantised modules, shrunk layers, recipe

``load_compressed(DIR)`` builds the architecture from ``config.json``, shrinks the
linear layers that structured pruning shrank, puts the quantised modules in place,
and loads every tensor (strictly: a missing or unexpected tensor is an error). A
directory written by ``save_compressed`` reloads to a model that computes exactly
what the saved one did: the integers and scales are stored, not re-derived.
torchao's weights are tensor subclasses, which safetensors cannot hold: they go
through ``torch.save`` and come back through ``torch.load(weights_only=True)``
(torchao registers its classes as safe), with the torchao version they were written
with; another minor version is refused with a message rather than misread.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from scilm_hpc.compress.prune import MaskedLinear, set_module
from scilm_hpc.compress.quantize import (
    DynamicInt8Linear,
    QuantizedEmbedding,
    WeightOnlyLinear,
    dynamic_from_int8,
)
from scilm_hpc.compress.static_quant import (
    PROGRAM_FILE,
    StaticInt8Model,
    load_program,
    save_program,
    versions,
)
from scilm_hpc.compress.torchao_quant import import_torchao, is_torchao_linear
from scilm_hpc.errors import UserError
from scilm_hpc.rundir import replace_dir

META = "scilm_compression.json"
WEIGHTS = "model.safetensors"
TORCHAO_WEIGHTS = "torchao_weights.pt"
FORMAT_VERSION = 1


def is_compressed_dir(path: str | Path) -> bool:
    """True if ``path`` was written by ``save_compressed``."""
    return (Path(path) / META).is_file()


def _tensors_and_meta(
    model: Any,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, Any]]:
    modules: dict[str, Any] = {}
    tensors: dict[str, torch.Tensor] = {}
    torchao: dict[str, torch.Tensor] = {}
    skip: list[str] = []
    for name, module in model.named_modules():
        if isinstance(module, MaskedLinear):
            raise RuntimeError(f"fold the masks before saving ({name} is still masked)")
        if is_torchao_linear(module):
            torchao[f"{name}.weight"] = module.weight.detach()
            modules[name] = {"type": "torchao", "weight": type(module.weight).__name__}
            skip.append(f"{name}.weight")
        if isinstance(module, DynamicInt8Linear):
            weight = module.weight()
            tensors[f"{name}.qweight"] = weight.int_repr()
            tensors[f"{name}.scales"] = weight.q_per_channel_scales().float()
            bias = module.bias()
            if bias is not None:
                tensors[f"{name}.bias"] = bias.detach()
            modules[name] = {"type": "dynamic_int8", "has_bias": bias is not None}
            skip.append(name + ".")
        elif isinstance(module, WeightOnlyLinear):
            modules[name] = {
                "type": "weight_only",
                "bits": module.bits,
                "in_features": module.in_features,
                "out_features": module.out_features,
                "groups": module.scales.shape[1],
                "has_bias": module.bias is not None,
            }
        elif isinstance(module, QuantizedEmbedding):
            modules[name] = {
                "type": "embedding",
                "bits": module.bits,
                "num_embeddings": module.num_embeddings,
                "embedding_dim": module.embedding_dim,
                "groups": module.scales.shape[1],
                "padding_idx": module.padding_idx,
            }
    for key, value in model.state_dict().items():
        if isinstance(value, torch.Tensor) and not any(key.startswith(s) for s in skip):
            tensors[key] = value
    tied: dict[str, str] = {}
    seen: dict[tuple[int, tuple[int, ...]], str] = {}
    for key in sorted(tensors):
        value = tensors[key]
        ident = (
            value.untyped_storage().data_ptr() + int(value.storage_offset()),
            tuple(value.shape),
        )
        if ident in seen and value.numel() > 0:
            tied[key] = seen[ident]
        else:
            seen[ident] = key
    linear_shapes = {
        name: list(m.weight.shape) for name, m in model.named_modules() if type(m) is nn.Linear
    }
    meta = {"modules": modules, "tied": tied, "linear_shapes": linear_shapes}
    out = {k: v.detach().contiguous().clone() for k, v in tensors.items() if k not in tied}
    if torchao:
        meta["torchao_version"] = import_torchao().__version__
    return out, torchao, meta


def save_compressed(
    model: Any, tokenizer: Any, out_dir: str | Path, task: str, info: dict[str, Any]
) -> None:
    """Write ``model`` (masks folded, possibly shrunk or quantised) to ``out_dir`` atomically.

    Args:
        model: the model.
        tokenizer: saved beside it.
        out_dir: the directory (replaced if it exists).
        task: the model's task (``schema.TASKS``).
        info: kept in ``scilm_compression.json`` (recipe, steps).
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    if isinstance(model, StaticInt8Model):
        save_program(model, tmp / PROGRAM_FILE)
        model.config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        static = {"inputs": model.input_names, "versions": versions()}
        meta = {"format": FORMAT_VERSION, "task": task, "static_int8": static, **info}
        (tmp / META).write_text(json.dumps(meta, indent=1), encoding="utf-8")
        replace_dir(tmp, out)
        return
    tensors, torchao, meta = _tensors_and_meta(model)
    heads = {
        name: int(m.num_attention_heads)
        for name, m in model.named_modules()
        if hasattr(m, "attention_head_size") and hasattr(m, "num_attention_heads")
    }
    save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt"})
    if torchao:
        torch.save(torchao, tmp / TORCHAO_WEIGHTS)
    model.config.save_pretrained(tmp)
    if model.can_generate():  # decoder start, EOS, pad: what generate() reads
        model.generation_config.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    meta = {"format": FORMAT_VERSION, "task": task, **meta, "attention_heads": heads, **info}
    (tmp / META).write_text(json.dumps(meta, indent=1), encoding="utf-8")
    replace_dir(tmp, out)


def weights_size(path: str | Path) -> int:
    """Bytes of the weight files of a model directory (safetensors or .bin)."""
    root = Path(path)
    files = [
        *root.glob("*.safetensors"),
        *root.glob("*.bin"),
        *root.glob(TORCHAO_WEIGHTS),
        *root.glob(PROGRAM_FILE),
    ]
    return sum(f.stat().st_size for f in files)


def load_compressed(path: str | Path) -> nn.Module:
    """Load a directory written by the compress job (``RUN_DIR/compressed``), in eval mode.

    Args:
        path: the directory.

    Returns:
        The model (a transformers model whose layers may be quantised or shrunk).

    Raises:
        UserError: if ``path`` is not a compressed model directory.
    """
    from safetensors.torch import load_file
    from transformers import AutoConfig

    from scilm_hpc.tasks import get_task

    root = Path(path)
    if not is_compressed_dir(root):
        raise UserError(
            f"'{path}' is not a compressed model directory (no {META}); "
            f"give RUN_DIR/compressed written by scilm compress"
        )
    meta = json.loads((root / META).read_text(encoding="utf-8"))
    if meta.get("format") != FORMAT_VERSION:
        raise UserError(
            f"'{path}': {META} format {meta.get('format')}; this scilm reads {FORMAT_VERSION}"
        )
    config = AutoConfig.from_pretrained(root)
    if "static_int8" in meta:
        static = meta["static_int8"]
        return load_program(root / PROGRAM_FILE, config, static["inputs"], static["versions"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_task(meta["task"]).class_for_config(config).from_config(config)
    if (root / "generation_config.json").is_file():
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(root)
    tensors = load_file(str(root / WEIGHTS))
    torchao = _torchao_weights(root, meta)
    for alias, source in meta["tied"].items():
        tensors[alias] = tensors[source]
    for name, (out_features, in_features) in meta["linear_shapes"].items():
        current = model.get_submodule(name)
        if isinstance(current, nn.Linear) and tuple(current.weight.shape) != (
            out_features,
            in_features,
        ):
            set_module(
                model, name, nn.Linear(in_features, out_features, bias=current.bias is not None)
            )
    for name, heads in meta["attention_heads"].items():
        attention = model.get_submodule(name)
        attention.num_attention_heads = heads
        attention.all_head_size = heads * attention.attention_head_size
    dynamic: dict[str, Any] = {}
    for name, spec in meta["modules"].items():
        if spec["type"] == "dynamic_int8":
            bias = tensors.pop(f"{name}.bias", None)
            values, scales = tensors.pop(f"{name}.qweight"), tensors.pop(f"{name}.scales")
            dynamic[name] = dynamic_from_int8(values, scales, bias)
        elif spec["type"] == "torchao":
            pass  # an nn.Linear whose weight is set below
        elif spec["type"] == "weight_only":
            set_module(
                model,
                name,
                WeightOnlyLinear(
                    spec["in_features"],
                    spec["out_features"],
                    spec["bits"],
                    spec["groups"],
                    spec["has_bias"],
                ),
            )
        else:
            set_module(
                model,
                name,
                QuantizedEmbedding(
                    spec["num_embeddings"],
                    spec["embedding_dim"],
                    spec["bits"],
                    spec["groups"],
                    spec["padding_idx"],
                ),
            )
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    # the dynamic int8 layers are still the float layers here: their tensors were taken
    missing = [
        k for k in missing if not any(k.startswith(d + ".") for d in dynamic) and k not in torchao
    ]
    if missing or unexpected:
        raise RuntimeError(
            f"{path}: tensors do not fit the model: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
    for name, module in dynamic.items():
        set_module(model, name, module)
    for key, weight in torchao.items():
        linear = model.get_submodule(key.rsplit(".", 1)[0])
        linear.weight = nn.Parameter(weight, requires_grad=False)
    return model.eval()


def _torchao_weights(root: Path, meta: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The torchao layers' weights of a compressed directory ({} if it has none).

    Raises:
        UserError: if torchao is missing, or its minor version differs from the writer's.
    """
    written = meta.get("torchao_version")
    if written is None:
        return {}
    have = import_torchao().__version__
    if have.split(".")[:2] != str(written).split(".")[:2]:
        raise UserError(
            f"'{root}': its torchao layers were written with torchao {written}, this "
            f"environment has {have}; install torchao=={written} or compress again"
        )
    loaded: dict[str, torch.Tensor] = torch.load(root / TORCHAO_WEIGHTS, weights_only=True)
    return loaded
