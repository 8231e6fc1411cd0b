"""ESM-style protein models: a Python ``EsmTokenizer`` (no fast version, residues side by
side) and an ``Esm*`` model through prepare -> finetune -> evaluate, on a tiny ESM built
from its config (no ESM weights ship offline)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from scilm_hpc.data.encode import IGNORE_INDEX, encode_words
from scilm_hpc.model_source import load_tokenizer, tokenizer_fingerprint

from .conftest import REPO, scilm_run
from .test_regression import fitness_rows
from .test_residue_metrics import paratope_rows

# ESM-2's vocabulary, in its order
ESM_VOCAB = (
    ["<cls>", "<pad>", "<eos>", "<unk>"]
    + list("LAGVSERTIDPKQNFYMHWCXBUZO")
    + [".", "-", "<null_1>", "<mask>"]
)


def tiny_esm(out: Path, vocab: list[str] = ESM_VOCAB) -> Path:
    """A tiny random ESM-2-shaped model (rotary positions) with an ``EsmTokenizer`` made
    from a written vocabulary file, saved in ``out``."""
    import torch
    from transformers import EsmConfig, EsmForMaskedLM, EsmTokenizer

    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    EsmTokenizer(vocab_file=str(out / "vocab.txt")).save_pretrained(out)
    torch.manual_seed(0)
    config = EsmConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        position_embedding_type="rotary",
        pad_token_id=vocab.index("<pad>"),
        mask_token_id=vocab.index("<mask>"),
    )
    EsmForMaskedLM(config).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def esm_dir(tmp_path_factory) -> Path:
    return tiny_esm(tmp_path_factory.mktemp("esm"))


def test_esm_tokenizer_loads_and_has_a_stable_fingerprint(esm_dir, tmp_path):
    tokenizer = load_tokenizer(str(esm_dir))
    assert type(tokenizer).__name__ == "EsmTokenizer" and not tokenizer.is_fast
    fingerprint = tokenizer_fingerprint(tokenizer)
    assert fingerprint == tokenizer_fingerprint(load_tokenizer(str(esm_dir)))
    tokenizer.model_max_length = 7  # truncation state does not count
    assert tokenizer_fingerprint(tokenizer) == fingerprint
    # another vocabulary order gives other ids: another fingerprint
    swapped = [*ESM_VOCAB]
    swapped[4], swapped[5] = swapped[5], swapped[4]
    other = tiny_esm(tmp_path / "other", swapped)
    assert tokenizer_fingerprint(load_tokenizer(str(other))) != fingerprint


def test_residues_align_to_their_tags_with_the_python_tokenizer(esm_dir):
    tokenizer = load_tokenizer(str(esm_dir))
    words = [list("MKTAY"), list("GW")]
    ids, tags = encode_words(tokenizer, words, [[1, 0, 1, 0, 0], [0, 1]], max_length=6)
    # <cls> residues <eos>; the first sequence cut to the 4 residues that fit
    assert tokenizer.convert_ids_to_tokens(ids[0].tolist()) == [
        "<cls>",
        "M",
        "K",
        "T",
        "A",
        "<eos>",
    ]
    assert tags[0].tolist() == [IGNORE_INDEX, 1, 0, 1, 0, IGNORE_INDEX]
    assert tokenizer.convert_ids_to_tokens(ids[1].tolist()) == ["<cls>", "G", "W", "<eos>"]
    assert tags[1].tolist() == [IGNORE_INDEX, 0, 1, IGNORE_INDEX]
    # the same as the text path gives for residues side by side (no separator)
    text = tokenizer("MKTA", truncation=True, max_length=6)["input_ids"]
    assert ids[0].tolist() == text


def _prepare(tmp_path: Path, esm: Path, task: str, rows: tuple[list, list, list], write) -> Path:
    paths = [
        write(f"{split}.jsonl", r) for split, r in zip(("train", "dev", "test"), rows, strict=True)
    ]
    done = scilm_run(
        "prepare",
        str(REPO / "jobs/prepare.yaml"),
        f"task={task}",
        f"model.name_or_path={esm}",
        "cluster=none",
        f"run.dir={tmp_path / 'data'}",
        f"data.train={paths[0]}",
        f"data.dev={paths[1]}",
        f"data.test={paths[2]}",
        "data.text_field=sequence",
        "data.residue_separator=''",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return tmp_path / "data" / "shards"


def _finetune_and_evaluate(tmp_path: Path, esm: Path, task: str, shards: Path, *extra: str):
    run = tmp_path / "run"
    done = scilm_run(
        "finetune",
        str(REPO / "jobs/finetune.yaml"),
        f"task={task}",
        f"model.name_or_path={esm}",
        "cluster=none",
        f"run.dir={run}",
        f"data.shards={shards}",
        "train.micro_batch_size=8",
        "train.lr=3e-3",
        "train.log_every=1",
        *extra,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    evaluated = tmp_path / "eval"
    done = scilm_run(
        "evaluate",
        str(REPO / "jobs/evaluate.yaml"),
        f"task={task}",
        "cluster=none",
        f"model.name_or_path={run / 'export'}",
        f"run.dir={evaluated}",
        f"data.shards={shards}",
        "eval.predictions=true",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    predictions = [
        json.loads(x) for x in (evaluated / "predictions.jsonl").read_text().splitlines()
    ]
    return run, rows, json.loads((evaluated / "eval.json").read_text())["metrics"], predictions


@pytest.fixture(scope="module")
def esm_regression(tmp_path_factory, esm_dir) -> dict:
    """The tiny ESM prepared, fine-tuned (4 epochs, one process) and evaluated on
    regression rows; shared by the end-to-end test and the compression recipes."""
    root = tmp_path_factory.mktemp("esm-regression")

    def write(name: str, rows: list[dict]) -> Path:
        (root / name).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        return root / name

    rows = (fitness_rows(48, 1), fitness_rows(16, 2), fitness_rows(16, 3))
    shards = _prepare(root, esm_dir, "regression", rows, write)
    run, log, metrics, predictions = _finetune_and_evaluate(
        root, esm_dir, "regression", shards, "train.epochs=4"
    )
    return {
        "rows": rows,
        "shards": shards,
        "export": run / "export",
        "log": log,
        "metrics": metrics,
        "predictions": predictions,
    }


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_esm_regression_prepare_finetune_evaluate(esm_dir, esm_regression):
    from transformers import AutoModelForSequenceClassification

    from scilm_hpc.data.dataset import ShardDataset

    rows, shards = esm_regression["rows"], esm_regression["shards"]
    first = ShardDataset(shards, "train")[0]["input_ids"].tolist()
    tokenizer = load_tokenizer(str(esm_dir))
    # one token a residue, no separator, between ESM's <cls> and <eos>
    assert tokenizer.convert_ids_to_tokens(first) == ["<cls>", *rows[0][0]["sequence"], "<eos>"]
    log, metrics = esm_regression["log"], esm_regression["metrics"]
    losses = [r["loss"] for r in log if "loss" in r and "dev_loss" not in r]
    assert len(losses) == 24 and np.mean(losses[-6:]) < np.mean(losses[:6])
    model = AutoModelForSequenceClassification.from_pretrained(esm_regression["export"])
    assert type(model).__name__ == "EsmForSequenceClassification"
    assert model.config.problem_type == "regression"
    gold = [p["gold"] for p in esm_regression["predictions"]]
    np.testing.assert_allclose(gold, [r["label"] for r in rows[2]], rtol=1e-5)  # units back
    assert metrics["n_examples"] == 16 and {"spearman", "pearson", "mae", "rmse"} <= set(metrics)


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_esm_per_residue_labels_prepare_finetune_evaluate(tmp_path, esm_dir, write_jsonl):
    from transformers import AutoModelForTokenClassification

    rows = (paratope_rows(48, 1), paratope_rows(16, 2), paratope_rows(16, 2))
    shards = _prepare(tmp_path, esm_dir, "token_classification", rows, write_jsonl)
    run, _, metrics, predictions = _finetune_and_evaluate(
        tmp_path, esm_dir, "token_classification", shards, "train.epochs=6"
    )
    model = AutoModelForTokenClassification.from_pretrained(run / "export")
    assert type(model).__name__ == "EsmForTokenClassification"
    # every residue scored once, gold tags in the order of the input
    assert [p["gold"] for p in predictions] == [r["label"] for r in rows[2]]
    assert [len(p["pred"]) for p in predictions] == [len(r["sequence"]) for r in rows[2]]
    assert {"pr_auc", "roc_auc", "mcc", "f1"} <= set(metrics)
    assert metrics["roc_auc"] > 0.6  # W / Y residues and their neighbours: learnable


# the recipes test_regression.py's prune50-recover run leaves out, on the ESM regression
# model: int4 weight-only (groups cut to the model's width), structured FFN and 2:4, with
# recovery cut to 2 steps and calibration to 2 batches
ESM_RECIPES = {
    "int4-weight": ["compress.steps.0.group_size=32"],
    "structured30": ["compress.steps.0.calibration_batches=2", "compress.steps.1.steps=2"],
    "nm24-recover": ["compress.steps.0.calibration_batches=2", "compress.steps.1.steps=2"],
}


@pytest.mark.integration
@pytest.mark.timeout(600)
@pytest.mark.parametrize("recipe", list(ESM_RECIPES))
def test_each_recipe_compresses_the_esm_regression_model(tmp_path, esm_regression, recipe):
    """The recipe applies (int4 layers, narrower FFNs, two zeros in every four inputs),
    the report's baseline is the evaluate job's figure, and the compressed directory
    evaluates to the report's last Spearman."""
    import torch

    from scilm_hpc.compress import load_compressed
    from scilm_hpc.compress.quantize import QuantizedEmbedding, WeightOnlyLinear
    from scilm_hpc.compress.targets import prunable_linears

    shards = esm_regression["shards"]
    done = scilm_run(
        "compress",
        str(REPO / "jobs/compress.yaml"),
        "task=regression",
        "cluster=none",
        f"run.dir={tmp_path / 'compress'}",
        f"model.name_or_path={esm_regression['export']}",
        f"data.shards={shards}",
        f"compress={recipe}",
        *ESM_RECIPES[recipe],
        "compress.eval_split=test",
        "compress.latency_repeats=1",
        "train.micro_batch_size=8",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "compress" / "compress_report.json").read_text())
    baseline = report["baseline"]
    assert baseline["metrics"]["spearman"] == pytest.approx(esm_regression["metrics"]["spearman"])
    last = report["steps"][-1]
    compressed = tmp_path / "compress" / "compressed"
    model = load_compressed(compressed)
    assert type(model).__name__ == "EsmForSequenceClassification"
    linears = prunable_linears(model)
    assert len(linears) == 12  # 2 blocks x (q, k, v, attention out, FFN in, FFN out)
    if recipe == "int4-weight":
        assert all(isinstance(m, WeightOnlyLinear) and m.bits == 4 for m in linears.values())
        assert isinstance(model.get_input_embeddings(), QuantizedEmbedding)
        assert last["size_ratio"] > 2.5, last
    elif recipe == "structured30":
        shapes = json.loads((compressed / "scilm_compression.json").read_text())["linear_shapes"]
        for i, block in enumerate(model.esm.encoder.layer):  # the saved shapes, then the model
            assert shapes[f"esm.encoder.layer.{i}.intermediate.dense"] == [48, 32]
            assert block.intermediate.dense.out_features == 48  # 64 x 0.7, to a multiple of 8
            assert block.output.dense.in_features == 48
        assert last["params"] < baseline["params"]
    else:
        for name, linear in linears.items():
            groups = linear.weight.detach().reshape(linear.out_features, -1, 4)
            zeros = (groups == 0).sum(-1)
            assert torch.all(zeros == 2), name
    done = scilm_run(
        "evaluate",
        str(REPO / "jobs/evaluate.yaml"),
        "task=regression",
        "cluster=none",
        f"model.name_or_path={compressed}",
        f"run.dir={tmp_path / 'eval'}",
        f"data.shards={shards}",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    after = json.loads((tmp_path / "eval" / "eval.json").read_text())["metrics"]
    assert after["spearman"] == pytest.approx(last["metrics"]["spearman"])
    assert after["mae"] == pytest.approx(last["metrics"]["mae"], rel=1e-4)
