"""Metrics against the reference implementations (scikit-learn, seqeval)."""

from __future__ import annotations

import math
import random
import warnings

import numpy as np
import pytest
from seqeval import metrics as seqeval_metrics
from sklearn import metrics as sk

from scilm_hpc.evaluate.metrics import (
    bio_entities,
    classification_metrics,
    entity_metrics,
    lm_metrics,
)

LABELS = ["background", "method", "result", "other"]


@pytest.fixture(autouse=True)
def _quiet_reference_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn / seqeval warn about zero divisions
        yield


def assert_matches_sklearn(y_true: list[int], y_pred: list[int], labels: list[str]) -> None:
    got = classification_metrics(y_true, y_pred, labels)
    ids = list(range(len(labels)))
    assert got["accuracy"] == pytest.approx(sk.accuracy_score(y_true, y_pred))
    for average in ("macro", "micro", "weighted"):
        assert got[f"{average}_f1"] == pytest.approx(
            sk.f1_score(y_true, y_pred, average=average, zero_division=0)
        ), average
    p, r, f, s = sk.precision_recall_fscore_support(y_true, y_pred, labels=ids, zero_division=0)
    for i, name in enumerate(labels):
        per = got["per_class"][name]
        assert per["precision"] == pytest.approx(p[i]), name
        assert per["recall"] == pytest.approx(r[i]), name
        assert per["f1"] == pytest.approx(f[i]), name
        assert per["support"] == s[i]
    assert got["confusion_matrix"] == sk.confusion_matrix(y_true, y_pred, labels=ids).tolist()


@pytest.mark.parametrize("seed", range(8))
def test_classification_matches_sklearn_on_random_predictions(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 200))
    y_true = rng.integers(0, len(LABELS), size=n).tolist()
    # predictions mostly right, some noise
    y_pred = [t if rng.random() < 0.6 else int(rng.integers(0, len(LABELS))) for t in y_true]
    assert_matches_sklearn(y_true, y_pred, LABELS)


@pytest.mark.parametrize("seed", range(5))
def test_classification_matches_sklearn_with_a_class_never_predicted(seed):
    rng = np.random.default_rng(100 + seed)
    y_true = rng.integers(0, 4, size=60).tolist()
    y_pred = rng.integers(0, 3, size=60).tolist()  # class 3 ("other") is never predicted
    assert 3 in y_true and 3 not in y_pred
    assert_matches_sklearn(y_true, y_pred, LABELS)
    assert classification_metrics(y_true, y_pred, LABELS)["per_class"]["other"]["recall"] == 0


def test_classification_with_a_label_absent_from_both():
    # a label of the label map that occurs in neither gold nor predictions does not count
    y_true, y_pred = [0, 0, 1, 1, 2], [0, 1, 1, 1, 2]
    got = classification_metrics(y_true, y_pred, LABELS)
    assert got["macro_f1"] == pytest.approx(sk.f1_score(y_true, y_pred, average="macro"))
    assert got["per_class"]["other"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert np.array(got["confusion_matrix"]).shape == (4, 4)


def test_classification_macro_f1_counts_a_class_only_predicted():
    y_true, y_pred = [0, 0, 1, 1], [0, 2, 1, 1]  # class 2 predicted once, never gold
    got = classification_metrics(y_true, y_pred, ["a", "b", "c"])
    assert got["macro_f1"] == pytest.approx(sk.f1_score(y_true, y_pred, average="macro"))


def test_classification_perfect_and_empty():
    got = classification_metrics([0, 1, 2], [0, 1, 2], LABELS[:3])
    assert got["accuracy"] == got["macro_f1"] == got["micro_f1"] == got["weighted_f1"] == 1.0
    empty = classification_metrics([], [], LABELS)
    assert empty["accuracy"] == empty["macro_f1"] == empty["weighted_f1"] == 0.0
    assert empty["confusion_matrix"] == [[0] * 4] * 4


# --- entities -------------------------------------------------------------------------

TAGS = ["O", "O", "B-Disease", "I-Disease", "B-Chemical", "I-Chemical"]


def random_tag_sequences(seed: int) -> tuple[list[list[str]], list[list[str]]]:
    r = random.Random(seed)
    gold = [[r.choice(TAGS) for _ in range(r.randint(1, 15))] for _ in range(r.randint(1, 25))]
    pred = [[t if r.random() < 0.5 else r.choice(TAGS) for t in sent] for sent in gold]
    return gold, pred


@pytest.mark.parametrize("seed", range(30))
def test_entity_metrics_match_seqeval(seed):
    gold, pred = random_tag_sequences(seed)
    got = entity_metrics(gold, pred)
    assert got["precision"] == pytest.approx(seqeval_metrics.precision_score(gold, pred))
    assert got["recall"] == pytest.approx(seqeval_metrics.recall_score(gold, pred))
    assert got["f1"] == pytest.approx(seqeval_metrics.f1_score(gold, pred))
    assert got["token_accuracy"] == pytest.approx(seqeval_metrics.accuracy_score(gold, pred))


@pytest.mark.parametrize("seed", range(30))
def test_bio_entities_match_seqeval_spans(seed):
    from seqeval.metrics.sequence_labeling import get_entities

    for sentence in random_tag_sequences(seed)[0]:
        assert bio_entities(sentence) == {
            (kind, start, end + 1) for kind, start, end in get_entities(sentence)
        }


def test_entity_metrics_with_stray_inside_tags():
    gold = [["B-Disease", "I-Disease", "O", "B-Chemical"]]
    pred = [["I-Disease", "I-Disease", "O", "I-Chemical"]]  # stray I- start entities
    got = entity_metrics(gold, pred)
    assert got["precision"] == got["recall"] == got["f1"] == 1.0
    assert got["token_accuracy"] == 0.5
    assert seqeval_metrics.f1_score(gold, pred) == 1.0


def test_entity_metrics_boundaries_and_types_must_match():
    gold = [["B-Disease", "I-Disease", "I-Disease", "O"], ["B-Chemical", "O"]]
    pred = [["B-Disease", "I-Disease", "O", "O"], ["B-Disease", "O"]]
    got = entity_metrics(gold, pred)
    assert got["precision"] == got["recall"] == got["f1"] == 0.0
    assert got["token_accuracy"] == pytest.approx(4 / 6)


def test_entity_metrics_no_entities_and_empty():
    assert entity_metrics([["O", "O"]], [["O", "O"]]) == {
        "precision": 0.0,
        "recall": 0.0,
        "f1": 0.0,
        "token_accuracy": 1.0,
    }
    assert entity_metrics([], [])["token_accuracy"] == 0.0
    with pytest.raises(ValueError):
        entity_metrics([["O", "O"]], [["O"]])  # lengths must agree


@pytest.mark.parametrize(
    ("tags", "spans"),
    [
        ([], set()),
        (["O", "O"], set()),
        (["B-D"], {("D", 0, 1)}),
        (["B-D", "I-D", "I-D"], {("D", 0, 3)}),
        (["O", "B-D", "I-D", "O", "B-C"], {("D", 1, 3), ("C", 4, 5)}),
        (["B-D", "B-D"], {("D", 0, 1), ("D", 1, 2)}),  # B- always starts a new entity
        (["I-D", "I-D"], {("D", 0, 2)}),  # a stray I- starts an entity
        (["O", "I-D"], {("D", 1, 2)}),
        (["B-D", "I-C", "I-C"], {("D", 0, 1), ("C", 1, 3)}),  # type change starts a new one
        (["B-D", "I-D", "I-C", "O", "I-D"], {("D", 0, 2), ("C", 2, 3), ("D", 4, 5)}),
        (["B-Gene-Protein", "I-Gene-Protein"], {("Gene-Protein", 0, 2)}),  # hyphenated type
    ],
)
def test_bio_entities_hand_written(tags, spans):
    assert bio_entities(tags) == spans


# --- language modelling ---------------------------------------------------------------


@pytest.mark.parametrize(("total", "tokens"), [(0.0, 10), (23.5, 10), (4.2, 3), (1e3, 400)])
def test_lm_perplexity_is_exp_of_mean_loss(total, tokens):
    got = lm_metrics(total, tokens)
    assert got["loss"] == pytest.approx(total / tokens)
    assert got["perplexity"] == pytest.approx(math.exp(total / tokens))


def test_lm_metrics_extremes():
    assert lm_metrics(0.0, 5)["perplexity"] == 1.0
    huge = lm_metrics(1e6, 10)  # capped, not an overflow
    assert math.isfinite(huge["perplexity"]) and huge["loss"] == 1e5
    none = lm_metrics(0.0, 0)
    assert math.isnan(none["loss"]) and math.isnan(none["perplexity"])
