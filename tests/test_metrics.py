from __future__ import annotations

import numpy as np
import pytest

from ensemble_serving.metrics import (
    accuracy,
    confusion_matrix,
    expected_calibration_error,
    per_class_metrics,
    save_confusion_matrix_png,
    top_k_accuracy,
)


def test_confusion_matrix_rows_are_true_classes():
    labels = [0, 0, 1, 2, 2, 2]
    predictions = [0, 1, 1, 2, 0, 2]
    cm = confusion_matrix(labels, predictions, 3)
    assert cm.dtype == np.int64
    assert cm.tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 2]]
    assert accuracy(labels, predictions) == pytest.approx(4 / 6)


def test_confusion_matrix_rejects_out_of_range_classes():
    with pytest.raises(ValueError, match="predictions must lie in 0..2"):
        confusion_matrix([0, 1], [0, 3], 3)


def test_per_class_metrics_by_hand():
    cm = np.array([[1, 1, 0], [0, 1, 0], [1, 0, 2]])
    rows = per_class_metrics(cm, ["a", "b", "c"])
    assert [r["class"] for r in rows] == ["a", "b", "c"]
    a, b, c = rows
    assert a["precision"] == pytest.approx(1 / 2) and a["recall"] == pytest.approx(1 / 2)
    assert b["precision"] == pytest.approx(1 / 2) and b["recall"] == pytest.approx(1.0)
    assert b["f1"] == pytest.approx(2 * 0.5 * 1.0 / 1.5)
    assert c["precision"] == pytest.approx(1.0) and c["recall"] == pytest.approx(2 / 3)
    assert [r["support"] for r in rows] == [2, 1, 3]


def test_per_class_metrics_class_never_predicted_is_zero_not_nan():
    rows = per_class_metrics(np.array([[2, 0], [1, 0]]), ["x", "y"])
    assert rows[1] == {"class": "y", "precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}


def test_top_k_accuracy():
    probs = np.array([[0.6, 0.3, 0.1], [0.2, 0.3, 0.5], [0.1, 0.2, 0.7]])
    labels = [0, 1, 0]
    assert top_k_accuracy(probs, labels, 1) == pytest.approx(1 / 3)
    assert top_k_accuracy(probs, labels, 2) == pytest.approx(2 / 3)
    assert top_k_accuracy(probs, labels, 3) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="k must be in 1..3"):
        top_k_accuracy(probs, labels, 4)


def test_expected_calibration_error():
    # Perfectly calibrated: confidence 1.0 and always right.
    assert expected_calibration_error(np.eye(3), [0, 1, 2]) == pytest.approx(0.0)
    # Confidence 0.9 on every sample but right half the time: ECE = |0.5 - 0.9| = 0.4.
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.1, 0.9], [0.1, 0.9]])
    assert expected_calibration_error(probs, [0, 1, 1, 0], n_bins=10) == pytest.approx(0.4)


def test_save_confusion_matrix_png(tmp_path):
    cm = confusion_matrix([0, 1, 2, 2], [0, 2, 2, 2], 3)
    for normalize in (False, True):
        path = tmp_path / f"cm-{normalize}.png"
        save_confusion_matrix_png(cm, ["cat", "dog", "frog"], path, title="test", normalize=normalize)
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert path.stat().st_size > 5000
