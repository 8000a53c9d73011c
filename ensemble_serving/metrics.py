"""Classification metrics shared by the trainer and the client (numpy only).

matplotlib is imported inside save_confusion_matrix_png so that importing this module
costs nothing for code that only needs the numbers.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

__all__ = [
    "accuracy",
    "confusion_matrix",
    "expected_calibration_error",
    "per_class_metrics",
    "save_confusion_matrix_png",
    "top_k_accuracy",
]


def _as_labels(values, name: str) -> np.ndarray:
    array = np.asarray(values)
    if array.ndim != 1:
        raise ValueError(f"{name} must be 1-d, got shape {array.shape}")
    if array.size and not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"{name} must hold integer class indices, got dtype {array.dtype}")
    return array.astype(np.int64, copy=False)


def _as_probabilities(probabilities, labels) -> tuple[np.ndarray, np.ndarray]:
    probs = np.asarray(probabilities, dtype=np.float64)
    labels = _as_labels(labels, "labels")
    if probs.ndim != 2 or probs.shape[0] != labels.shape[0]:
        raise ValueError(f"probabilities must be [N, C] with N = len(labels) = {len(labels)}, got {probs.shape}")
    return probs, labels


def accuracy(labels, predictions) -> float:
    labels = _as_labels(labels, "labels")
    predictions = _as_labels(predictions, "predictions")
    if labels.shape != predictions.shape:
        raise ValueError(f"labels {labels.shape} and predictions {predictions.shape} differ in length")
    return float((labels == predictions).mean()) if labels.size else float("nan")


def confusion_matrix(labels, predictions, num_classes: int) -> np.ndarray:
    """int64 [C, C]; cm[i, j] counts samples of true class i predicted as class j."""
    labels = _as_labels(labels, "labels")
    predictions = _as_labels(predictions, "predictions")
    if labels.shape != predictions.shape:
        raise ValueError(f"labels {labels.shape} and predictions {predictions.shape} differ in length")
    for name, values in (("labels", labels), ("predictions", predictions)):
        if values.size and (values.min() < 0 or values.max() >= num_classes):
            raise ValueError(f"{name} must lie in 0..{num_classes - 1}, got {values.min()}..{values.max()}")
    flat = labels * num_classes + predictions
    return np.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes).astype(np.int64)


def per_class_metrics(cm, class_names) -> list[dict]:
    """Precision, recall (= per-class accuracy), F1 and support for each class.

    A class never predicted has precision 0 (not NaN) so tables and CSVs stay numeric.
    """
    cm = np.asarray(cm, dtype=np.int64)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1] or cm.shape[0] != len(class_names):
        raise ValueError(f"confusion matrix {cm.shape} does not match {len(class_names)} class names")
    true_positives = np.diag(cm).astype(np.float64)
    support = cm.sum(axis=1)
    predicted = cm.sum(axis=0)
    rows = []
    for index, name in enumerate(class_names):
        precision = true_positives[index] / predicted[index] if predicted[index] else 0.0
        recall = true_positives[index] / support[index] if support[index] else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        rows.append(
            {
                "class": str(name),
                "precision": float(precision),
                "recall": float(recall),
                "f1": float(f1),
                "support": int(support[index]),
            }
        )
    return rows


def row_normalized(cm) -> np.ndarray:
    """Each row of a confusion matrix divided by its sum (recall on the diagonal); empty rows stay 0."""
    cm = np.asarray(cm)
    row_sums = cm.sum(axis=1, keepdims=True)
    return np.divide(cm, row_sums, out=np.zeros(cm.shape, dtype=np.float64), where=row_sums > 0)


def top_k_accuracy(probabilities, labels, k: int) -> float:
    """Fraction of samples whose true class is among the k highest scores."""
    probs, labels = _as_probabilities(probabilities, labels)
    if not 1 <= k <= probs.shape[1]:
        raise ValueError(f"k must be in 1..{probs.shape[1]}, got {k}")
    if labels.size == 0:
        return float("nan")
    # A sample counts when fewer than k classes score strictly higher than the true one,
    # which is well defined under ties (unlike "is it in argsort[-k:]").
    true_scores = probs[np.arange(len(labels)), labels]
    higher = (probs > true_scores[:, None]).sum(axis=1)
    return float((higher < k).mean())


def expected_calibration_error(probabilities, labels, n_bins: int = 15) -> float:
    """ECE with equal-width confidence bins: sum over bins of |accuracy - confidence| * share."""
    probs, labels = _as_probabilities(probabilities, labels)
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    if labels.size == 0:
        return float("nan")
    confidence = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == labels).astype(np.float64)
    # Bin i holds confidences in (i/n, (i+1)/n]; a confidence of exactly 0 goes to bin 0.
    bins = np.clip(np.ceil(confidence * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    ece = 0.0
    for b in range(n_bins):
        in_bin = bins == b
        if in_bin.any():
            ece += abs(correct[in_bin].mean() - confidence[in_bin].mean()) * in_bin.mean()
    return float(ece)


def save_confusion_matrix_png(
    cm,
    class_names,
    path: str | os.PathLike,
    title: str = "",
    normalize: bool = False,
) -> None:
    """Heat map with counts (or row-normalized rates) written in each cell."""
    # A bare Figure (no pyplot) renders to a file without touching global backend state.
    from matplotlib.figure import Figure

    cm = np.asarray(cm)
    num_classes = len(class_names)
    if cm.shape != (num_classes, num_classes):
        raise ValueError(f"confusion matrix {cm.shape} does not match {num_classes} class names")
    shown = row_normalized(cm) if normalize else cm

    size = max(5.0, 0.6 * num_classes + 2.0)
    fig = Figure(figsize=(size, size * 0.9))
    ax = fig.subplots()
    image = ax.imshow(shown, cmap="Blues")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    ax.set_xticks(range(num_classes), labels=[str(n) for n in class_names], rotation=45, ha="right")
    ax.set_yticks(range(num_classes), labels=[str(n) for n in class_names])
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    if title:
        ax.set_title(title)
    threshold = shown.max() / 2 if shown.size else 0
    for i in range(num_classes):
        for j in range(num_classes):
            text = f"{shown[i, j]:.2f}" if normalize else str(int(shown[i, j]))
            ax.text(j, i, text, ha="center", va="center", fontsize=7,
                    color="white" if shown[i, j] > threshold else "black")  # fmt: skip
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
