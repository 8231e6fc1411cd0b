"""Compression of causal LMs: calibration on packed shards, perplexity in the report."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from scilm_hpc.compress.calibration import input_norms
from scilm_hpc.compress.targets import prunable_linears
from scilm_hpc.tasks import get_task

from .conftest import REPO, scilm_run

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


# one recipe per code path a causal LM takes (each run is a DeepSpeed process of its own,
# so all seven would cost CI minutes): unstructured pruning with calibration and
# recovery, structured pruning, both quantisations; benchmarks/compress_llm.py runs them all
RECIPES = ["int4-weight", "int8-dynamic", "prune50-recover", "structured30"]
assert all((REPO / f"configs/compress/{r}.yaml").is_file() for r in RECIPES)


@pytest.fixture(scope="module")
def llama_shards(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny Llama (MiniLM's tokenizer) and packed causal-LM shards of 80 short documents,
    a fifth of them held out as the test split."""
    from benchmarks._common import TINY_LLAMA, random_llama

    root = tmp_path_factory.mktemp("llm-compress")
    model = random_llama(root / "llama", TINY_LLAMA, 64)
    rng = np.random.default_rng(0)
    words = [f"word{i}" for i in range(40)]
    corpus = root / "train.txt"
    corpus.write_text("".join(" ".join(rng.choice(words, 12)) + "\n" for _ in range(80)))
    done = scilm_run(
        "prepare",
        str(REPO / "jobs/prepare.yaml"),
        "cluster=none",
        f"run.dir={root}",
        "task=causal_lm",
        "data.format=text",
        f"data.train={corpus}",
        "data.split.test_ratio=0.2",
        "data.max_length=32",
        f"model.name_or_path={model}",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return model, root / "shards"


@pytest.mark.integration
@pytest.mark.timeout(900)
@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_runs_on_a_causal_lm_with_perplexity(tmp_path, llama_shards, recipe):
    """Each shipped recipe compresses a tiny Llama on packed shards (recovery cut to one
    step, three for a gradual schedule; int4 groups to the model's width): the report
    gives held-out perplexity for the dense model and after every step, and pruning
    steps reach their sparsity."""
    model, shards = llama_shards
    steps = yaml.safe_load((REPO / f"configs/compress/{recipe}.yaml").read_text())["steps"]
    overrides = []
    gradual = any(s.get("schedule") == "gradual" for s in steps)
    for i, step in enumerate(steps):
        if step["kind"] == "recover":  # a gradual schedule reaches its sparsity at step 2 of 3
            overrides.append(f"compress.steps.{i}.steps={3 if gradual else 1}")
        if step.get("group_size"):
            overrides.append(f"compress.steps.{i}.group_size=32")
        if step.get("calibration_batches"):
            overrides.append(f"compress.steps.{i}.calibration_batches=2")
    done = scilm_run(  # a process of its own: DeepSpeed (recovery) initialises once a process
        "compress",
        str(REPO / "jobs/compress.yaml"),
        "cluster=none",
        "task=causal_lm",
        f"compress={recipe}",
        "compress.eval_split=test",
        "compress.latency_repeats=1",
        "compress.latency_batch=2",
        "train.micro_batch_size=4",
        f"data.shards={shards}",
        f"model.name_or_path={model}",
        f"run.dir={tmp_path}",
        *overrides,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "compress_report.json").read_text())
    dense = report["baseline"]["metrics"]["perplexity"]
    assert math.isfinite(dense) and dense > 1
    assert len(report["steps"]) == sum(s.get("schedule") != "gradual" for s in steps)
    for step in report["steps"]:
        assert math.isfinite(step["metrics"]["perplexity"]) and step["metrics"]["perplexity"] > 1
    for step in steps:  # FFN rows removed are part of the prunable weights only
        if step["kind"] == "prune":
            least = 0.1 if step["pattern"] == "ffn" else 0.45
            assert report["steps"][-1]["sparsity"] >= least, step
    assert "| perplexity |" in (tmp_path / "compress_report.md").read_text()
