"""token_classification with non-BIO tags (per-residue P / N): positive-class scores,
MCC, ROC-AUC and PR-AUC against scikit-learn; BIO tags keep entity-level scoring;
a paratope-style run from JSONL through finetune (``train.class_weights``: the first step's
loss is the class-weighted one) and evaluate."""

from __future__ import annotations

import json
import random
import shutil

import numpy as np
import pytest
import torch
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    f1_score,
    matthews_corrcoef,
    precision_score,
    recall_score,
    roc_auc_score,
)

from scilm_hpc.tasks import get_task
from scilm_hpc.tasks.token_classification import binary_ranking_metrics, is_bio

from .conftest import REPO, scilm_run
from .protein_fixtures import AMINO_ACIDS


def test_bio_detection():
    assert is_bio(["B-Disease", "I-Disease", "O"]) and is_bio(["B-X", "O"])
    assert not is_bio(["N", "P"]) and not is_bio(["O"]) and not is_bio(["B-X", "O", "P"])


def test_binary_residue_metrics_equal_scikit_learn():
    task = get_task("token_classification")
    rng = np.random.default_rng(1)
    results, gold_all, score_all = [], [], []
    for n in (30, 7, 52, 11):
        gold = (rng.random(n) < 0.15).astype(int)
        score = np.clip(0.35 * gold + rng.random(n) * 0.7, 0, 1)
        score[:3] = 0.5  # ties, and p == 0.5 is not positive (argmax picks the first tag)
        results.append((float(n), n, score.tolist(), gold.tolist()))
        gold_all += gold.tolist()
        score_all += score.tolist()
    metrics = task.metrics(results, ["N", "P"])
    y, s = np.array(gold_all), np.array(score_all)
    p = (s > 0.5).astype(int)
    assert metrics["precision"] == pytest.approx(precision_score(y, p))
    assert metrics["recall"] == pytest.approx(recall_score(y, p))
    assert metrics["f1"] == pytest.approx(f1_score(y, p))
    assert metrics["mcc"] == pytest.approx(matthews_corrcoef(y, p))
    assert metrics["token_accuracy"] == pytest.approx(accuracy_score(y, p))
    assert metrics["roc_auc"] == pytest.approx(roc_auc_score(y, s))
    assert metrics["pr_auc"] == pytest.approx(average_precision_score(y, s))
    assert metrics["positive_label"] == "P" and metrics["loss"] == pytest.approx(1.0)
    nan = binary_ranking_metrics(np.zeros(5, bool), np.ones(5))
    assert np.isnan(nan["roc_auc"]) and np.isnan(nan["pr_auc"])


def test_example_results_hold_the_positive_probability():
    task = get_task("token_classification")
    logits = torch.tensor([[[0.0, 0.0], [2.0, 0.0], [0.0, 3.0], [1.0, 1.0]]])
    batch = {"labels": torch.tensor([[-100, 0, 1, -100]])}
    [(loss, count, pred, gold)] = task.example_results(logits, batch)
    assert count == 2 and gold == [0, 1]
    assert pred == pytest.approx([1 / (1 + np.exp(2)), 1 / (1 + np.exp(-3))])


def test_more_than_two_plain_tags_average_over_classes():
    task = get_task("token_classification")
    results = [(1.0, 4, [0, 1, 2, 2], [0, 1, 1, 2])]
    metrics = task.metrics(results, ["a", "b", "c"])
    assert metrics["f1"] == pytest.approx(f1_score([0, 1, 1, 2], [0, 1, 2, 2], average="macro"))
    assert "mcc" not in metrics


def test_bio_tags_keep_entity_scores_with_two_labels():
    task = get_task("token_classification")
    # tags B-X (0) and O (1): gold has one entity, predicted too (probability of O low there)
    results = [(0.0, 3, [0.1, 0.9, 0.8], [0, 1, 1])]
    metrics = task.metrics(results, ["B-X", "O"])
    assert metrics["f1"] == 1.0 and "mcc" not in metrics


def paratope_rows(n: int, seed: int) -> list[dict]:
    """Chains whose residues W and Y (and their right neighbours) are paratope."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        seq = "".join(rng.choice(AMINO_ACIDS) for _ in range(rng.randint(12, 30)))
        tags = ["P" if c in "WY" or (i and seq[i - 1] in "WY") else "N" for i, c in enumerate(seq)]
        rows.append({"sequence": seq, "label": tags})
    return rows


def first_step_losses(model_dir, shards) -> tuple[float, float]:
    """The cross-entropy of a finetune's first micro-batch (``train.micro_batch_size=8``),
    computed here from the model directory, the shards and the sampler: with ``P``
    weighted 4 (``train.class_weights.P=4``) and unweighted."""
    import torch.nn.functional as F

    from scilm_hpc.data.dataset import ShardDataset
    from scilm_hpc.data.sampler import ResumableBatches, SamplerPosition
    from scilm_hpc.model_source import load_tokenizer
    from scilm_hpc.models import build_model, pad_token_id
    from scilm_hpc.schema import TrainConfig

    train, defaults = ShardDataset(shards, "train"), TrainConfig()
    task = get_task("token_classification", train.manifest)
    batches = ResumableBatches(
        train.lengths(), 8, 1, 1, 0, defaults.seed, defaults.length_bucketing
    ).step_batches(SamplerPosition())
    indices = next(batches)[1][0]
    pad = pad_token_id(load_tokenizer(str(model_dir)))
    batch = task.collate([train[int(i)] for i in indices], pad)
    torch.manual_seed(defaults.seed)  # as the trainer does before building the model
    model = build_model(task, str(model_dir), train.label_names)
    with torch.no_grad():
        logits = model(**task.forward_inputs(batch)).logits
    keep = batch["labels"] != -100
    gold = batch["labels"][keep]
    weight = torch.tensor([4.0 if name == "P" else 1.0 for name in train.label_names])
    weighted = F.cross_entropy(logits[keep], gold, weight=weight)
    return float(weighted), float(F.cross_entropy(logits[keep], gold))


@pytest.mark.integration
@pytest.mark.timeout(900)
def test_paratope_style_finetune_and_evaluate(tmp_path, tiny_protein_bert, write_jsonl):
    train = write_jsonl("train.jsonl", paratope_rows(64, 1))
    dev = write_jsonl("dev.jsonl", paratope_rows(24, 2))
    model = tmp_path / "model"  # without dropout: the first step's loss is computed below
    shutil.copytree(tiny_protein_bert, model)
    config = json.loads((model / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (model / "config.json").write_text(json.dumps(config))
    common = (
        "task=token_classification",
        f"model.name_or_path={model}",
        "cluster=none",
    )
    done = scilm_run(
        "prepare",
        str(REPO / "jobs/prepare.yaml"),
        *common,
        f"run.dir={tmp_path / 'data'}",
        f"data.train={train}",
        f"data.dev={dev}",
        f"data.test={dev}",
        "data.text_field=sequence",
        "data.residue_separator=' '",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    run = tmp_path / "run"
    done = scilm_run(
        "finetune",
        str(REPO / "jobs/finetune.yaml"),
        *common,
        f"run.dir={run}",
        f"data.shards={tmp_path / 'data/shards'}",
        "train.micro_batch_size=8",
        "train.epochs=4",
        "train.lr=3e-3",
        "train.log_every=1",
        "train.eval_every=16",
        "train.best_metric=dev_pr_auc",
        "train.class_weights.P=4",
        "zero.stage=0",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    # the loss trained on is the class-weighted one (P, about a quarter of the residues)
    weighted, plain = first_step_losses(model, tmp_path / "data/shards")
    assert rows[0]["step"] == 1 and abs(weighted - plain) > 0.01
    assert rows[0]["loss"] == pytest.approx(weighted, rel=1e-4)
    dev_rows = [r for r in rows if "dev_pr_auc" in r]
    assert [r["step"] for r in dev_rows] == [16, 32]
    assert {"dev_mcc", "dev_roc_auc", "dev_f1", "dev_precision", "dev_recall"} <= dev_rows[0].keys()

    evaluated = tmp_path / "eval"
    done = scilm_run(
        "evaluate",
        str(REPO / "jobs/evaluate.yaml"),
        *common,
        f"model.name_or_path={run / 'export'}",
        f"run.dir={evaluated}",
        f"data.shards={tmp_path / 'data/shards'}",
        "eval.predictions=true",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads((evaluated / "eval.json").read_text())["metrics"]
    predictions = [
        json.loads(x) for x in (evaluated / "predictions.jsonl").read_text().splitlines()
    ]
    # gold: tag names (P / N); pred: the probability of the positive tag P
    gold = np.array([t == "P" for p in predictions for t in p["gold"]], dtype=np.int64)
    score = np.array([s for p in predictions for s in p["pred"]])
    assert len(gold) == sum(len(r["sequence"]) for r in paratope_rows(24, 2))
    assert metrics["roc_auc"] == pytest.approx(roc_auc_score(gold, score))
    assert metrics["pr_auc"] == pytest.approx(average_precision_score(gold, score))
    assert metrics["mcc"] == pytest.approx(matthews_corrcoef(gold, score > 0.5))
    assert metrics["roc_auc"] > 0.6  # the rule is learnable within a few steps
    assert "## Per residue (positive class `P`)" in (evaluated / "eval.md").read_text()
