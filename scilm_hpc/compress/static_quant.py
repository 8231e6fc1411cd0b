"""Static int8 for CPU inference (``quantize.method: static``): torchao's PT2E flow.

The model is exported (``torch.export``, batch and length dimensions dynamic), its
prunable linear layers annotated by torchao's ``X86InductorQuantizer`` (int8 weights
per output channel, int8 activations per tensor with a range fixed from calibration
batches of the train split), calibrated, converted, and exported again. The result
is a ``StaticInt8Model``: a graph, not a ``transformers`` model, that returns
``.logits`` for the task's forward inputs. Its first call compiles it with
``torch.compile`` (inductor, weights frozen and prepacked for oneDNN's int8 kernels;
about 20 s for MiniLM on one core, once per process: batch and length stay dynamic,
a batch of one compiles once more); every later call runs the compiled kernels, where
quantisation is fused into the preceding operation and the fp32 GELU, softmax and
layer norms run as fused C++ loops. That is what makes it faster than dynamic int8
on short texts (docs/decisions.md).

Scope: tasks that score (classification, token classification, regression) on
models ``torch.export`` can trace; generation (seq2seq) and causal LMs are refused
(per-tensor activation ranges fixed in advance suit encoder activations; for LLMs
use ``int4-weight``). The graph is for inference only: no recovery or pruning after it.

Saved as ``model_int8_static.pt2`` (``torch.export.save``) beside ``config.json``; the
torch and torchao versions are recorded and another minor version is refused on load.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from scilm_hpc.errors import UserError, first_line

#: file of the exported graph in a compressed directory
PROGRAM_FILE = "model_int8_static.pt2"


def _minor(version: str) -> str:
    return ".".join(version.split("+")[0].split(".")[:2])


def versions() -> dict[str, str]:
    """torch and torchao versions a saved graph is tied to (major.minor)."""
    from scilm_hpc.compress.torchao_quant import import_torchao

    return {"torch": _minor(torch.__version__), "torchao": _minor(import_torchao().__version__)}


class StaticOutput:
    """What the scoring code reads from a forward pass: ``.logits``."""

    def __init__(self, logits: torch.Tensor) -> None:
        self.logits = logits


#: the forward inputs a scoring task may feed an encoder, in the exported order
INPUTS = ("input_ids", "attention_mask", "token_type_ids")


class _Logits(nn.Module):
    """The model as a function of its inputs to its logits (what gets exported)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        given = {"attention_mask": attention_mask, "token_type_ids": token_type_ids}
        extra = {k: v for k, v in given.items() if v is not None}
        return self.model(input_ids=input_ids, **extra).logits


class StaticInt8Model(nn.Module):
    """An exported, statically quantised graph that scores like the model it came from.

    Args:
        program: the ``torch.export.ExportedProgram`` of the converted graph.
        config: the ``transformers`` config of the model (labels, sizes).
        input_names: the forward inputs the graph takes, in order.
    """

    def __init__(self, program: Any, config: Any, input_names: list[str]) -> None:
        super().__init__()
        self.program = program
        self.config = config
        self.input_names = list(input_names)
        self.graph = program.module()
        self._compiled: Any = None
        self.training = False

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def can_generate(self) -> bool:
        return False

    def train(self, mode: bool = True) -> StaticInt8Model:
        """Only ``eval()``: the graph has no training mode (and the exported module
        refuses ``train``/``eval`` calls, so they do not go down to it)."""
        if mode:
            raise UserError(
                "compress: a static int8 model is for inference; recover or prune before "
                "the static quantize step (quantise last)"
            )
        self.training = False
        return self

    def forward(self, **batch: torch.Tensor) -> StaticOutput:
        missing = [name for name in self.input_names if name not in batch]
        if missing:
            raise ValueError(f"static int8 model: missing inputs {missing}")
        inputs = {name: batch[name] for name in self.input_names}
        import torch._inductor.config as inductor_config

        # freezing: weights become constants, so inductor prepacks the int8 weights
        with inductor_config.patch(freezing=True), torch.no_grad(), warnings.catch_warnings():
            # inductor's int8 lowering copies its zero points with torch.tensor(tensor)
            warnings.filterwarnings("ignore", "To copy construct from a tensor", UserWarning)
            if self._compiled is None:
                self._compiled = torch.compile(self.graph, dynamic=True)
            return StaticOutput(self._compiled(**inputs))

    def weight_stats(self) -> dict[str, int]:
        """``params`` (the weights computed with: int8 matrices and float tensors, scales
        and zero points left out), ``nonzero_params``, and ``prunable_params`` /
        ``prunable_nonzero`` (the int8 matrices: the quantised linear layers)."""
        sig = self.program.graph_signature
        lifted = {**sig.inputs_to_parameters, **sig.inputs_to_buffers}
        quant_args: set[str] = set()
        for node in self.program.graph.nodes:
            if node.op == "call_function" and "dequantize_per_channel" in str(node.target):
                for arg in node.args[1:3]:
                    if isinstance(arg, torch.fx.Node) and arg.name in lifted:
                        quant_args.add(lifted[arg.name])
        stats = dict.fromkeys(
            ("params", "nonzero_params", "prunable_params", "prunable_nonzero"), 0
        )
        for key, tensor in {**self.program.state_dict, **self.program.constants}.items():
            if key in quant_args or not isinstance(tensor, torch.Tensor):
                continue
            nonzero = int(torch.count_nonzero(tensor))
            if tensor.dtype == torch.int8 and tensor.dim() == 2:
                stats["prunable_params"] += tensor.numel()
                stats["prunable_nonzero"] += nonzero
            elif not tensor.is_floating_point():
                continue
            stats["params"] += tensor.numel()
            stats["nonzero_params"] += nonzero
        return stats


def _dynamic_shapes(names: list[str], max_length: int) -> dict[str, dict[int, Any] | None]:
    from torch.export import Dim

    batch = Dim("batch", min=1, max=1 << 16)
    length = Dim("length", min=2, max=max(max_length, 3))
    return {name: {0: batch, 1: length} for name in names}


def _export(module: nn.Module, example: dict[str, torch.Tensor], max_length: int) -> Any:
    names = list(example)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.export.export(
                module, (), example, dynamic_shapes=_dynamic_shapes(names, max_length), strict=False
            )
    except Exception as error:  # torch.export raises many types; the cause is in the text
        first = first_line(error)
        raise UserError(
            f"compress: static int8 needs a model torch.export can trace with a dynamic batch "
            f"and length; this one ({type(module).__name__}) failed: {first[:300]}. Use "
            f"method: dynamic instead"
        ) from error


def _example(batches: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Two rows of the first calibration batch (a batch of one would fix the batch size
    at 1 in the export)."""
    first = batches[0]
    unknown = sorted(set(first) - set(INPUTS))
    if unknown or "input_ids" not in first:
        raise UserError(
            f"compress: static int8 exports encoders fed {', '.join(INPUTS)}; this task's "
            f"batches also hold {unknown or 'no input_ids'}"
        )
    if any(t.dim() != 2 for t in first.values()):
        shapes = {k: tuple(t.shape) for k, t in first.items()}
        raise UserError(
            f"compress: static int8 exports models whose inputs are (batch, length); got {shapes}"
        )
    rows = {k: first[k][:2] for k in INPUTS if k in first}
    if next(iter(rows.values())).shape[0] < 2:
        rows = {k: torch.cat([t, t]) for k, t in rows.items()}
    return rows


def _drop_unused_tensors(graph: torch.fx.GraphModule) -> None:
    """Delete the float weights the converted graph no longer reads (the quantised
    layers' originals), so that neither memory nor the saved file keeps them."""
    used = {node.target for node in graph.graph.nodes if node.op == "get_attr"}
    for name, _ in [*graph.named_parameters(), *graph.named_buffers()]:
        if name in used:
            continue
        owner_name, _, leaf = name.rpartition(".")
        owner = graph.get_submodule(owner_name) if owner_name else graph
        if leaf in owner._parameters:
            del owner._parameters[leaf]
        elif leaf in owner._buffers:
            del owner._buffers[leaf]


@torch.no_grad()
def static_int8(
    model: nn.Module,
    linears: dict[str, nn.Module],
    batches: list[dict[str, torch.Tensor]],
) -> StaticInt8Model:
    """The statically quantised graph of ``model`` (in eval mode): ``linears`` (names in
    ``model``) get int8 weights and inputs, activation ranges observed on ``batches``
    (the forward inputs the task feeds the model).

    Raises:
        UserError: if torchao is missing or the model cannot be exported.
    """
    from scilm_hpc.compress.torchao_quant import import_torchao

    import_torchao()
    import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as x86
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    for name, linear in linears.items():
        if type(linear) is not nn.Linear:
            raise UserError(
                f"compress: static int8 quantises plain linear layers; '{name}' is "
                f"{type(linear).__name__} (fold masks and quantise once, last)"
            )
    model.eval()
    example = _example(batches)
    max_length = int(getattr(model.config, "max_position_embeddings", 512) or 512)
    program = _export(_Logits(model), example, max_length)
    quantizer = x86.X86InductorQuantizer()
    config = x86.get_default_x86_inductor_quantization_config(is_dynamic=False)
    for name in linears:
        quantizer.set_module_name_qconfig(f"model.{name}", config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph = prepare_pt2e(program.module(), quantizer)
        for batch in batches:
            graph(**{k: batch[k] for k in example})
        graph = convert_pt2e(graph)
    _drop_unused_tensors(graph)
    converted = _export(graph, example, max_length)
    return StaticInt8Model(converted, model.config, list(example))


def save_program(model: StaticInt8Model, path: Any) -> None:
    """Write the graph (``torch.export.save``)."""
    torch.export.save(model.program, str(path))


def load_program(path: Any, config: Any, input_names: list[str], saved: dict[str, str]) -> Any:
    """Read a graph written by ``save_program`` with the versions ``saved``.

    Raises:
        UserError: if torch or torchao is another minor version than it was written with.
    """
    now = versions()
    if saved != now:
        raise UserError(
            f"'{path}': a static int8 graph written with {saved} cannot be read with {now} "
            f"(torch.export's format and torchao's quantised operators change between "
            f"minor versions); install those versions, or compress again"
        )
    import torchao.quantization.pt2e  # noqa: F401 (registers the quantized_decomposed ops)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.export.load(str(path))
    return StaticInt8Model(program, config, input_names)
