"""Compression of generation models (seq2seq): pruning (magnitude on a decoder-only;
Wanda FFN neurons then Wanda unstructured on an encoder-decoder, both stacks and
cross-attention), distillation recovery on the target tokens and dynamic int8, with
ROUGE in the report; Wanda's calibration of an encoder-decoder skips each layer's own
padding; attention heads of an encoder-decoder are refused before any work."""

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
    if kind == "decoder-only":
        recipe = [
            "compress=prune50-recover",
            "compress.steps.0.method=magnitude",
            "compress.steps.1.steps=2",
        ]
    else:  # Wanda FFN neurons of both stacks, then Wanda 50% of every linear layer
        recipe = [
            "compress=prune50-recover",
            "compress.steps=[{kind: prune, method: wanda, pattern: ffn, sparsity: 0.5,"
            " calibration_batches: 2}, {kind: prune, method: wanda, sparsity: 0.5,"
            " calibration_batches: 2}, {kind: recover, steps: 2, alpha: 0.5, temperature: 2.0},"
            " {kind: quantize, method: dynamic}]",
        ]
    done = compress(tmp_path / "run", shards, model, *recipe)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "run" / "compress_report.json").read_text())
    base, (*prunes, recovered, quantized) = report["baseline"], report["steps"]
    pruned = prunes[-1]
    for entry in (base, *prunes, recovered, quantized):
        assert all(key in entry["metrics"] for key in ROUGE)
        assert entry["metrics"]["generated_examples"] == 6  # the whole dev split
    dev = ShardDataset(shards, "dev")
    task = get_task("seq2seq")
    _, dense = load_for_eval(str(model), task, dev)
    assert pruned["modules_changed"] == len(prunable_linears(dense))
    if kind == "encoder-decoder":
        _wanda_pruned_both_stacks(tmp_path / "run" / "steps", len(prunable_linears(dense)))
        assert pruned["sparsity"] > 0.5  # 50% of the FFN-shrunk weights, FFN rows removed
    else:
        assert pruned["sparsity"] == pytest.approx(0.5, abs=0.01)
    assert quantized["sparsity"] == pytest.approx(pruned["sparsity"], abs=0.01)  # int8 keeps 0s
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


def _wanda_pruned_both_stacks(steps: Path, dense_layers: int) -> None:
    """Every linear layer of both stacks (cross-attention included) at 50% per output row
    after the Wanda step, the FFNs of both stacks at half width; recovery kept the zeros
    and changed the other weights."""
    from scilm_hpc.compress import load_compressed
    from scilm_hpc.compress.targets import prunable_linears

    ffn, pruned, recovered = (
        load_compressed(steps / name)
        for name in ("01-prune-wanda-ffn-50", "02-prune-wanda-50", "03-recover-2")
    )
    linears = prunable_linears(pruned)
    assert len(linears) == dense_layers
    for stack in ("encoder.", "decoder."):
        names = [n for n in linears if n.startswith(stack)]
        assert len(names) == {"encoder.": 12, "decoder.": 20}[stack]  # 6 / 10 per block
        widths = [
            m.weight.shape[0]
            for n, m in prunable_linears(ffn).items()
            if n.startswith(stack) and n.endswith("intermediate.dense")
        ]
        assert widths == [32, 32]  # 64 -> 32 neurons in each of the two blocks
    assert sum("crossattention" in n for n in linears) == 8
    after = prunable_linears(recovered)
    for name, linear in linears.items():
        zeros = linear.weight == 0
        assert (zeros.sum(1) == linear.in_features // 2).all(), name
        assert (after[name].weight[zeros] == 0).all(), name
    assert any(not torch.equal(after[n].weight, m.weight) for n, m in linears.items())


def test_input_norms_of_an_encoder_decoder_skip_each_layers_padding(tiny_encoder_decoder_dir):
    """Wanda's calibration over a padded seq2seq batch equals that over its examples one by
    one (no padding): the encoder and the cross-attention keys / values skip source
    padding, the decoder's other layers target padding. T5 and BART (built from config)
    too, whose FFNs structured pruning then halves in both stacks, and which still
    generate."""
    import numpy as np
    from transformers import (
        AutoModelForSeq2SeqLM,
        BartConfig,
        BartForConditionalGeneration,
        T5Config,
        T5ForConditionalGeneration,
    )

    from scilm_hpc.compress.calibration import input_norms
    from scilm_hpc.compress.structured import prune_structured
    from scilm_hpc.compress.targets import prunable_linears
    from scilm_hpc.tasks.seq2seq import Seq2Seq

    torch.manual_seed(0)
    small = {"vocab_size": 100, "d_model": 32, "decoder_start_token_id": 1}
    models = {
        "bert2bert": AutoModelForSeq2SeqLM.from_pretrained(tiny_encoder_decoder_dir),
        "t5": T5ForConditionalGeneration(
            T5Config(**small, d_ff=64, num_layers=2, num_heads=2, d_kv=16)
        ),
        "bart": BartForConditionalGeneration(
            BartConfig(
                **small,
                encoder_ffn_dim=64,
                decoder_ffn_dim=64,
                encoder_layers=2,
                decoder_layers=2,
                encoder_attention_heads=2,
                decoder_attention_heads=2,
            )
        ),
    }
    task = Seq2Seq()
    # the longer source has the shorter target: source and target padding differ
    items = [
        {"input_ids": np.arange(5, 22, dtype=np.int32), "source_length": 14},
        {"input_ids": np.arange(30, 40, dtype=np.int32), "source_length": 3},
    ]
    batch = task.collate(items, 0)
    for name, model in models.items():
        model.eval()
        linears = prunable_linears(model)
        padded = input_norms(model, linears, [batch], task)
        alone = input_norms(model, linears, [task.collate([it], 0) for it in items], task)
        for layer in linears:
            assert torch.allclose(padded[layer], alone[layer], rtol=1e-4, atol=1e-5), (name, layer)
        assert prune_structured(model, "ffn", 0.5, "wanda", padded) == {"ffn": 32}
        consumers = [m for n, m in prunable_linears(model).items() if n.endswith(("wo", "fc2"))]
        if name != "bert2bert":  # (the BERT pair: the job test above)
            assert [m.in_features for m in consumers] == [32] * 4  # 2 encoder + 2 decoder
        generated = model.generate(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            max_new_tokens=4,
            min_new_tokens=4,
            pad_token_id=0,
            eos_token_id=2,
        )
        assert generated.shape[0] == 2 and generated.shape[1] >= 5, name


def test_encoder_decoder_refuses_attention_heads(
    tiny_encoder_decoder_dir,
    tiny_llama_dir,  # noqa: F811
):
    """The compress job's check before any work (``_Compression`` runs it right after
    loading the model): attention heads of an encoder-decoder and of a Llama are
    refused; FFN neurons of both pass."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    from scilm_hpc.config import load_and_validate
    from scilm_hpc.errors import UserError
    from scilm_hpc.jobs.compress import _check_structured_steps

    def steps(*overrides: str):
        base = ["task=seq2seq", "run.dir=/tmp/unused", *overrides]
        return load_and_validate(COMPRESS, base, job="compress").compress.steps

    enc_dec = AutoModelForSeq2SeqLM.from_pretrained(tiny_encoder_decoder_dir)
    llama = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    heads = steps("compress=structured30", "compress.steps.0.pattern=heads")
    for model, expected in (
        (enc_dec, "steps.0.pattern: pattern 'heads' of an encoder-decoder is not supported"),
        (llama, "steps.0.pattern: pattern 'heads' on a Llama-style model"),
    ):
        with pytest.raises(UserError, match=expected):
            _check_structured_steps(model, heads)
        _check_structured_steps(model, steps("compress=structured30"))
