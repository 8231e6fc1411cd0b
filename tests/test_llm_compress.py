"""Compression of causal LMs: calibration on packed shards, perplexity in the report."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from scilm_hpc.compress.calibration import input_norms
from scilm_hpc.compress.targets import prunable_linears
from scilm_hpc.tasks import get_task

TASK = get_task("causal_lm")


def _llama(attn: str) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=61,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        attn_implementation=attn,
    )
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_calibration_on_a_packed_block_equals_the_documents_alone(attn: str) -> None:
    """Wanda's input norms from one packed block (two documents, then padding beside a
    shorter block) equal those of the documents run alone: the calibration forward takes
    the block-diagonal mask, so the second document does not attend to the first."""
    model = _llama(attn)
    rng = np.random.default_rng(0)
    first, second, third = (rng.integers(3, 61, n).astype(np.int32) for n in (9, 6, 4))
    packed = TASK.collate(
        [
            {
                "input_ids": np.concatenate([first, second]),
                "position_ids": np.concatenate([np.arange(9), np.arange(6)]).astype(np.int32),
            },
            {"input_ids": third, "position_ids": np.arange(4, dtype=np.int32)},
        ],
        pad_id=0,
    )
    alone = [TASK.collate([{"input_ids": doc}], pad_id=0) for doc in (first, second, third)]
    linears = prunable_linears(model)
    from_block = input_norms(model, linears, [packed], "causal_lm")
    parts = [input_norms(model, linears, [batch], "causal_lm") for batch in alone]
    for name, norm in from_block.items():
        expected = torch.stack([p[name].double() ** 2 for p in parts]).sum(0).sqrt()
        torch.testing.assert_close(norm.double(), expected, rtol=1e-4, atol=1e-6)
