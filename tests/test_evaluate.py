"""evaluate: identical metrics for any number of MPI ranks, reports, bad input."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
from sklearn.metrics import accuracy_score, f1_score

from .conftest import REPO, scilm_run

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]
EVALUATE = str(REPO / "jobs" / "evaluate.yaml")


run = scilm_run


@pytest.fixture(scope="module")
def eval_setup(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, minilm_path: str):
    """Shards with a 53-example test split in 8 shards, and MiniLM with a random 3-label head
    (a real encoder: its predictions vary across inputs with clear margins)."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from scilm_hpc.data.demo_corpus import write_demo_corpus

    root = tmp_path_factory.mktemp("eval")
    corpus = write_demo_corpus(root / "corpus", train=30, dev=6, test=53)
    done = run(
        "prepare",
        str(REPO / "jobs/prepare.yaml"),
        "cluster=none",
        f"run.dir={root}",
        f"data.train={corpus['train']}",
        f"data.test={corpus['test']}",
        f"model.name_or_path={tiny_model_dir}",
        "data.examples_per_shard=7",
    )
    assert done.returncode == 0, done.stderr
    labels = ["background", "method", "result"]
    torch.manual_seed(3)
    model = AutoModelForSequenceClassification.from_pretrained(
        minilm_path,
        num_labels=3,
        id2label=dict(enumerate(labels)),
        label2id={n: i for i, n in enumerate(labels)},
        ignore_mismatched_sizes=True,
    )
    with torch.no_grad():  # make predictions spread over the classes
        model.classifier.weight.normal_(0, 1.0)
    model.save_pretrained(root / "model")
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(root / "model")
    return root / "shards", root / "model"


def evaluate(run_dir: Path, shards: Path, model: Path, *extra: str) -> subprocess.CompletedProcess:
    return run(
        "evaluate",
        EVALUATE,
        f"run.dir={run_dir}",
        f"data.shards={shards}",
        f"model.name_or_path={model}",
        "eval.batch_size=4",
        *extra,
    )


def test_metrics_identical_for_1_2_and_3_ranks(tmp_path, eval_setup):
    shards, model = eval_setup
    reports = {}
    for ranks in (1, 2, 3):
        cluster = ["cluster=none"] if ranks == 1 else [f"cluster.tasks_per_node={ranks}"]
        done = evaluate(tmp_path / str(ranks), shards, model, *cluster, "eval.predictions=true")
        assert done.returncode == 0, done.stderr[-3000:]
        # rank 0's progress, streamed from mpirun where there are several ranks
        assert re.search(r"evaluate rank 0 \(model\): (\d+)/\1 examples", done.stderr)
        reports[ranks] = json.loads((tmp_path / str(ranks) / "eval.json").read_text())
        assert reports[ranks]["ranks"] == ranks and reports[ranks]["n_examples"] == 53
    preds = {
        r: [
            (json.loads(x)["pred"], json.loads(x)["gold"])
            for x in (tmp_path / str(r) / "predictions.jsonl").read_text().splitlines()
        ]
        for r in (1, 2, 3)
    }
    assert preds[1] == preds[2] == preds[3] and len(preds[1]) == 53
    assert len({p for p, _ in preds[1]}) >= 2  # a model that predicts more than one class
    # label names, not class ids
    assert {x for pair in preds[1] for x in pair} <= {"background", "method", "result"}
    for ranks in (2, 3):
        a, b = dict(reports[1]["metrics"]), dict(reports[ranks]["metrics"])
        # the loss is summed in another order of batches: equal to float rounding
        assert a.pop("loss") == pytest.approx(b.pop("loss"), rel=1e-6)
        assert a == b
    gold = [g for _, g in preds[1]]
    pred = [p for p, _ in preds[1]]
    metrics = reports[1]["metrics"]
    assert metrics["accuracy"] == pytest.approx(accuracy_score(gold, pred))
    assert metrics["macro_f1"] == pytest.approx(f1_score(gold, pred, average="macro"))
    assert metrics["weighted_f1"] == pytest.approx(f1_score(gold, pred, average="weighted"))
    assert (tmp_path / "1" / "plots" / "confusion_matrix.png").stat().st_size > 1000
    table = (tmp_path / "1" / "eval.md").read_text()
    assert "| background |" in table and f"{metrics['macro_f1']:.4f}" in table


def test_predictions_name_classes_and_tags():
    from scilm_hpc.evaluate.report import label_names

    assert label_names(2, ["background", "method", "result"]) == "result"
    tags = ["O", "B-Disease", "I-Disease"]
    assert label_names([0, 1, 2, 0], tags) == ["O", "B-Disease", "I-Disease", "O"]
    assert label_names(0.25, tags) == 0.25  # not an id: kept


def test_two_models_side_by_side(tmp_path, eval_setup):
    """Two different models in one report, each with exactly the metrics of its own
    single-model run (and so not each other's)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    shards, first = eval_setup
    second = tmp_path / "second"
    model = AutoModelForSequenceClassification.from_pretrained(first)
    torch.manual_seed(11)
    with torch.no_grad():  # another head: other predictions on the same encoder
        model.classifier.weight.normal_(0, 1.0)
    model.save_pretrained(second)
    AutoTokenizer.from_pretrained(first).save_pretrained(second)
    alone = {}
    for name, path in (("first", first), ("second", second)):
        done = evaluate(tmp_path / name, shards, path, "cluster=none")
        assert done.returncode == 0, done.stderr[-3000:]
        alone[name] = json.loads((tmp_path / name / "eval.json").read_text())["metrics"]
    assert alone["first"] != alone["second"]
    both = tmp_path / "both"
    done = evaluate(both, shards, first, "cluster=none", f"eval.models=[{second}]")
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((both / "eval.json").read_text())
    assert [m["model"] for m in report["models"]] == [str(first), str(second)]
    assert report["models"][0]["metrics"] == alone["first"]
    assert report["models"][1]["metrics"] == alone["second"]
    table = (both / "eval.md").read_text()
    assert f"| `{first}` |" in table and f"| `{second}` |" in table


@pytest.mark.parametrize("case", ["labels", "tokenizer", "split"])
def test_bad_input_is_refused_before_inference(
    tmp_path, eval_setup, tiny_model_dir, other_tokenizer_model_dir, case
):
    shards, model = eval_setup
    extra = {
        "labels": [f"model.name_or_path={tiny_model_dir}"],
        "tokenizer": [f"model.name_or_path={other_tokenizer_model_dir}"],
        "split": ["eval.split=dev"],
    }[case]
    done = evaluate(tmp_path, shards, model, "cluster.tasks_per_node=2", *extra)
    assert done.returncode == 2, done.stderr[-2000:]
    expected = {
        "labels": "shards' label map is ['background', 'method', 'result']",
        "tokenizer": "differs from the tokenizer",
        "split": "split 'dev' is not in",
    }
    assert expected[case] in done.stderr
    assert not (tmp_path / "eval.json").exists()


@pytest.mark.slurm
def test_evaluate_under_srun_pmix(slurm_cluster, tmp_path, eval_setup):
    shards, model = eval_setup
    local = evaluate(tmp_path / "local", shards, model, "cluster=none")
    assert local.returncode == 0, local.stderr[-2000:]
    done = evaluate(
        tmp_path / "slurm", shards, model, "cluster=dev", "cluster.tasks_per_node=2", "--wait"
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "slurm" / "eval.json").read_text())
    assert report["ranks"] == 2
    reference = json.loads((tmp_path / "local" / "eval.json").read_text())["metrics"]
    assert report["metrics"]["macro_f1"] == reference["macro_f1"]
    assert report["metrics"]["confusion_matrix"] == reference["confusion_matrix"]


def test_token_classification_entity_metrics_match_seqeval(tmp_path, tiny_model_dir):
    """NER through the evaluate job: entity-level scores equal seqeval's on its predictions."""
    import torch
    from seqeval.metrics import f1_score as seq_f1
    from transformers import AutoModelForTokenClassification, AutoTokenizer

    conll = tmp_path / "ner.conll"
    sentences = [
        [("Familial", "B-Disease"), ("polyposis", "I-Disease"), ("is", "O"), ("rare", "O")],
        [("BRCA1", "O"), ("causes", "O"), ("breast", "B-Disease"), ("cancer", "I-Disease")],
        [("No", "O"), ("disease", "O")],
    ]
    conll.write_text(
        "\n\n".join("\n".join(f"{w}\tNN\tO\t{t}" for w, t in s) for s in sentences * 5) + "\n"
    )
    done = run(
        "prepare",
        str(REPO / "jobs/prepare.yaml"),
        "cluster=none",
        f"run.dir={tmp_path}",
        f"data.train={conll}",
        f"data.test={conll}",
        "data.format=conll",
        "task=token_classification",
        f"model.name_or_path={tiny_model_dir}",
        "data.examples_per_shard=4",
    )
    assert done.returncode == 0, done.stderr
    labels = ["B-Disease", "I-Disease", "O"]
    torch.manual_seed(1)
    model = AutoModelForTokenClassification.from_pretrained(
        tiny_model_dir,
        num_labels=3,
        id2label=dict(enumerate(labels)),
        label2id={n: i for i, n in enumerate(labels)},
        ignore_mismatched_sizes=True,
    )
    with torch.no_grad():
        model.classifier.weight.normal_(0, 5.0)
    model.save_pretrained(tmp_path / "model")
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(tmp_path / "model")
    result = run(
        "evaluate",
        EVALUATE,
        f"run.dir={tmp_path / 'eval'}",
        "cluster=none",
        f"data.shards={tmp_path / 'shards'}",
        "task=token_classification",
        f"model.name_or_path={tmp_path / 'model'}",
        "eval.predictions=true",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "eval" / "eval.json").read_text())
    lines = (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()
    rows = [json.loads(x) for x in lines]
    gold = [r["gold"] for r in rows]  # tag names, one per word
    pred = [r["pred"] for r in rows]
    assert gold == [[t for _, t in s] for s in sentences * 5]  # one tag per word, in order
    assert {t for p in pred for t in p} <= set(labels)
    assert report["metrics"]["f1"] == pytest.approx(seq_f1(gold, pred))
    assert set(report["metrics"]) >= {"precision", "recall", "f1", "token_accuracy"}
