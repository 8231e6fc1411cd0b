"""The model FLOPs formula (``train.flops``) against torch's FlopCounterMode, which
counts every matrix multiply one forward and backward run."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

from scilm_hpc.train.flops import ModelFlops, throughput_row

BATCH, LENGTH = 3, 48


def _counted(model: torch.nn.Module, **inputs: torch.Tensor) -> int:
    with FlopCounterMode(display=False) as counter:
        model(**inputs).loss.backward()
    return counter.get_total_flops()


def _bert() -> torch.nn.Module:
    config = BertConfig(
        vocab_size=500,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        num_labels=3,
        attn_implementation="eager",
    )
    return BertForSequenceClassification(config)


def _llama() -> torch.nn.Module:
    config = LlamaConfig(
        vocab_size=500,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=160,
        attn_implementation="eager",
    )
    return LlamaForCausalLM(config)


@pytest.mark.parametrize("build", [_bert, _llama], ids=["bert", "llama"])
@pytest.mark.parametrize("frozen", [False, True], ids=["full", "frozen-mlp"])
def test_formula_matches_flop_counter(build, frozen) -> None:
    """Within 1%: the formula leaves out only what FlopCounterMode cannot see either way
    (nothing here: no padding, eager attention); frozen MLP weights lose their weight
    gradient (4 instead of 6 FLOPs per weight and token)."""
    torch.manual_seed(0)
    model = build()
    if frozen:
        for name, param in model.named_parameters():
            if "mlp" in name or "intermediate" in name or ".output.dense" in name:
                param.requires_grad_(False)
    ids = torch.randint(5, 500, (BATCH, LENGTH))
    labels = ids if isinstance(model, LlamaForCausalLM) else torch.tensor([0, 1, 2])
    counted = _counted(model, input_ids=ids, labels=labels)
    formula = ModelFlops.of(model).step_flops(BATCH * LENGTH, BATCH * LENGTH**2, BATCH)
    assert formula == pytest.approx(counted, rel=0.01), (formula, counted)


def test_mfu_only_with_a_peak() -> None:
    flops = ModelFlops(
        matmul_weights=1000, trainable_matmul_weights=1000, layers=2, attention_width=8
    )
    step = 6 * 1000 * 100 + 12 * 2 * 8 * 2000
    row = throughput_row(flops, 100, 2000, 4, 0.5, 2, None)
    assert row == {"model_flops_per_token": step / 100, "model_tflops": step / 0.5 / 1e12}
    row = throughput_row(flops, 100, 2000, 4, 0.5, 2, peak_tflops=1e-6)
    assert row["mfu"] == pytest.approx(step / 0.5 / 1e12 / 2e-6)
