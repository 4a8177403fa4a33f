"""Every metric against values computed by hand on a tiny case."""

import math

import numpy as np
import pytest

from imgclf.inference.metrics import compute_metrics

LABELS = ["a", "b", "c"]
# 4 images: true a, a, b, c
PROBS = np.array(
    [
        [0.7, 0.2, 0.1],  # a -> a (right)
        [0.3, 0.6, 0.1],  # a -> b (wrong), a ranked 2nd
        [0.2, 0.5, 0.3],  # b -> b (right)
        [0.5, 0.1, 0.4],  # c -> a (wrong), c ranked 2nd
    ]
)
TARGETS = [0, 0, 1, 2]


@pytest.fixture(scope="module")
def m():
    return compute_metrics(PROBS, TARGETS, LABELS)


def test_accuracies(m):
    assert m.micro_accuracy == pytest.approx(2 / 4)
    # per-class recall: a 1/2, b 1/1, c 0/1
    assert m.macro_accuracy == pytest.approx((0.5 + 1.0 + 0.0) / 3)


def test_log_loss_and_reduction(m):
    losses = [-math.log(0.7), -math.log(0.3), -math.log(0.5), -math.log(0.4)]
    assert m.log_loss == pytest.approx(sum(losses) / 4)
    prior = -(0.5 * math.log(0.5) + 0.25 * math.log(0.25) + 0.25 * math.log(0.25))
    assert m.log_loss_reduction == pytest.approx((prior - sum(losses) / 4) / prior)
    assert m.per_class_log_loss["a"] == pytest.approx((losses[0] + losses[1]) / 2)
    assert m.per_class_log_loss["b"] == pytest.approx(losses[2])
    assert m.per_class_log_loss["c"] == pytest.approx(losses[3])


def test_top_k(m):
    assert m.top_k_accuracy["1"] == pytest.approx(0.5)
    assert m.top_k_accuracy["2"] == pytest.approx(1.0)
    assert m.top_k_accuracy["3"] == pytest.approx(1.0)


def test_confusion_matrix_and_per_class(m):
    assert m.confusion_matrix == [[1, 1, 0], [0, 1, 0], [1, 0, 0]]
    assert m.per_class["a"] == {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2}
    assert m.per_class["b"]["precision"] == pytest.approx(0.5)
    assert m.per_class["b"]["f1"] == pytest.approx(2 * 0.5 * 1 / 1.5)
    assert m.per_class["c"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}


def test_json_keys_and_text(m):
    d = m.to_dict()
    for key in ("micro_accuracy", "macro_accuracy", "log_loss", "log_loss_reduction", "per_class_log_loss",
                "top_k_accuracy", "confusion_matrix", "labels"):  # fmt: skip
        assert key in d
    text = str(m)
    assert "micro accuracy      0.5000" in text and "confusion matrix" in text


def test_zero_probability_is_clipped_not_infinite():
    m = compute_metrics(np.array([[1.0, 0.0], [0.0, 1.0]]), [1, 1], ["x", "y"])
    assert math.isfinite(m.log_loss) and m.log_loss == pytest.approx(-math.log(1e-15) / 2)
