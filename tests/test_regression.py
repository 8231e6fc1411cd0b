"""regression: standardisation round trip, metrics against scipy, and prepare -> finetune
-> evaluate end to end on a tiny protein BERT (one residue a token)."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from scipy import stats

from scilm_hpc.data.readers import Example
from scilm_hpc.errors import UserError
from scilm_hpc.tasks import get_task
from scilm_hpc.tasks.regression import Regression, regression_metrics
from scilm_hpc.train.evaluation import is_better

from .conftest import REPO, scilm_run
from .protein_fixtures import AMINO_ACIDS


def fitness_rows(n: int, seed: int) -> list[dict]:
    """Random sequences whose label is a simple function of their residues."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        seq = "".join(rng.choice(AMINO_ACIDS) for _ in range(rng.randint(8, 24)))
        label = 3.0 * seq.count("K") / len(seq) - 2.0 * seq.count("D") / len(seq) + 1.5
        rows.append({"id": f"s{seed}-{i}", "sequence": seq, "label": round(label, 4)})
    return rows


# --- unit: metrics and standardisation -------------------------------------------------


def test_metrics_equal_scipy_and_numpy():
    rng = np.random.default_rng(0)
    gold = rng.normal(2.0, 3.0, size=(50, 2))
    pred = gold + rng.normal(0, 1.0, size=gold.shape)
    got = regression_metrics(gold, pred)
    per = got["per_target"]
    for j in range(2):
        assert per[j]["spearman"] == pytest.approx(stats.spearmanr(gold[:, j], pred[:, j])[0])
        assert per[j]["pearson"] == pytest.approx(stats.pearsonr(gold[:, j], pred[:, j])[0])
        assert per[j]["mae"] == pytest.approx(np.abs(pred[:, j] - gold[:, j]).mean())
        assert per[j]["rmse"] == pytest.approx(np.sqrt(((pred[:, j] - gold[:, j]) ** 2).mean()))
    assert got["spearman"] == pytest.approx((per[0]["spearman"] + per[1]["spearman"]) / 2)
    one = regression_metrics(gold[:, 0], pred[:, 0])
    assert "per_target" not in one and one["rmse"] == pytest.approx(per[0]["rmse"])
    assert np.isnan(regression_metrics(gold[:, 0], np.ones(50))["spearman"])  # constant


def test_standardisation_round_trips():
    train = [
        Example(source=f"t:{i}", text="ACD", values=(v, 10 * v))
        for i, v in enumerate([1.0, 2.0, 4.0, 9.0])
    ]
    state = get_task("regression").fit(train)
    assert state["label_mean"] == pytest.approx([4.0, 40.0])
    assert state["label_std"] == pytest.approx([np.std([1, 2, 4, 9]), 10 * np.std([1, 2, 4, 9])])
    task = get_task("regression", {"task_state": state})
    assert isinstance(task, Regression) and task is not get_task("regression")

    class Chars:  # a tokenizer stand-in: one id per character
        def __call__(self, texts, **_):
            return {"input_ids": [[2, *(ord(c) for c in t), 3] for t in texts]}

    _, columns = task.encode(Chars(), train, {}, 16)
    z = np.stack(columns["labels"])
    assert z.dtype == np.float32
    np.testing.assert_allclose(z.mean(axis=0), 0, atol=1e-6)
    np.testing.assert_allclose(z.std(axis=0), 1, atol=1e-6)
    items = [{"input_ids": np.array([2, 5, 3], np.int32), "labels": row} for row in z]
    batch = task.collate(items, pad_id=0)
    assert batch["labels"].dtype == torch.float32 and batch["labels"].shape == (4, 2)
    # a model that predicts the standardised targets exactly: zero loss, original units back
    results = task.example_results(batch["labels"].clone(), batch)
    for (loss, count, pred, gold), ex in zip(results, train, strict=True):
        assert loss == pytest.approx(0, abs=1e-10) and count == 2
        assert pred == pytest.approx(list(ex.values or ()), rel=1e-6)
        assert gold == pytest.approx(list(ex.values or ()), rel=1e-6)
    # the config a plain from_pretrained user reads
    assert task.config_attributes() == {
        "label_mean": state["label_mean"],
        "label_std": state["label_std"],
    }
    assert task.model_kwargs([])["num_labels"] == 2


def test_fit_refuses_ragged_and_constant_labels():
    task = get_task("regression")
    ragged = [Example(source="a:1", values=(1.0,)), Example(source="a:2", values=(1.0, 2.0))]
    with pytest.raises(UserError, match=r"a:2: 2 label values where the first"):
        task.fit(ragged)
    constant = [Example(source=f"a:{i}", values=(3.0,)) for i in range(3)]
    with pytest.raises(UserError, match="nothing to regress"):
        task.fit(constant)


def test_model_with_another_number_of_outputs_is_refused():
    task = get_task("regression", {"task_state": {"label_mean": [0.0], "label_std": [1.0]}})
    batch = {"labels": torch.zeros(2, 1)}
    with pytest.raises(UserError, match="predicts 3 value"):
        task.example_results(torch.zeros(2, 3), batch)


def test_distillation_matches_regression_outputs_by_mse():
    from scilm_hpc.compress.recover import distillation_loss

    teacher = torch.tensor([[0.5], [-1.0], [2.0]])
    assert distillation_loss(teacher, teacher, {}, "regression", 2.0) == 0
    moved = teacher + torch.tensor([[0.1], [0.0], [-0.2]])
    assert distillation_loss(moved, teacher, {}, "regression", 2.0).item() == pytest.approx(
        (0.01 + 0.04) / 3
    )


def test_best_metric_directions():
    assert is_better(0.5, 0.4, "dev_spearman") and not is_better(0.3, 0.4, "dev_spearman")
    assert is_better(0.3, 0.4, "dev_rmse") and is_better(0.3, 0.4, "dev_mae")
    assert not is_better(float("nan"), 0.4, "dev_spearman")


# --- end to end ----------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.timeout(900)
def test_regression_prepare_finetune_evaluate(tmp_path, tiny_protein_bert, write_jsonl):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from scilm_hpc.data.dataset import ShardDataset

    train_rows, dev_rows, test_rows = fitness_rows(64, 1), fitness_rows(16, 2), fitness_rows(24, 3)
    train = write_jsonl("train.jsonl", train_rows)
    dev = write_jsonl("dev.jsonl", dev_rows)
    test = write_jsonl("test.jsonl", test_rows)
    data = tmp_path / "data"
    common = ("task=regression", f"model.name_or_path={tiny_protein_bert}", "cluster=none")
    done = scilm_run(
        "prepare",
        str(REPO / "jobs/prepare.yaml"),
        *common,
        f"run.dir={data}",
        f"data.train={train}",
        f"data.dev={dev}",
        f"data.test={test}",
        "data.text_field=sequence",
        "data.residue_separator=' '",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    manifest = json.loads((data / "shards/manifest.json").read_text())
    labels = np.array([r["label"] for r in train_rows])
    assert manifest["task_state"]["label_mean"] == pytest.approx([labels.mean()])
    assert manifest["task_state"]["label_std"] == pytest.approx([labels.std()])
    assert manifest["residues"]["separator"] == " " and manifest["residues"]["unknown"] == {}
    shard = ShardDataset(data / "shards", "train")
    tokenizer = AutoTokenizer.from_pretrained(tiny_protein_bert)
    item = shard[0]
    assert item["labels"].dtype == np.float32 and item["labels"].shape == (1,)
    assert item["labels"][0] == pytest.approx((labels[0] - labels.mean()) / labels.std(), 1e-5)
    assert len(item["input_ids"]) == len(train_rows[0]["sequence"]) + 2  # one token a residue
    assert tokenizer.convert_ids_to_tokens(item["input_ids"][1:-1].tolist()) == list(
        train_rows[0]["sequence"]
    )

    run = tmp_path / "run"
    done = scilm_run(  # two ranks under ZeRO-2: dev results gathered over ranks
        "finetune",
        str(REPO / "jobs/finetune.yaml"),
        "task=regression",
        f"model.name_or_path={tiny_protein_bert}",
        "cluster=local",
        "cluster.tasks_per_node=2",
        f"run.dir={run}",
        f"data.shards={data / 'shards'}",
        "train.micro_batch_size=8",
        "train.epochs=6",
        "train.lr=2e-3",
        "train.log_every=1",
        "train.eval_every=6",
        "train.best_metric=dev_spearman",
        "zero.stage=2",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    train_losses = [r["loss"] for r in rows if "loss" in r and "dev_loss" not in r]
    assert len(train_losses) == 24  # 64 examples / (8 x 2 ranks) x 6 epochs
    assert np.mean(train_losses[-6:]) < np.mean(train_losses[:6])
    dev_evals = [r for r in rows if "dev_spearman" in r]
    assert [r["step"] for r in dev_evals] == [6, 12, 18, 24]
    assert all(r["dev_n_examples"] == 16 for r in dev_evals)
    best = max(dev_evals, key=lambda r: r["dev_spearman"])
    assert (run / "checkpoints" / f"step_{best['step']}").is_dir()  # kept as the best
    assert {"dev_pearson", "dev_mae", "dev_rmse", "dev_loss"} <= dev_evals[0].keys()
    model = AutoModelForSequenceClassification.from_pretrained(run / "export")
    assert model.config.problem_type == "regression" and model.config.num_labels == 1
    assert model.config.label_mean == pytest.approx([labels.mean()])
    assert model.config.label_std == pytest.approx([labels.std()])

    evaluated = tmp_path / "eval"
    done = scilm_run(
        "evaluate",
        str(REPO / "jobs/evaluate.yaml"),
        *common[:1],
        "cluster=none",
        f"model.name_or_path={run / 'export'}",
        f"run.dir={evaluated}",
        f"data.shards={data / 'shards'}",
        "eval.predictions=true",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((evaluated / "eval.json").read_text())
    metrics = report["metrics"]
    predictions = [
        json.loads(x) for x in (evaluated / "predictions.jsonl").read_text().splitlines()
    ]
    gold = np.array([p["gold"] for p in predictions])
    pred = np.array([p["pred"] for p in predictions])
    np.testing.assert_allclose(gold, [r["label"] for r in test_rows], rtol=1e-5)  # units back
    assert metrics["spearman"] == pytest.approx(stats.spearmanr(gold, pred)[0])
    assert metrics["pearson"] == pytest.approx(stats.pearsonr(gold, pred)[0])
    assert metrics["mae"] == pytest.approx(np.abs(pred - gold).mean())
    assert metrics["rmse"] == pytest.approx(np.sqrt(((pred - gold) ** 2).mean()))
    # the plain-transformers path gives the same predictions from the config's mean / std
    enc = tokenizer(
        [" ".join(r["sequence"]) for r in test_rows[:4]], padding=True, return_tensors="pt"
    )
    with torch.no_grad():
        out = model(**enc).logits[:, 0].numpy()
    plain = out * model.config.label_std[0] + model.config.label_mean[0]
    assert [p["index"] for p in predictions] == list(range(len(test_rows)))
    np.testing.assert_allclose(plain, pred[:4], atol=1e-4)
    assert (evaluated / "plots" / "scatter.png").stat().st_size > 1000
    assert "| spearman | pearson | mae | rmse | loss |" in (evaluated / "eval.md").read_text()

    # Wanda 50% + recovery + int8 dynamic on the regression model: the report holds
    # Spearman (original units for MAE) before and after each step, its baseline is the
    # evaluate job's figure on the same split, and the compressed directory evaluates to
    # the report's last figures (label mean / std travel with it)
    compressed = tmp_path / "compress"
    done = scilm_run(
        "compress",
        str(REPO / "jobs/compress.yaml"),
        "task=regression",
        "cluster=none",
        f"run.dir={compressed}",
        f"model.name_or_path={run / 'export'}",
        f"data.shards={data / 'shards'}",
        "compress=prune50-recover",
        "compress.steps.0.calibration_batches=2",
        "compress.steps.1.steps=2",
        "compress.eval_split=test",
        "compress.latency_repeats=2",
        "train.micro_batch_size=8",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((compressed / "compress_report.json").read_text())
    assert report["baseline"]["metrics"]["spearman"] == pytest.approx(metrics["spearman"])
    assert report["baseline"]["metrics"]["mae"] == pytest.approx(metrics["mae"])
    steps = report["steps"]
    assert [s["name"] for s in steps] == ["prune-wanda-50", "recover-2", "int8-dynamic"]
    assert steps[0]["sparsity"] == pytest.approx(0.5, abs=0.05)
    for step in steps:
        assert -1.0 <= step["metrics"]["spearman"] <= 1.0 and step["metrics"]["mae"] > 0
    done = scilm_run(
        "evaluate",
        str(REPO / "jobs/evaluate.yaml"),
        "task=regression",
        "cluster=none",
        f"model.name_or_path={compressed / 'compressed'}",
        f"run.dir={tmp_path / 'eval-compressed'}",
        f"data.shards={data / 'shards'}",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    after = json.loads((tmp_path / "eval-compressed" / "eval.json").read_text())["metrics"]
    assert after["spearman"] == pytest.approx(steps[-1]["metrics"]["spearman"])
    assert after["mae"] == pytest.approx(steps[-1]["metrics"]["mae"], rel=1e-4)
