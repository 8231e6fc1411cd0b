"""``train.loss=huber`` (regression) and ``train.class_weights`` (classification, per-token
tags): the loss the trainer minimises, against torch's reference, and the config rules."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from scilm_hpc.errors import UserError
from scilm_hpc.schema import TrainConfig
from scilm_hpc.tasks import get_task
from scilm_hpc.tasks.base import class_weight_tensor
from scilm_hpc.train.loop import Trainer

from .conftest import REPO


def tiny(kind: str, labels: int):
    import transformers

    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        num_labels=labels,
        problem_type="regression" if kind == "regression" else None,
    )
    auto = "ForTokenClassification" if kind == "token" else "ForSequenceClassification"
    return getattr(transformers, "Bert" + auto)(config).eval()


def loss_of(task: str, model, batch, labels, **train) -> torch.Tensor:
    """The loss ``Trainer.compute_loss`` computes for ``batch`` under those settings."""
    trainer = SimpleNamespace(
        task=get_task(task, {"task_state": {"label_mean": [0.0], "label_std": [1.0]}}),
        job=SimpleNamespace(train=TrainConfig(**train)),
        labels=labels,
    )
    with torch.no_grad():
        return Trainer.compute_loss(trainer, model, batch)  # type: ignore[arg-type]


def inputs(n: int = 6, length: int = 7) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    return {
        "input_ids": torch.randint(5, 50, (n, length), generator=g),
        "attention_mask": torch.ones(n, length, dtype=torch.long),
    }


def test_huber_regression_loss_is_torchs_and_auto_stays_mse():
    model = tiny("regression", 1)
    batch = {**inputs(), "labels": torch.tensor([[3.0], [-2.0], [0.1], [0.0], [5.0], [-0.2]])}
    with torch.no_grad():
        logits = model(**inputs()).logits
    huber = loss_of("regression", model, batch, [], loss="huber", huber_delta=0.5)
    assert huber == pytest.approx(float(F.huber_loss(logits, batch["labels"], delta=0.5)))
    mse = loss_of("regression", model, batch, [])
    assert mse == pytest.approx(float(F.mse_loss(logits, batch["labels"])))
    assert abs(float(huber) - float(mse)) > 0.1  # large errors count linearly


def test_class_weights_weight_the_cross_entropy():
    model = tiny("sequence", 2)
    batch = {**inputs(), "labels": torch.tensor([0, 1, 1, 0, 0, 0])}
    with torch.no_grad():
        logits = model(**inputs()).logits
    weighted = loss_of("classification", model, batch, ["N", "P"], class_weights={"P": 9.0})
    reference = F.cross_entropy(logits, batch["labels"], weight=torch.tensor([1.0, 9.0]))
    assert weighted == pytest.approx(float(reference))
    plain = loss_of("classification", model, batch, ["N", "P"])
    assert plain == pytest.approx(float(F.cross_entropy(logits, batch["labels"])))
    assert abs(float(weighted) - float(plain)) > 1e-4


def test_class_weights_per_residue_skip_the_ignored_positions():
    model = tiny("token", 2)
    labels = torch.randint(0, 2, (6, 7), generator=torch.Generator().manual_seed(5))
    labels[:, 0] = labels[:, -1] = -100  # <cls> / <eos>
    batch = {**inputs(), "labels": labels}
    with torch.no_grad():
        logits = model(**inputs()).logits
    weighted = loss_of("token_classification", model, batch, ["N", "P"], class_weights={"P": 4})
    keep = labels != -100
    per_token = F.cross_entropy(logits[keep], labels[keep], reduction="none")
    weights = torch.where(labels[keep] == 1, 4.0, 1.0)
    assert weighted == pytest.approx(float((per_token * weights).sum() / weights.sum()))


def test_unknown_class_names_are_refused():
    with pytest.raises(UserError, match=r"train.class_weights: Q not in .*\(N, P\)"):
        class_weight_tensor({"Q": 2.0}, ["N", "P"])
    assert class_weight_tensor({}, ["N", "P"]) is None


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["train.loss=huber"], "huber is a regression loss; task is classification"),
        (["train.loss=l1"], "allowed: auto, huber"),
        (["task=regression", "train.huber_delta=0"], "train.huber_delta: got 0"),
        (["task=regression", "train.class_weights.P=2"], "task is regression"),
        (["train.class_weights.P=0"], "train.class_weights.P: got 0"),
    ],
)
def test_bad_loss_options_are_refused(scilm, tmp_path, overrides, message):
    code, _, err = scilm(
        "validate", str(REPO / "jobs/finetune.yaml"), f"run.dir={tmp_path}", *overrides
    )
    assert code == 2 and message in err, err
