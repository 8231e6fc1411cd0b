"""Distillation into a smaller student: building it, the recipe rules, the compress step."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from scilm_hpc.compress.distill import (
    build_student,
    default_layers,
    hidden_layer_map,
    hidden_state_loss,
)
from scilm_hpc.errors import UserError
from scilm_hpc.schema import CompressStep, StudentSpec, TrainConfig

from .conftest import REPO, scilm_run

COMPRESS = str(REPO / "jobs" / "compress.yaml")


def bert_teacher(layers: int = 4, labels: int = 3) -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=64,
        num_labels=labels,
    )
    return BertForSequenceClassification(config).eval()


def esm_teacher() -> nn.Module:
    from transformers import EsmConfig, EsmForTokenClassification

    torch.manual_seed(0)
    config = EsmConfig(
        vocab_size=33,
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=64,
        pad_token_id=1,
        mask_token_id=32,
        position_embedding_type="rotary",
        num_labels=2,
    )
    return EsmForTokenClassification(config).eval()


def ids(vocab: int = 100) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return {
        "input_ids": torch.randint(5, vocab, (3, 10), generator=g),
        "attention_mask": torch.ones(3, 10, dtype=torch.long),
    }


def test_default_layers_are_spread_and_keep_the_ends():
    assert default_layers(12, 6) == [0, 2, 4, 7, 9, 11]
    assert default_layers(4, 2) == [0, 3]
    assert default_layers(2, 1) == [1]
    assert default_layers(3, 3) == [0, 1, 2]


@pytest.mark.parametrize("make,stack", [(bert_teacher, "bert"), (esm_teacher, "esm")])
def test_student_has_the_requested_layers_copied_from_the_teachers(make, stack, tmp_path):
    teacher = make()
    spec = StudentSpec(num_hidden_layers=2, layers=[1, 3])
    student = build_student(teacher, spec, "classification", "compress.steps.0")
    if stack == "esm":
        student = build_student(teacher, spec, "token_classification", "compress.steps.0")
    t_layers = getattr(teacher, stack).encoder.layer
    s_layers = getattr(student, stack).encoder.layer
    assert len(s_layers) == student.config.num_hidden_layers == 2
    for s, t in ((0, 1), (1, 3)):
        for (name, a), (_, b) in zip(
            s_layers[s].state_dict().items(), t_layers[t].state_dict().items(), strict=True
        ):
            assert torch.equal(a, b), name
    head = "classifier"
    assert torch.equal(getattr(student, head).weight, getattr(teacher, head).weight)
    emb = getattr(student, stack).embeddings.word_embeddings.weight
    assert torch.equal(emb, getattr(teacher, stack).embeddings.word_embeddings.weight)
    assert sum(p.numel() for p in student.parameters()) < sum(
        p.numel() for p in teacher.parameters()
    )
    # a plain HF directory: loads with from_pretrained and computes the same
    student.eval().save_pretrained(tmp_path)
    loaded = type(student).from_pretrained(tmp_path).eval()
    batch = ids(33 if stack == "esm" else 100)
    with torch.no_grad():
        assert torch.allclose(loaded(**batch).logits, student(**batch).logits, atol=1e-6)


def test_a_narrower_student_starts_from_leading_slices():
    teacher = bert_teacher()
    spec = StudentSpec(num_hidden_layers=1, hidden_size=16, intermediate_size=32)
    student = build_student(teacher, spec, "classification", "k")
    assert student.config.hidden_size == 16 and student.config.intermediate_size == 32
    dense = student.bert.encoder.layer[0].intermediate.dense.weight
    assert dense.shape == (32, 16)
    assert torch.equal(dense, teacher.bert.encoder.layer[3].intermediate.dense.weight[:32, :16])
    with torch.no_grad():
        assert student.eval()(**ids()).logits.shape == (3, 3)


@pytest.mark.parametrize(
    "spec,message",
    [
        (StudentSpec(num_hidden_layers=5), "the teacher has 4 layers, a student 1 to 4"),
        (StudentSpec(layers=[0, 4]), "give 2 teacher layer indices from 0 to 3"),
        (StudentSpec(hidden_size=64), "at most as wide as the teacher (32)"),
        (StudentSpec(hidden_size=30), "not a multiple of num_attention_heads 4"),
    ],
)
def test_a_student_that_does_not_fit_the_teacher_is_refused(spec, message):
    with pytest.raises(UserError) as err:
        build_student(bert_teacher(), spec, "classification", "compress.steps.0")
    assert message in str(err.value) and "compress.steps.0.student" in str(err.value)


@pytest.mark.parametrize(
    "overrides,message",
    [
        (
            ["compress=prune50-recover", "compress.steps.1.kind=distill"],
            "compress.steps.1: a distill step trains a student from the dense model",
        ),
        (["compress.steps.0.steps=0"], "a distill step needs steps >= 1"),
        (
            [
                "compress.steps.0.student.layers=[0,1]",
                "compress.steps.0.student.num_hidden_layers=3",
            ],
            "2 teacher layers given for num_hidden_layers 3",
        ),
        (
            ["compress.steps.0.student.name_or_path=x", "compress.steps.0.student.hidden_size=8"],
            "name_or_path gives the student; remove hidden_size",
        ),
        (["compress.steps.0.student.layerz=1"], "did you mean 'compress.steps.0.student.layers'"),
        (["zero.stage=3"], "distill training runs on one task"),
        (
            ["compress.steps.0.hidden_mse=1", "compress.steps.0.student.hidden_size=16"],
            "compress.steps.0.hidden_mse: the student is narrower than the teacher",
        ),
        (["compress.steps.0.hidden_mse=-1"], "compress.steps.0.hidden_mse: got -1.0; must be"),
        (
            ["compress=prune50-recover", "compress.steps.1.hidden_mse=1"],
            "hidden-state matching is part of a distill step; this step is recover",
        ),
    ],
)
def test_bad_distill_recipes_are_refused_before_running(scilm, tmp_path, overrides, message):
    run = tmp_path / "run"
    code, _, err = scilm(
        "compress", COMPRESS, f"run.dir={run}", "compress=distill-half", *overrides
    )
    assert code == 2 and message in err, err
    assert not run.exists()


def _hidden(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    return model(**batch, output_hidden_states=True).hidden_states


def test_hidden_mse_is_zero_on_the_teachers_own_layers_and_trains_the_student():
    """Student layers 0, 1 of a 4-layer teacher compute exactly the teacher's layers 0, 1:
    the hidden-state term is 0. Layers 0 and 3 (the default spread) differ after the
    first: positive, and its gradient reaches both student layers."""
    teacher = bert_teacher()
    batch = ids()
    batch["attention_mask"][1, 6:] = 0  # padding: not compared
    teacher_hidden = _hidden(teacher, batch)
    for spec, expected in ((StudentSpec(layers=[0, 1]), [0, 1]), (StudentSpec(), [0, 3])):
        student = build_student(teacher, spec, "classification", "k").eval()
        layers = hidden_layer_map(teacher.config, student.config, spec, "k")
        assert layers == expected
        loss = hidden_state_loss(_hidden(student, batch), teacher_hidden, layers,
                                 batch["attention_mask"])  # fmt: skip
        if expected == [0, 1]:
            assert float(loss.detach()) == 0.0
            continue
        assert float(loss.detach()) > 1e-4
        loss.backward()
        for layer in student.bert.encoder.layer:
            assert layer.output.dense.weight.grad.abs().sum() > 0
    # by hand: layer 1 against teacher layer 3, real tokens only
    keep = batch["attention_mask"].bool()
    with torch.no_grad():
        s = _hidden(student, batch)
        by_hand = (F.mse_loss(s[1][keep], teacher_hidden[1][keep])
                   + F.mse_loss(s[2][keep], teacher_hidden[4][keep])) / 2  # fmt: skip
    assert float(loss.detach()) == pytest.approx(float(by_hand), rel=1e-6)


def test_distill_trainer_adds_the_weighted_hidden_term_to_its_loss():
    """``compute_loss`` with ``hidden_mse`` = the KD and task loss + weight x the term;
    the term changes the student's gradient."""
    from scilm_hpc.tasks import get_task
    from scilm_hpc.train.recovery import RecoveryTrainer

    teacher = bert_teacher()
    student = build_student(teacher, StudentSpec(), "classification", "k").eval()
    batch = {**ids(), "labels": torch.tensor([0, 2, 1])}

    def loss_and_grad(layers: list[int] | None) -> tuple[float, torch.Tensor]:
        trainer = SimpleNamespace(
            gradual=None,
            task=get_task("classification"),
            teacher=teacher,
            step=CompressStep(kind="distill", alpha=0.5, temperature=2.0, hidden_mse=3.0),
            hidden_layers=layers,
            job=SimpleNamespace(task="classification", train=TrainConfig()),
            labels=["a", "b", "c"],
        )
        student.zero_grad()
        loss = RecoveryTrainer.compute_loss(trainer, student, batch)  # type: ignore[arg-type]
        loss.backward()
        return float(loss.detach()), student.bert.encoder.layer[0].output.dense.weight.grad.clone()

    plain, plain_grad = loss_and_grad(None)
    matched, matched_grad = loss_and_grad([0, 3])
    with torch.no_grad():
        term = hidden_state_loss(_hidden(student, batch), _hidden(teacher, batch), [0, 3],
                                 batch["attention_mask"])  # fmt: skip
    assert matched == pytest.approx(plain + 3.0 * float(term), rel=1e-5)
    assert not torch.allclose(plain_grad, matched_grad)


def test_hidden_mse_needs_a_student_of_the_teachers_width():
    teacher = bert_teacher()
    narrow = build_student(teacher, StudentSpec(hidden_size=16), "classification", "k")
    with pytest.raises(UserError, match="k.hidden_mse: the student's hidden_size 16 differs"):
        hidden_layer_map(teacher.config, narrow.config, StudentSpec(name_or_path="x"), "k")
    # a student of its own (by path) is matched with the default spread of teacher layers
    same = build_student(teacher, StudentSpec(num_hidden_layers=3), "classification", "k")
    assert hidden_layer_map(teacher.config, same.config, StudentSpec(name_or_path="x"), "k") == [
        0,
        2,
        3,
    ]


# --- the compress step end to end ------------------------------------------------------------


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, shards, tiny_model_dir) -> Path:
    """A 4-layer random BERT on the demo shards' labels, its layers and head scaled up: its
    soft targets are confident, unrelated to the labels and far from those of a student
    missing two of its layers, so only the distillation term pulls a student to it."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from scilm_hpc.data.dataset import ShardDataset

    labels = ShardDataset(shards, "train").label_names
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={n: i for i, n in enumerate(labels)},
    )
    model = BertForSequenceClassification(config)
    with torch.no_grad():  # layers that matter (a random BERT's barely change its input)
        for layer in model.bert.encoder.layer:
            for linear in (layer.attention.self.value, layer.attention.output.dense):
                linear.weight.mul_(10.0)
            layer.intermediate.dense.weight.mul_(10.0)
            layer.output.dense.weight.mul_(10.0)
        model.bert.pooler.dense.weight.mul_(30.0)
        model.classifier.weight.mul_(30.0)
    out = tmp_path_factory.mktemp("teacher")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def distill(run: Path, shards: Path, teacher: Path, *extra: str, fault: str | None = None):
    return scilm_run(
        "compress",
        COMPRESS,
        f"run.dir={run}",
        f"data.shards={shards}",
        f"model.name_or_path={teacher}",
        "cluster=none",
        "compress=distill-half",
        "compress.steps.0.steps=8",
        "compress.latency_repeats=2",
        "train.checkpoint_every=4",
        "train.micro_batch_size=8",
        "train.lr=1e-3",
        *extra,
        fault=fault,
    )


@torch.no_grad()
def kl_to_teacher(student: nn.Module, teacher: nn.Module, shards: Path) -> float:
    from scilm_hpc.data.dataset import ShardDataset
    from scilm_hpc.tasks import get_task

    dev = ShardDataset(shards, "dev")
    batch = get_task("classification").collate([dev[i] for i in range(len(dev))], 0)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    log_t = F.log_softmax(teacher.eval()(**inputs).logits, -1)
    log_s = F.log_softmax(student.eval()(**inputs).logits, -1)
    return float(F.kl_div(log_s, log_t, log_target=True, reduction="batchmean"))


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_distill_step_trains_a_smaller_student_towards_the_teacher_and_resumes(
    tmp_path, shards, teacher_dir
):
    from transformers import AutoModelForSequenceClassification

    killed = tmp_path / "killed"
    first = distill(killed, shards, teacher_dir, fault="kill_after_checkpoint:4")
    assert first.returncode != 0 and not (killed / "compressed").exists()
    again = distill(killed, shards, teacher_dir)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming from step_4" in again.stdout

    steps = killed / "steps"
    student = AutoModelForSequenceClassification.from_pretrained(killed / "compressed")
    assert student.config.num_hidden_layers == len(student.bert.encoder.layer) == 2
    teacher = AutoModelForSequenceClassification.from_pretrained(teacher_dir)
    init = AutoModelForSequenceClassification.from_pretrained(steps / "01-distill-8.student")
    before, after = (kl_to_teacher(m, teacher, shards) for m in (init, student))
    # recipe's alpha 0.5: 0.049 -> 0.027 here; the task loss alone (alpha 0) takes the
    # student away from this teacher (0.049 -> 2.0)
    assert after < 0.75 * before, (before, after)

    report = json.loads((killed / "compress_report.json").read_text())
    entry, base = report["steps"][0], report["baseline"]
    assert entry["name"] == "distill-8" and entry["architecture"]["num_hidden_layers"] == 2
    assert base["architecture"]["num_hidden_layers"] == 4
    assert entry["params"] < base["params"] and entry["size_bytes"] < base["size_bytes"]
    assert entry["latency_ms"] > 0 and "macro_f1" in entry["metrics"]
    markdown = (killed / "compress_report.md").read_text()
    assert "| teacher (dense) | 4 | 32 |" in markdown and "| distill-8 | 2 | 32 |" in markdown

    # the same recipe straight through gives the same student, bit for bit
    straight = tmp_path / "straight"
    done = distill(straight, shards, teacher_dir)
    assert done.returncode == 0, done.stderr[-3000:]
    a = load_file(straight / "compressed" / "model.safetensors")
    b = load_file(killed / "compressed" / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
