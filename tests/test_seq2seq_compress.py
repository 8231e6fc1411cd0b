"""Compression of generation models (seq2seq): magnitude pruning, distillation recovery
on the target tokens and dynamic int8 on a decoder-only and on an encoder-decoder (both
stacks), with ROUGE in the report; the steps an encoder-decoder cannot take yet are
refused before any work."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from scilm_hpc.schema import DataConfig, EvalConfig

from .conftest import REPO, scilm_run
from .test_seq2seq import (  # noqa: F401  (fixtures)
    prepare_corpus,
    tiny_bert_encoder_dir,
    tiny_llama_dir,
)

COMPRESS = str(REPO / "jobs" / "compress.yaml")
ROUGE = ("rouge1", "rouge2", "rougeL", "rougeLsum", "gen_length")


@pytest.fixture(scope="module")
def tiny_encoder_decoder_dir(tmp_path_factory, tiny_bert_encoder_dir):  # noqa: F811
    """An exported warm-started encoder-decoder (two tiny BERTs)."""
    from scilm_hpc.model_source import load_tokenizer
    from scilm_hpc.tasks.seq2seq import ENCODER_DECODER, Seq2Seq
    from scilm_hpc.train.export import write_export

    out = tmp_path_factory.mktemp("tiny-enc-dec")
    task = Seq2Seq(DataConfig(max_target_length=16), ENCODER_DECODER)
    torch.manual_seed(0)
    source = str(tiny_bert_encoder_dir)
    model = task.load_pretrained(source, None, [], decoder=source)
    write_export(model, load_tokenizer(source), out)
    return out


def compress(run: Path, shards: Path, model: Path, *extra: str):
    return scilm_run(
        "compress",
        COMPRESS,
        f"run.dir={run}",
        f"data.shards={shards}",
        f"model.name_or_path={model}",
        "task=seq2seq",
        "cluster=none",
        "train.micro_batch_size=4",
        "compress.latency_repeats=2",
        "eval.batch_size=4",
        "eval.max_new_tokens=6",
        *extra,
        timeout=600,
    )


@pytest.mark.integration
@pytest.mark.timeout(900)
@pytest.mark.parametrize("kind", ["decoder-only", "encoder-decoder"])
def test_prune_recover_int8_of_a_generation_model(
    tmp_path,
    kind,
    tiny_llama_dir,  # noqa: F811
    tiny_encoder_decoder_dir,
):
    from scilm_hpc.compress.targets import prunable_linears
    from scilm_hpc.data.dataset import ShardDataset
    from scilm_hpc.evaluate.generation import generation_metrics
    from scilm_hpc.models import load_for_eval, pad_token_id
    from scilm_hpc.tasks import get_task

    model = tiny_llama_dir if kind == "decoder-only" else tiny_encoder_decoder_dir
    shards = prepare_corpus(tmp_path / "data", model)
    done = compress(
        tmp_path / "run",
        shards,
        model,
        "compress=prune50-recover",
        "compress.steps.0.method=magnitude",
        "compress.steps.1.steps=2",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "run" / "compress_report.json").read_text())
    base, (pruned, recovered, quantized) = report["baseline"], report["steps"]
    for entry in (base, pruned, recovered, quantized):
        assert all(key in entry["metrics"] for key in ROUGE)
        assert entry["metrics"]["generated_examples"] == 6  # the whole dev split
    assert pruned["sparsity"] == pytest.approx(0.5, abs=0.01)
    assert quantized["sparsity"] == pytest.approx(0.5, abs=0.01)  # int8 keeps the zeros
    dev = ShardDataset(shards, "dev")
    task = get_task("seq2seq")
    _, dense = load_for_eval(str(model), task, dev)
    if kind == "encoder-decoder":  # both stacks, cross-attention included
        names = list(prunable_linears(dense))
        assert any(n.startswith("encoder.") for n in names)
        assert any(n.startswith("decoder.") and "crossattention" in n for n in names)
    assert pruned["modules_changed"] == len(prunable_linears(dense))
    # the compressed directory generates what the report says
    tokenizer, compressed = load_for_eval(str(tmp_path / "run" / "compressed"), task, dev)
    options = EvalConfig(batch_size=4, max_new_tokens=6)
    again = generation_metrics(
        compressed, tokenizer, dev, task, pad_token_id(tokenizer), options, None
    )
    assert again is not None
    assert {k: again[k] for k in ROUGE} == pytest.approx(
        {k: quantized["metrics"][k] for k in ROUGE}
    )
    assert (tmp_path / "run" / "compressed" / "generation_config.json").is_file()


def test_encoder_decoder_refuses_wanda_and_structured(
    tiny_encoder_decoder_dir,
    tiny_llama_dir,  # noqa: F811
):
    """The compress job's check before any work (``_Compression`` runs it right after
    loading the model): Wanda and structured steps on an encoder-decoder are refused,
    magnitude steps pass, and a decoder-only model takes Wanda."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    from scilm_hpc.config import load_and_validate
    from scilm_hpc.errors import UserError
    from scilm_hpc.jobs.compress import _check_encoder_decoder_steps

    def steps(*overrides: str):
        base = ["task=seq2seq", "run.dir=/tmp/unused", *overrides]
        return load_and_validate(COMPRESS, base, job="compress").compress.steps

    enc_dec = AutoModelForSeq2SeqLM.from_pretrained(tiny_encoder_decoder_dir)
    for recipe, expected in (
        ("prune50-recover", "steps.0.method: Wanda pruning of an encoder-decoder"),
        ("structured30", r"steps.0.pattern: structured pruning \(ffn\) of an encoder-decoder"),
    ):
        with pytest.raises(UserError, match=expected):
            _check_encoder_decoder_steps(enc_dec, steps(f"compress={recipe}"))
    magnitude = steps("compress=prune50-recover", "compress.steps.0.method=magnitude")
    _check_encoder_decoder_steps(enc_dec, magnitude)
    llama = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    _check_encoder_decoder_steps(llama, steps("compress=prune50-recover"))
