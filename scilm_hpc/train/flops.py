"""Model FLOPs of a training step, and the model FLOPs utilisation (MFU) it reaches.

The count is the analytic one of the PaLM paper's appendix B (what MFU is defined
with), taken from the model's shapes once, before training:

- every matrix multiply by a weight (each ``nn.Linear`` / transformers ``Conv1D``,
  a language-model head included, embedding lookups not): 2 FLOPs per weight and
  token forward, 2 for the input gradient, and 2 more for the weight gradient when
  the weight trains: ``6 N`` per token for full fine-tuning, ``4 N`` plus ``6`` per
  adapter weight with LoRA. A sequence classifier's pooler and classifier (BERT's
  ``pooler``, ``classifier``, ``pre_classifier``) run once per sequence, not per token;
- attention scores and their weighted sum: ``12 x layers x width x length`` per
  token of a sequence of ``length`` real tokens (forward 4, backward 8), i.e.
  ``12 x layers x width x sum(length^2)`` per step.

Why a formula rather than torch's ``FlopCounterMode`` on the first batch: MFU counts
the FLOPs the model needs, not what the implementation runs (activation
checkpointing recomputes the forward; padding and masked-out blocks of a packed
row run but are not the model's work), it costs nothing at run time, works the same
under every ZeRO stage, and the tests check it against ``FlopCounterMode`` on a tiny
BERT and a tiny Llama (equal lengths, no padding, eager attention).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

_SEQUENCE_HEADS = {"pooler", "classifier", "pre_classifier"}


def _numel(param: torch.Tensor) -> int:
    return int(getattr(param, "ds_numel", param.numel()))  # ZeRO-3 partitions hold 0


@dataclass(frozen=True)
class ModelFlops:
    """The shapes the FLOPs count needs: weights in matrix multiplies (all, and those
    that train), attention layers and their width (heads x head size)."""

    matmul_weights: int
    trainable_matmul_weights: int
    layers: int
    attention_width: int
    # of those, the weights (all, trainable) that run once per sequence
    sequence_weights: tuple[int, int] = (0, 0)

    @classmethod
    def of(cls, model: torch.nn.Module) -> ModelFlops:
        """The counts of ``model`` (a transformers model, peft-wrapped or not)."""
        unwrap = getattr(model, "get_base_model", None)  # peft
        base = unwrap() if callable(unwrap) else model
        pooled = type(base).__name__.endswith("ForSequenceClassification")
        total = trainable = per_sequence = per_sequence_trainable = 0
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D":
                weight = module.weight
                assert isinstance(weight, torch.Tensor)
                n, grad = _numel(weight), weight.requires_grad
                total += n
                trainable += n if grad else 0
                if pooled and _SEQUENCE_HEADS.intersection(name.split(".")):
                    per_sequence += n
                    per_sequence_trainable += n if grad else 0
        config = getattr(model, "config", None)
        layers = width = 0
        if config is not None:
            text = config.get_text_config() if hasattr(config, "get_text_config") else config
            layers = int(_first(text, "num_hidden_layers", "n_layer", "num_layers") or 0)
            width = int(_first(text, "hidden_size", "n_embd", "d_model") or 0)
            heads, head_dim = _first(text, "num_attention_heads"), _first(text, "head_dim")
            if heads and head_dim:
                width = int(heads) * int(head_dim)
            if getattr(text, "is_encoder_decoder", False):
                layers += int(_first(text, "decoder_layers", "num_decoder_layers") or 0)
        return cls(total, trainable, layers, width, (per_sequence, per_sequence_trainable))

    def step_flops(self, tokens: float, squared_lengths: float, sequences: float) -> float:
        """Model FLOPs of a training step over ``sequences`` sequences of ``tokens`` real
        tokens in all, whose lengths squared add up to ``squared_lengths``."""
        seq_all, seq_trained = self.sequence_weights
        per_token = 4 * (self.matmul_weights - seq_all) + 2 * (
            self.trainable_matmul_weights - seq_trained
        )
        weights = per_token * tokens + (4 * seq_all + 2 * seq_trained) * sequences
        return weights + 12 * self.layers * self.attention_width * squared_lengths


def _first(config: Any, *names: str) -> Any:
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return None


def throughput_row(
    flops: ModelFlops,
    tokens: float,
    squared_lengths: float,
    sequences: float,
    seconds: float,
    ranks: int,
    peak_tflops: float | None,
) -> dict[str, float]:
    """The FLOPs keys of a ``metrics.jsonl`` row for one step: ``model_flops_per_token``,
    ``model_tflops`` (per second, all ranks together) and, with a peak per rank
    (``train.peak_tflops``), ``mfu``."""
    step = flops.step_flops(tokens, squared_lengths, sequences)
    achieved = step / seconds / 1e12
    row = {"model_flops_per_token": step / max(tokens, 1.0), "model_tflops": achieved}
    if peak_tflops:
        row["mfu"] = achieved / (peak_tflops * ranks)
    return row
