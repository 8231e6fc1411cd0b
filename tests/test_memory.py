"""Activation checkpointing gives the gradients of the plain forward; peak memory is logged."""

from __future__ import annotations

import json

import pytest
import torch

from scilm_hpc.errors import UserError
from scilm_hpc.schema import LoraConfig
from scilm_hpc.tasks import get_task
from scilm_hpc.train.lora import apply_lora
from scilm_hpc.train.memory import enable_gradient_checkpointing, peak_memory

from .conftest import REPO, scilm_run
from .test_lora import tiny_bert_classifier, tiny_llama
from .test_packing import documents, packed_batch


def gradients(model: torch.nn.Module, inputs: dict) -> dict[str, torch.Tensor]:
    model.train()
    model.zero_grad()
    torch.manual_seed(3)  # the same dropout masks in both runs
    model(**inputs).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same_gradients(make_model, inputs: dict) -> None:
    plain = gradients(make_model(), inputs)
    model = make_model()
    enable_gradient_checkpointing(model)
    layers = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False)]
    assert layers, "no layer checkpoints its activations"
    checkpointed = gradients(model, inputs)
    assert plain.keys() == checkpointed.keys() and plain
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_checkpointing_keeps_the_gradients_of_a_packed_causal_lm():
    batch = packed_batch(documents([9, 14, 9, 20], vocab=64), 32)
    assert_same_gradients(tiny_llama, get_task("causal_lm").model_inputs(batch, tiny_llama()))


def test_checkpointing_keeps_the_gradients_of_lora_adapters():
    batch = packed_batch(documents([9, 14, 9, 20], vocab=64), 32)
    inputs = get_task("causal_lm").model_inputs(batch, tiny_llama())
    assert_same_gradients(lambda: apply_lora(tiny_llama(), LoraConfig(r=4), "causal_lm"), inputs)


def test_checkpointing_keeps_the_gradients_of_a_classifier_with_dropout():
    inputs = {
        "input_ids": torch.randint(5, 64, (3, 12), generator=torch.Generator().manual_seed(0)),
        "attention_mask": torch.ones(3, 12, dtype=torch.long),
        "labels": torch.tensor([0, 2, 1]),
    }
    assert_same_gradients(tiny_bert_classifier, inputs)


def test_a_model_without_checkpointing_is_refused():
    with pytest.raises(UserError, match="train.gradient_checkpointing: model type 'Linear'"):
        enable_gradient_checkpointing(torch.nn.Linear(2, 2))


def test_peak_memory_is_the_resident_set_in_mib():
    memory = peak_memory(on_gpu=False)
    assert set(memory) == {"peak_rss_mb"} and 10 < memory["peak_rss_mb"] < 1 << 20


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_finetune_with_checkpointing_logs_the_same_losses_and_peak_memory(tmp_path, minilm_path):
    root = tmp_path
    model, shards = _lm(root, minilm_path)
    runs = {}
    for name, flag, peak in (("plain", "false", "null"), ("checkpointed", "true", "0.05")):
        done = scilm_run(
            "finetune",
            str(REPO / "jobs" / "finetune.yaml"),
            f"run.dir={root / name}",
            f"data.shards={shards}",
            f"model.name_or_path={model}",
            "task=causal_lm",
            "cluster=none",
            "zero.stage=0",
            "train.micro_batch_size=2",
            "train.max_steps=3",
            "train.log_every=1",
            f"train.gradient_checkpointing={flag}",
            f"train.peak_tflops={peak}",
        )
        assert done.returncode == 0, done.stderr[-3000:]
        rows = [json.loads(x) for x in (root / name / "metrics.jsonl").read_text().splitlines()]
        runs[name] = [r for r in rows if "loss" in r]
    assert [r["loss"] for r in runs["checkpointed"]] == pytest.approx(
        [r["loss"] for r in runs["plain"]], rel=1e-6
    )
    assert all(r["peak_rss_mb"] > 50 for r in runs["checkpointed"])
    # the step's raw counts and model FLOPs: the same model FLOPs with or without
    # recomputation (model FLOPs, not hardware FLOPs), MFU only against a given peak
    for plain, checkpointed in zip(runs["plain"], runs["checkpointed"], strict=True):
        for key in ("samples", "tokens", "model_flops_per_token"):
            assert plain[key] == checkpointed[key] > 0, key
        assert "mfu" not in plain
        for row in (plain, checkpointed):
            assert row["samples"] == 2 and row["step_s"] > 0
            assert row["model_tflops"] == pytest.approx(
                row["model_flops_per_token"] * row["tokens"] / row["step_s"] / 1e12
            )
        assert checkpointed["mfu"] == pytest.approx(checkpointed["model_tflops"] / 0.05)


def _lm(root, minilm_path):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    torch.manual_seed(0)
    LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            max_position_embeddings=64,
            tie_word_embeddings=False,
        )
    ).save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    (root / "train.txt").write_text(
        "\n".join(f"protein {i} binds receptor {i % 7} in cells." for i in range(60)) + "\n",
        encoding="utf-8",
    )
    done = scilm_run(
        "prepare",
        str(REPO / "jobs" / "prepare.yaml"),
        "cluster=none",
        "task=causal_lm",
        "data.format=text",
        f"run.dir={root}",
        f"data.train={root / 'train.txt'}",
        f"model.name_or_path={root / 'model'}",
        "data.max_length=32",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return root / "model", root / "shards"
