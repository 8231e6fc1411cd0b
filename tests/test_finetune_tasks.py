"""finetune beyond classification (token classification, causal LM under ZeRO-3) and the
configurations and inputs it refuses before (or instead of) training."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from benchmarks._common import TINY_LLAMA, random_llama
from scilm_hpc.rundir import latest_tag
from scilm_hpc.train.checkpoint import consolidated_weights
from scilm_hpc.train.tensorboard import tensorboard_available

from .conftest import REPO
from .test_finetune import FINETUNE, losses, scilm_run

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]
PREPARE = str(REPO / "jobs" / "prepare.yaml")

DISEASES = [
    ["breast", "cancer"],
    ["diabetes"],
    ["cystic", "fibrosis"],
    ["asthma"],
    ["Huntington", "disease"],
    ["malaria"],
    ["type", "2", "diabetes"],
    ["leukemia"],
]
FRAMES = [
    ("Patients", "with", "{}", "were", "enrolled", "."),
    ("We", "studied", "{}", "in", "mice", "."),
    ("{}", "is", "common", "."),
    ("Mutations", "cause", "{}", "and", "{}", "."),
]


def ner_sentences(n: int, offset: int = 0) -> list[list[tuple[str, str]]]:
    """Short BIO-tagged sentences naming diseases (deterministic)."""
    out = []
    for i in range(offset, offset + n):
        frame = FRAMES[i % len(FRAMES)]
        k = 0
        sentence: list[tuple[str, str]] = []
        for word in frame:
            if word == "{}":
                name = DISEASES[(i * 3 + k) % len(DISEASES)]
                k += 1
                sentence += [
                    (w, "B-Disease" if j == 0 else "I-Disease") for j, w in enumerate(name)
                ]
            else:
                sentence.append((word, "O"))
        out.append(sentence)
    return out


def write_conll(path: Path, sentences: list[list[tuple[str, str]]]) -> Path:
    blocks = ["\n".join(f"{w}\t{t}" for w, t in s) for s in sentences]
    path.write_text("-DOCSTART-\tO\n\n" + "\n\n".join(blocks) + "\n", encoding="utf-8")
    return path


def metrics_rows(run_dir: Path) -> list[dict]:
    return [
        json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()
    ]


def prepare(root: Path, model: Path, *overrides: str, cluster: str = "none"):
    return scilm_run(
        "prepare",
        PREPARE,
        f"cluster={cluster}",
        f"run.dir={root}",
        f"model.name_or_path={model}",
        *overrides,
    )


def finetune_here(run_dir: Path, shards: Path, model: Path, *overrides: str):
    """One rank, in the scilm process itself (cluster=none)."""
    return scilm_run(
        "finetune",
        FINETUNE,
        f"run.dir={run_dir}",
        f"data.shards={shards}",
        f"model.name_or_path={model}",
        "cluster=none",
        "train.micro_batch_size=4",
        "train.log_every=1",
        "train.seed=7",
        *overrides,
    )


# --- token classification -------------------------------------------------------------


def test_token_classification_trains_evaluates_and_exports(tmp_path, tiny_model_dir):
    from transformers import AutoModelForTokenClassification

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    train = write_conll(corpus / "train.conll", ner_sentences(40))
    dev = write_conll(corpus / "dev.conll", ner_sentences(8, offset=40))
    data = tmp_path / "data"
    done = prepare(
        data,
        tiny_model_dir,
        "task=token_classification",
        "data.format=conll",
        f"data.train={train}",
        f"data.dev={dev}",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    manifest = json.loads((data / "shards" / "manifest.json").read_text())
    assert manifest["task"] == "token_classification"
    labels = list(manifest["labels"])
    assert set(labels) == {"O", "B-Disease", "I-Disease"}

    run = tmp_path / "run"
    # data.format=conll: see test_finetune_does_not_need_the_raw_data_format
    done = finetune_here(
        run,
        data / "shards",
        tiny_model_dir,
        "task=token_classification",
        "data.format=conll",
        "train.epochs=5",
        "train.lr=5e-3",
        "train.eval_every=10",
        "zero.stage=2",
    )
    assert done.returncode == 0, done.stderr[-3000:]

    rows = metrics_rows(run)
    train_losses = losses(run)
    assert [s for s, _ in train_losses] == list(range(1, 51))  # 40 // 4 steps x 5 epochs
    first = train_losses[0][1]
    last = sum(v for _, v in train_losses[-3:]) / 3
    assert last < first, (first, last)
    dev_rows = [r for r in rows if "dev_f1" in r]
    assert [r["step"] for r in dev_rows] == list(range(10, 51, 10))
    for r in dev_rows:
        assert 0.0 <= r["dev_f1"] <= 1.0 and 0.0 <= r["dev_token_accuracy"] <= 1.0
        assert {"dev_precision", "dev_recall", "dev_loss", "dev_n_examples"} <= r.keys()
        assert r["dev_n_examples"] == 8
    assert dev_rows[-1]["dev_loss"] < dev_rows[0]["dev_loss"]
    # the dev sentences reuse the training frames and diseases: a tagger that learns
    # finds their entities (a broken label alignment or metric stays far below)
    assert dev_rows[-1]["dev_f1"] > 0.8, dev_rows[-1]
    # TensorBoard (on by default with the package installed: a dependency) mirrors metrics.jsonl
    if tensorboard_available():
        from .test_tensorboard import scalars

        board = scalars(run / "tensorboard")
        assert [s for s, _ in board["train/loss"]] == [s for s, _ in train_losses]
        assert [v for _, v in board["train/loss"]] == pytest.approx([v for _, v in train_losses])
        assert [s for s, _ in board["dev/f1"]] == [r["step"] for r in dev_rows]
        assert [v for _, v in board["dev/f1"]] == pytest.approx([r["dev_f1"] for r in dev_rows])
        assert [s for s, _ in board["train/samples_per_s"]] == list(range(1, 51))

    model = AutoModelForTokenClassification.from_pretrained(run / "export")
    assert model.config.id2label == dict(enumerate(labels))
    assert model.config.label2id == {name: i for i, name in enumerate(labels)}
    assert model.classifier.out_features == len(labels)


def test_finetune_does_not_need_the_raw_data_format(tmp_path, scilm):
    # finetune reads shards only (their manifest records the task); the raw format is moot
    code, _, err = scilm(
        "finetune",
        FINETUNE,
        f"run.dir={tmp_path / 'run'}",
        "--dry-run",
        "task=token_classification",
    )
    assert code == 0, err


# --- causal LM under ZeRO-3 -----------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_causal_lm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny randomly initialised Llama with MiniLM's tokenizer."""
    return random_llama(tmp_path_factory.mktemp("tiny-llama"), TINY_LLAMA, max_positions=256)


WORDS = (
    "protein",
    "binding",
    "assay",
    "cells",
    "expression",
    "gene",
    "tumor",
    "growth",
    "inhibitor",
    "receptor",
    "signal",
    "pathway",
    "patients",
    "dose",
    "response",
)


def lm_lines(n: int, offset: int = 0) -> list[str]:
    return [
        " ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(4 + i % 6)) + "."
        for i in range(offset, offset + n)
    ]


def test_causal_lm_zero3_trains_evaluates_and_exports(tmp_path, tiny_causal_lm_dir):
    from transformers import AutoModelForCausalLM

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    train = corpus / "train.txt"
    train.write_text("\n".join(lm_lines(60)) + "\n", encoding="utf-8")
    dev = corpus / "dev.txt"
    dev.write_text("\n".join(lm_lines(10, offset=60)) + "\n", encoding="utf-8")
    data = tmp_path / "data"
    done = prepare(
        data,
        tiny_causal_lm_dir,
        "task=causal_lm",
        "data.format=text",
        f"data.train={train}",
        f"data.dev={dev}",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    manifest = json.loads((data / "shards" / "manifest.json").read_text())
    assert manifest["task"] == "causal_lm"
    # packed (the default): 10 dev lines fill fewer blocks; every token kept
    dev_blocks = manifest["splits"]["dev"]["n_examples"]
    assert dev_blocks < 10 and manifest["splits"]["dev"]["documents"] == 10
    assert manifest["splits"]["train"]["tokens_kept"] == manifest["splits"]["train"]["tokens_in"]

    run = tmp_path / "run"
    done = finetune_here(
        run,
        data / "shards",
        tiny_causal_lm_dir,
        "task=causal_lm",
        "zero.stage=3",
        "train.max_steps=4",
        "train.eval_every=2",
        "train.lr=1e-3",
    )
    assert done.returncode == 0, done.stderr[-3000:]

    rows = metrics_rows(run)
    assert [s for s, _ in losses(run)] == [1, 2, 3, 4]
    dev_rows = [r for r in rows if "dev_perplexity" in r]
    assert [r["step"] for r in dev_rows] == [2, 4]
    for r in dev_rows:
        assert math.isfinite(r["dev_perplexity"]) and r["dev_perplexity"] > 1.0
        assert r["dev_perplexity"] == pytest.approx(math.exp(r["dev_loss"]))
        assert r["dev_n_examples"] == dev_blocks
    assert latest_tag(run) == "step_4"

    exported = load_file(run / "export" / "model.safetensors")
    engine = consolidated_weights(run, "step_4", 3)
    initial = load_file(tiny_causal_lm_dir / "model.safetensors")
    assert exported.keys() <= engine.keys()
    assert "lm_head.weight" in exported and "model.embed_tokens.weight" in exported
    for key, tensor in exported.items():
        assert tensor.dtype == torch.float32 and tensor.shape == initial[key].shape, key
        torch.testing.assert_close(tensor, engine[key].float(), rtol=0, atol=0, msg=key)
    changed = [k for k in exported if not torch.equal(exported[k], initial[k])]
    assert any(k.startswith("model.layers.") for k in changed)

    model = AutoModelForCausalLM.from_pretrained(run / "export")
    assert type(model).__name__ == "LlamaForCausalLM"
    for name, param in model.state_dict().items():
        if name in exported:
            assert torch.equal(param, exported[name]), name
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[101, 2000, 2001, 102]])).logits
    assert logits.shape[-1] == model.config.vocab_size and torch.isfinite(logits).all()


# --- refused configurations -----------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "key", "words"),
    [
        (["zero.stage=4"], "zero.stage", "allowed: 0, 1, 2, 3"),
        (["zero.offload_params=true", "zero.stage=2"], "zero.offload_params", "zero.stage=3"),
        (
            [
                "train.global_batch_size=64",
                "train.micro_batch_size=16",
                "train.gradient_accumulation=1",
                "cluster.tasks_per_node=2",
            ],
            "train.global_batch_size",
            "x ranks (2",
        ),
        (["train.precision=fp16"], "train.precision", "bf16 or fp32"),
        (["train.best_metric=dev_loss"], "train.best_metric", "train.eval_every > 0"),
        (["zero.config_file=/nonexistent/ds.json"], "zero.config_file", "does not exist"),
    ],
    ids=[
        "stage4",
        "offload-params-stage2",
        "global-batch",
        "fp16-cpu",
        "best-metric-no-eval",
        "config-file-missing",
    ],
)
def test_refused_configuration_exits_2_before_anything_runs(tmp_path, scilm, overrides, key, words):
    run = tmp_path / "run"
    code, out, err = scilm(
        "finetune", FINETUNE, f"run.dir={run}", f"data.shards={tmp_path / 'shards'}", *overrides
    )
    assert code == 2, (out, err)
    problems = [line for line in err.splitlines() if line.startswith("error: ")]
    # the configuration's problem and the missing shards directory, in one list
    assert [p.split(":")[1].strip() for p in problems] == [key, "data.shards"], err
    assert words in problems[0], err
    assert not run.exists()  # nothing written, nothing started
    assert out == ""


def test_refused_configuration_lists_every_problem(tmp_path, scilm):
    run = tmp_path / "run"
    code, _, err = scilm(
        "finetune",
        FINETUNE,
        f"run.dir={run}",
        f"data.shards={tmp_path / 'shards'}",
        "zero.stage=4",
        "train.precision=fp16",
        "train.best_metric=dev_loss",
    )
    assert code == 2
    keys = [line.split(":")[1].strip() for line in err.splitlines() if line.startswith("error:")]
    # with shards that do not exist (not the shipped job's runs/demo/shards, which `make
    # demo` creates in the clone): all problems at once
    assert sorted(keys) == ["data.shards", "train.best_metric", "train.precision", "zero.stage"]
    assert not run.exists()


def test_accepted_global_batch_size_is_not_refused(tmp_path, scilm):
    code, out, err = scilm(
        "finetune",
        FINETUNE,
        f"run.dir={tmp_path / 'run'}",
        "--dry-run",
        "train.global_batch_size=32",
        "train.micro_batch_size=16",
        "cluster.tasks_per_node=2",
    )
    assert code == 0, err
    assert "global_batch_size: 32" in out
    assert not (tmp_path / "run").exists()


# --- refused inputs (found by the ranks, reported like config errors) -----------------


def test_shards_of_another_tokenizer_are_refused(
    tmp_path, write_jsonl, tiny_model_dir, other_tokenizer_model_dir
):
    rows = [{"text": f"the cells of sample {i} grew.", "label": "ab"[i % 2]} for i in range(12)]
    data = tmp_path / "data"
    done = prepare(data, other_tokenizer_model_dir, f"data.train={write_jsonl('t.jsonl', rows)}")
    assert done.returncode == 0, done.stderr[-3000:]

    run = tmp_path / "run"
    done = finetune_here(run, data / "shards", tiny_model_dir, "train.max_steps=1")
    assert done.returncode == 2, (done.stdout[-2000:], done.stderr[-3000:])
    lines = [x for x in done.stderr.splitlines() if x.startswith("error: ")]
    assert len(lines) == 1, done.stderr[-3000:]
    assert lines[0].startswith("error: data.shards:")
    assert str(other_tokenizer_model_dir) in lines[0] and str(tiny_model_dir) in lines[0]
    assert "Traceback" not in done.stderr
    assert latest_tag(run) is None and not (run / "export").exists()


def test_missing_shards_directory_is_refused_before_a_rank_starts(tmp_path, tiny_model_dir):
    """Checked before submission (jobs.presubmit): one error naming the path, no rank
    started, nothing written (a rank's own refusal travels back as in
    test_shards_of_another_tokenizer_are_refused)."""
    run = tmp_path / "run"
    missing = tmp_path / "no-such-shards"
    done = scilm_run(
        "finetune",
        FINETUNE,
        f"run.dir={run}",
        f"data.shards={missing}",
        f"model.name_or_path={tiny_model_dir}",
        "cluster=local",
        "cluster.tasks_per_node=1",
        "train.max_steps=1",
    )
    assert done.returncode == 2, (done.stdout[-2000:], done.stderr[-3000:])
    lines = [x for x in done.stderr.splitlines() if x.startswith("error: ")]
    assert len(lines) == 1, done.stderr[-3000:]
    assert lines[0].startswith("error: data.shards:") and str(missing) in lines[0]
    assert "does not exist" in lines[0]
    assert "Traceback" not in done.stderr
    assert not run.exists()  # no rank was started, nothing written
