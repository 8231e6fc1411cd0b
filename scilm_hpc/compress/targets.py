"""Which modules compression touches: the linear layers of the transformer blocks.

The *prunable* modules are every linear layer inside the model's stack of
transformer blocks (BERT ``encoder.layer``, Llama ``layers``; an encoder-decoder has
two stacks, the encoder's and the decoder's, cross-attention included): attention
projections and the feed-forward network. Embeddings, the pooler and the task head
are left dense: they are a small share of the compute (the word embedding is a
lookup) and the head is what the metrics read. Structured pruning also needs to
know which layers form a block's FFN and attention; ``block_layout`` says so for
the layouts scilm knows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from scilm_hpc.errors import UserError

PRUNABLE_DESCRIPTION = "torch.nn.Linear layers inside the transformer blocks (attention and FFN)"


def transformer_blocks(model: Any) -> tuple[str, nn.ModuleList]:
    """The qualified name and the ``ModuleList`` of the model's transformer blocks.

    Raises:
        UserError: if the model has no recognisable stack of blocks.
    """
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            first = type(module[0])
            same = all(type(m) is first for m in module)
            if same and (best is None or len(module) > len(best[1])):
                best = (name, module)
    if best is None:
        raise UserError(
            f"compress: {type(model).__name__} has no stack of transformer blocks "
            f"(an nn.ModuleList of identical layers); scilm compresses encoder and "
            f"decoder transformers such as BERT and Llama"
        )
    return best


def block_stacks(model: Any) -> list[tuple[str, nn.ModuleList]]:
    """Every stack of transformer blocks: the encoder's and the decoder's of an
    encoder-decoder (T5, BART, a warm-started ``EncoderDecoderModel``), else the one
    stack ``transformer_blocks`` finds.

    Raises:
        UserError: if a stack is missing.
    """
    config = getattr(model, "config", None)
    if not getattr(config, "is_encoder_decoder", False):
        return [transformer_blocks(model)]
    stacks = []
    for part in (model.get_encoder(), model.get_decoder()):
        prefix = next(name for name, module in model.named_modules() if module is part)
        name, blocks = transformer_blocks(part)
        stacks.append((f"{prefix}.{name}" if prefix else name, blocks))
    return stacks


def is_encoder_decoder(model: Any) -> bool:
    """Whether ``model`` has two stacks of blocks (encoder and decoder)."""
    return bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))


def prunable_linears(model: Any) -> dict[str, Any]:
    """Qualified name -> linear module, for every linear layer of the transformer blocks.

    Quantised replacements of ``nn.Linear`` made by this package count too, so
    a later step finds the same modules.

    Raises:
        UserError: if a block holds a weight layer scilm cannot compress (e.g.
            GPT-2's ``Conv1D``), naming the module and its type.
    """
    found: dict[str, Any] = {}
    stacks = block_stacks(model)
    for prefix, blocks in stacks:
        _stack_linears(prefix, blocks, found)
    if not found:
        raise UserError(
            f"compress: the blocks under '{stacks[0][0]}' hold no torch.nn.Linear layer"
        )
    return found


def _stack_linears(prefix: str, blocks: nn.ModuleList, found: dict[str, Any]) -> None:
    """Add the linear layers of one stack of blocks to ``found`` (see ``prunable_linears``)."""
    from scilm_hpc.compress.quantize import QUANTIZED_LINEAR_TYPES

    for index, block in enumerate(blocks):
        for name, module in block.named_modules():
            full = f"{prefix}.{index}.{name}" if name else f"{prefix}.{index}"
            if isinstance(module, (nn.Linear, *QUANTIZED_LINEAR_TYPES)):
                found[full] = module
            elif type(module).__name__ in ("Conv1D", "Conv1d", "Conv2d") or (
                not list(module.children())
                and getattr(module, "weight", None) is not None
                and getattr(module.weight, "dim", lambda: 0)() == 2
                and not isinstance(module, nn.Embedding)
            ):
                raise UserError(
                    f"compress: module '{full}' is a {type(module).__name__}; scilm prunes "
                    f"and quantises torch.nn.Linear layers only (GPT-2-style Conv1D layers "
                    f"are not supported)"
                )


@dataclass(frozen=True)
class BlockLayout:
    """Names (relative to a block) of the layers structured pruning shrinks together."""

    ffn_in: tuple[str, ...]  # produce the FFN neurons (rows removed)
    ffn_out: str  # consumes them (columns removed)
    heads_in: tuple[str, ...]  # query, key, value (rows of removed heads)
    heads_out: str  # attention output projection (columns of removed heads)
    head_attr: str  # the attention module holding the head size

    def under(self, prefix: str) -> BlockLayout:
        """The same layout with every name below ``prefix`` (``""`` or ending in ``.``)."""
        return BlockLayout(
            ffn_in=tuple(prefix + n for n in self.ffn_in),
            ffn_out=prefix + self.ffn_out,
            heads_in=tuple(prefix + n for n in self.heads_in),
            heads_out=prefix + self.heads_out,
            head_attr=prefix + self.head_attr,
        )


#: Block layouts scilm knows. A layout's names may sit below a sub-module of the block
#: (T5 keeps its FFN in ``layer.1`` of an encoder block and ``layer.2`` of a decoder
#: block); ``heads_in=()``: heads are not pruned for that layout.
LAYOUTS = {
    "bert": BlockLayout(  # also a BERT decoder (cross-attention beside it)
        ffn_in=("intermediate.dense",),
        ffn_out="output.dense",
        heads_in=("attention.self.query", "attention.self.key", "attention.self.value"),
        heads_out="attention.output.dense",
        head_attr="attention.self",
    ),
    "llama": BlockLayout(
        ffn_in=("mlp.gate_proj", "mlp.up_proj"),
        ffn_out="mlp.down_proj",
        heads_in=(),  # grouped-query attention: heads are not pruned independently
        heads_out="self_attn.o_proj",
        head_attr="self_attn",
    ),
    "t5-gated": BlockLayout(
        ffn_in=("DenseReluDense.wi_0", "DenseReluDense.wi_1"),
        ffn_out="DenseReluDense.wo",
        heads_in=(),
        heads_out="",
        head_attr="",
    ),
    "t5": BlockLayout(
        ffn_in=("DenseReluDense.wi",),
        ffn_out="DenseReluDense.wo",
        heads_in=(),
        heads_out="",
        head_attr="",
    ),
    "bart": BlockLayout(
        ffn_in=("fc1",),
        ffn_out="fc2",
        heads_in=(),
        heads_out="",
        head_attr="",
    ),
}


def _prefix_holding(names: set[str], wanted: tuple[str, ...]) -> str | None:
    """The shortest prefix (``""`` or a module path ending in ``.``) under which every
    name of ``wanted`` is in ``names``; None if there is none."""
    first = wanted[0]
    found = {n[: len(n) - len(first)] for n in names if n == first or n.endswith("." + first)}
    candidates = sorted(found, key=len)
    for prefix in candidates:
        if all(prefix + w in names for w in wanted):
            return prefix
    return None


def block_layout(blocks: nn.ModuleList, pattern: str, model_name: str = "the model") -> BlockLayout:
    """The layout of ``blocks`` (one stack) for structured ``pattern`` (ffn or heads).

    Raises:
        UserError: for a block layout scilm does not know.
    """
    names = {n for n, _ in blocks[0].named_modules()}
    for kind, layout in LAYOUTS.items():
        if pattern == "ffn":
            wanted = (*layout.ffn_in, layout.ffn_out)
        elif layout.heads_in:
            wanted = (*layout.heads_in, layout.heads_out)
        else:
            if kind == "llama" and layout.heads_out in names:
                raise UserError(
                    "compress: pattern 'heads' on a Llama-style model is not supported "
                    "(grouped-query attention shares key/value heads); use pattern 'ffn'"
                )
            continue
        prefix = _prefix_holding(names, wanted)
        if prefix is not None:
            return layout.under(prefix)
    known = (
        "BERT-style, Llama-style, T5 and BART blocks" if pattern == "ffn" else "BERT-style encoders"
    )
    raise UserError(
        f"compress: structured pattern '{pattern}' does not know the block layout of "
        f"{model_name} (known: {known})"
    )


def structured_stacks(model: Any, pattern: str) -> list[tuple[str, nn.ModuleList, BlockLayout]]:
    """Every stack of blocks (``block_stacks``) with its layout for ``pattern``.

    Raises:
        UserError: for an unknown layout, or attention heads of an encoder-decoder
            (cross-attention reads the encoder's heads; scilm prunes FFN neurons there).
    """
    stacks = block_stacks(model)
    if pattern == "heads" and len(stacks) > 1:
        raise UserError(
            "compress: pattern 'heads' of an encoder-decoder is not supported; use "
            "pattern 'ffn' (FFN neurons of both stacks)"
        )
    name = type(model).__name__
    return [(prefix, blocks, block_layout(blocks, pattern, name)) for prefix, blocks in stacks]
