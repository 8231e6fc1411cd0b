"""LoRA through peft: what trains, the merged export, the adapter alone, bad targets;
and real 2-rank DeepSpeed runs at ZeRO-2 and ZeRO-3 (kill-and-resume bit-exact)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from benchmarks._common import TINY_LLAMA, random_llama
from scilm_hpc.errors import UserError
from scilm_hpc.rundir import latest_tag
from scilm_hpc.schema import LoraConfig
from scilm_hpc.train.lora import apply_lora, linear_module_names, write_lora_export

from .conftest import REPO, scilm_run

PREPARE = str(REPO / "jobs" / "prepare.yaml")
FINETUNE = str(REPO / "jobs" / "finetune.yaml")


def tiny_llama() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)


def tiny_bert_classifier() -> torch.nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=3,
    )
    return BertForSequenceClassification(config)


def lora_b_nonzero(model: torch.nn.Module) -> None:
    """Fill every B (zero at initialisation) so a merge changes the weights."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)


def test_only_adapters_train_with_peft_defaults_for_llama():
    model = apply_lora(tiny_llama(), LoraConfig(r=4, alpha=8), "causal_lm")
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    targets = {n.split(".lora_")[0].rpartition(".")[2] for n in trainable}
    assert targets == {"q_proj", "v_proj"}  # peft's default for Llama


def test_classification_head_trains_whole_beside_the_adapters():
    model = apply_lora(
        tiny_bert_classifier(),
        LoraConfig(r=2, target_modules=["query", "key", "value"]),
        "classification",
    )
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    heads = [n for n in trainable if "lora_" not in n]
    assert heads and all("classifier.modules_to_save" in n for n in heads)
    assert {n.split(".lora_")[0].rpartition(".")[2] for n in trainable if "lora_" in n} == {
        "query",
        "key",
        "value",
    }


def test_a_target_module_that_does_not_exist_lists_the_linear_modules():
    with pytest.raises(UserError) as info:
        apply_lora(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "qkv"]), "causal_lm")
    message = str(info.value)
    assert message.startswith("model.lora.target_modules: qkv not in the model (llama)")
    for name in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        assert name in message


def test_a_model_type_peft_has_no_default_for_asks_for_target_modules():
    from transformers import MPNetConfig, MPNetForSequenceClassification

    model = MPNetForSequenceClassification(
        MPNetConfig(
            vocab_size=64,
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
        )
    )
    with pytest.raises(UserError) as info:
        apply_lora(model, LoraConfig(r=4), "classification")
    assert "peft cannot wrap model type 'mpnet'" in str(info.value)
    assert "set model.lora.target_modules" in str(info.value)
    assert set(linear_module_names(model)) >= {"q", "k", "v", "o"}


def test_merged_export_is_base_plus_scaled_ba_and_loads_without_peft(tmp_path, minilm_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = tiny_llama()
    initial = {k: v.clone() for k, v in base.state_dict().items()}
    model = apply_lora(base, LoraConfig(r=4, alpha=8), "causal_lm")
    lora_b_nonzero(model)
    write_lora_export(model, AutoTokenizer.from_pretrained(minilm_path), tmp_path / "export")

    adapter = load_file(tmp_path / "export" / "adapter" / "adapter_model.safetensors")
    assert (
        json.loads((tmp_path / "export" / "adapter" / "adapter_config.json").read_text())["r"] == 4
    )
    merged = load_file(tmp_path / "export" / "model.safetensors")
    assert not any("lora" in k or "base_layer" in k for k in merged)
    assert_merged_is_base_plus_ba(merged, initial, adapter, scale=8 / 4)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "export")
    assert type(loaded).__name__ == "LlamaForCausalLM"
    assert not hasattr(loaded, "peft_config")


def assert_merged_is_base_plus_ba(
    merged: dict[str, torch.Tensor],
    initial: dict[str, torch.Tensor],
    adapter: dict[str, torch.Tensor],
    scale: float,
) -> None:
    """Every adapted weight is W0 + B @ A * scale; every other weight is W0."""
    a_keys = [k for k in adapter if "lora_A" in k]
    assert a_keys and all(adapter[k].numel() > 0 for k in adapter)  # never an empty adapter
    adapted = set()
    for a_key in a_keys:
        b = adapter[a_key.replace("lora_A", "lora_B")]
        assert b.abs().sum() > 0, a_key
        # base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight -> model.layers...
        weight = a_key.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight")
        expected = initial[weight] + b @ adapter[a_key] * scale
        torch.testing.assert_close(merged[weight], expected, rtol=1e-5, atol=1e-6, msg=weight)
        adapted.add(weight)
    for key, tensor in merged.items():
        if key not in adapted:
            assert torch.equal(tensor, initial[key]), key


# --- real runs: 2 CPU ranks, ZeRO-2 and ZeRO-3 -------------------------------------------


@pytest.fixture(scope="module")
def lm_model_and_shards(tmp_path_factory: pytest.TempPathFactory):
    """A tiny Llama with MiniLM's tokenizer and packed shards of a small text corpus."""
    root = tmp_path_factory.mktemp("lora-lm")
    random_llama(root / "model", TINY_LLAMA, max_positions=128)
    words = "protein binding assay cells expression gene tumor growth inhibitor receptor".split()
    text = "\n".join(
        " ".join(words[(i * 3 + j) % len(words)] for j in range(4 + i % 9)) + "."
        for i in range(200)
    )
    (root / "train.txt").write_text(text + "\n", encoding="utf-8")
    done = scilm_run(
        "prepare",
        PREPARE,
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


def lora_finetune(
    run_dir: Path, model: Path, shards: Path, stage: int, fault: str | None = None, *extra: str
):
    return scilm_run(
        "finetune",
        FINETUNE,
        f"run.dir={run_dir}",
        f"data.shards={shards}",
        f"model.name_or_path={model}",
        "task=causal_lm",
        "cluster=local",
        "cluster.tasks_per_node=2",
        f"zero.stage={stage}",
        "model.lora.r=4",
        "model.lora.alpha=8",
        "model.lora.target_modules=[q_proj,k_proj,v_proj,o_proj]",
        "train.micro_batch_size=2",
        "train.max_steps=4",
        "train.checkpoint_every=2",
        "train.lr=1e-2",
        "train.log_every=1",
        "train.seed=7",
        *extra,
        fault=fault,
    )


def losses(run_dir: Path) -> list[tuple[int, float]]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


@pytest.mark.integration
@pytest.mark.timeout(900)
@pytest.mark.parametrize(
    ("stage", "offload"), [(2, True), (3, False)], ids=["zero2-offload", "zero3"]
)
def test_lora_run_resumes_bit_exactly_and_exports_merged(
    tmp_path, lm_model_and_shards, stage, offload
):
    """ZeRO-2 with the optimizer offloaded to DeepSpeed's CPU Adam (its step counter
    realigned on resume; without offload ZeRO-2 runs torch's AdamW as ZeRO-3 does here),
    ZeRO-3 without."""
    from transformers import AutoModelForCausalLM

    model, shards = lm_model_and_shards
    extra = [f"zero.offload_optimizer={str(offload).lower()}"]
    straight = lora_finetune(tmp_path / "straight", model, shards, stage, None, *extra)
    assert straight.returncode == 0, straight.stderr[-3000:]
    killed = lora_finetune(
        tmp_path / "killed", model, shards, stage, "kill_after_checkpoint:2", *extra
    )
    assert killed.returncode != 0 and latest_tag(tmp_path / "killed") == "step_2"
    resumed = scilm_run("resume", str(tmp_path / "killed"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    reference = losses(tmp_path / "straight")
    assert [s for s, _ in reference] == [1, 2, 3, 4]
    assert losses(tmp_path / "killed") == reference  # bit for bit
    for run in ("straight", "killed"):
        assert (tmp_path / run / "export" / "adapter" / "adapter_model.safetensors").is_file()
    merged = load_file(tmp_path / "straight" / "export" / "model.safetensors")
    adapter = load_file(tmp_path / "straight" / "export" / "adapter" / "adapter_model.safetensors")
    for name, tensor in load_file(tmp_path / "killed" / "export" / "model.safetensors").items():
        assert torch.equal(tensor, merged[name]), name
    # only the adapters changed: the merged export is the untouched base + B @ A * alpha / r
    initial = load_file(model / "model.safetensors")
    assert merged.keys() == initial.keys()
    assert_merged_is_base_plus_ba(merged, initial, adapter, scale=8 / 4)
    assert {k.split(".lora_")[0].rpartition(".")[2] for k in adapter} == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
    }
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "straight" / "export")
    assert type(loaded).__name__ == "LlamaForCausalLM"
    logs = "".join(p.read_text() for p in (tmp_path / "straight" / "submitit").glob("*_log.out"))
    assert "LoRA: " in logs and " parameters train" in logs


def test_bad_lora_settings_are_refused_with_their_keys():
    from scilm_hpc.config import load_and_validate
    from scilm_hpc.errors import ConfigError

    with pytest.raises(ConfigError) as info:
        load_and_validate(
            None,
            [
                "run.dir=/tmp/unused",
                "model.lora.r=4",
                "model.lora.alpha=0",
                "model.lora.dropout=1.5",
                "model.lora.target_modules=[]",
            ],
            "finetune",
        )
    problems = info.value.problems
    assert [p.split(":")[0] for p in problems] == [
        "model.lora.alpha",
        "model.lora.dropout",
        "model.lora.target_modules",
    ]
    with pytest.raises(ConfigError, match="model.lora.r: got -1; must be >= 0"):
        load_and_validate(None, ["run.dir=/tmp/unused", "model.lora.r=-1"], "finetune")


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_lora_classifier_trains_its_head_and_exports_from_a_checkpoint(
    tmp_path, shards, tiny_model_dir
):
    """One rank, ZeRO-0: the head trains whole beside the adapters, the merged export keeps
    the label map, and ``scilm export`` from the checkpoint writes the same model."""
    from transformers import AutoModelForSequenceClassification

    run = tmp_path / "run"
    done = scilm_run(
        "finetune",
        FINETUNE,
        f"run.dir={run}",
        f"data.shards={shards}",
        f"model.name_or_path={tiny_model_dir}",
        "cluster=none",
        "zero.stage=0",
        "model.lora.r=2",
        "train.micro_batch_size=4",
        "train.max_steps=3",
        "train.lr=1e-2",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    merged = load_file(run / "export" / "model.safetensors")
    adapter = load_file(run / "export" / "adapter" / "adapter_model.safetensors")
    initial = load_file(tiny_model_dir / "model.safetensors")
    assert any("classifier" in k for k in adapter)  # the head is saved with the adapter
    assert not torch.equal(merged["classifier.weight"], initial["classifier.weight"])
    head = {k for k in merged if k.startswith("classifier.")}
    assert_merged_is_base_plus_ba(
        {k: v for k, v in merged.items() if k not in head},
        initial,
        {k: v for k, v in adapter.items() if "lora_" in k},
        scale=16 / 2,
    )
    model = AutoModelForSequenceClassification.from_pretrained(run / "export")
    assert model.config.id2label == {0: "background", 1: "method", 2: "result"}

    again = scilm_run("export", str(run))
    assert again.returncode == 0, again.stderr[-3000:]
    for key, tensor in load_file(run / "export" / "model.safetensors").items():
        torch.testing.assert_close(tensor, merged[key], rtol=0, atol=1e-6, msg=key)


@pytest.mark.integration
@pytest.mark.timeout(900)
def test_lora_run_resumes_on_another_world_size(tmp_path, lm_model_and_shards):
    """2 ranks -> 1 rank at ZeRO-2: the wrapped model's consolidated weights (frozen base
    included) load into a fresh wrapped model."""
    model, shards = lm_model_and_shards
    run = tmp_path / "run"
    killed = lora_finetune(run, model, shards, 2, fault="kill_after_checkpoint:2")
    assert killed.returncode != 0 and latest_tag(run) == "step_2"
    resumed = scilm_run("resume", str(run), "cluster.tasks_per_node=1")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    logs = "".join(p.read_text() for p in (run / "submitit").glob("*_log.err"))
    assert "saved on 2 rank(s) on 1" in logs
    assert [s for s, _ in losses(run)] == [1, 2, 3, 4]
    adapter = load_file(run / "export" / "adapter" / "adapter_model.safetensors")
    initial = load_file(model / "model.safetensors")
    merged = load_file(run / "export" / "model.safetensors")
    assert_merged_is_base_plus_ba(merged, initial, adapter, scale=8 / 4)
