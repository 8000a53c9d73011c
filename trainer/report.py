"""The training record in a run dir (per-epoch metrics, curves, confusion matrix, per-class
table) and its live counterpart on the terminal, EpochProgress."""

from __future__ import annotations

import contextlib
import csv
import json
from pathlib import Path

import numpy as np

from ensemble_serving.metrics import confusion_matrix, per_class_metrics, save_confusion_matrix_png

HISTORY_FIELDS = ("epoch", "lr", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "epoch_seconds")


def write_history(run_dir: Path, history: list[dict]) -> None:
    """history.json (full) and metrics.csv (one row per epoch; an objective's parts, such as
    distillation's train_kd_loss and train_ce_loss, as further columns after the usual ones)."""
    (run_dir / "history.json").write_text(json.dumps(history, indent=2) + "\n")
    fields = list(HISTORY_FIELDS) + [key for key in _part_keys(history) if key not in HISTORY_FIELDS]
    with open(run_dir / "metrics.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        for row in history:
            writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in fields})


def _part_keys(history: list[dict]) -> list[str]:
    """The objective's extra per-epoch figures (train_<part>), in the order the rows name them."""
    return list(dict.fromkeys(key for row in history for key in row if key not in HISTORY_FIELDS))


def save_curves_png(run_dir: Path, history: list[dict], title: str) -> None:
    """Loss and accuracy per epoch, train vs validation, side by side."""
    from matplotlib.figure import Figure

    epochs = [row["epoch"] for row in history]
    fig = Figure(figsize=(10, 4))
    loss_ax, acc_ax = fig.subplots(1, 2)
    # Training figures come from augmented batches with label smoothing, so they sit above
    # (loss) and below (accuracy) the validation figures; the legend says so.
    train_labels = {"loss": "train loss (augmented, smoothed labels)", "accuracy": "train accuracy (augmented)"}
    for ax, key, label in ((loss_ax, "loss", "loss"), (acc_ax, "accuracy", "accuracy")):
        ax.plot(epochs, [row[f"train_{key}"] for row in history], marker="o", label=train_labels[key])
        if key == "loss":  # the objective's parts (distillation: the KD and hard-label terms), dashed
            for part in (k for k in _part_keys(history) if k.endswith("_loss")):
                values = [row.get(part) for row in history]
                ax.plot(epochs, values, linestyle="--", marker=".", label=part.replace("_", " "))
        val = [row.get(f"val_{key}") for row in history]
        if any(v is not None for v in val):
            ax.plot(epochs, [np.nan if v is None else v for v in val], marker="o", label=f"validation {label}")
        ax.set_xlabel("epoch")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(run_dir / "curves.png", dpi=110)


def write_test_report(run_dir: Path, labels: np.ndarray, probabilities: np.ndarray, class_names: list[str],
                      title: str) -> list[dict]:  # fmt: skip
    """confusion_matrix.{json,png} and per_class.csv for the test set; returns the per-class rows."""
    predictions = probabilities.argmax(axis=1)
    cm = confusion_matrix(labels, predictions, len(class_names))
    rows = per_class_metrics(cm, class_names)
    (run_dir / "confusion_matrix.json").write_text(
        json.dumps({"class_names": class_names, "rows_are": "true class", "matrix": cm.tolist()}, indent=2) + "\n"
    )
    save_confusion_matrix_png(cm, class_names, run_dir / "confusion_matrix.png", title=title)
    with open(run_dir / "per_class.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["class", "accuracy", "precision", "recall", "f1", "support"])
        writer.writeheader()
        for row in rows:
            # Per-class accuracy is the recall: the share of that class's images classified right.
            writer.writerow({"accuracy": f"{row['recall']:.4f}", **{k: _fmt(v) for k, v in row.items()}})
    return rows


def _fmt(value):
    return f"{value:.4f}" if isinstance(value, float) else value


def save_comparison_png(runs: list[dict], path: Path, target: float | None, budget_minutes: float | None) -> None:
    """Test accuracy against training minutes, one labelled point per run.

    `runs`: dicts with name, minutes, test_accuracy and train_samples. Runs trained on a
    reduced set (validation runs) get their own marker, since they saw fewer images.
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 5))
    ax = fig.subplots()
    full = max(run["train_samples"] for run in runs)
    for subset, marker, label in ((True, "o", f"trained on {full:,} images"), (False, "^", "validation runs (fewer images)")):
        points = [run for run in runs if (run["train_samples"] == full) == subset]
        if points:
            ax.scatter([r["minutes"] for r in points], [100 * r["test_accuracy"] for r in points], marker=marker, s=50, label=label)
    for run in runs:
        ax.annotate(run["name"], (run["minutes"], 100 * run["test_accuracy"]), textcoords="offset points",
                    xytext=(5, 4), fontsize=8)  # fmt: skip
    if target is not None:
        ax.axhline(100 * target, color="tab:red", linestyle="--", linewidth=1, label=f"target {100 * target:g}%")
    if budget_minutes is not None:
        ax.axvline(budget_minutes, color="tab:gray", linestyle=":", linewidth=1, label=f"budget {budget_minutes:g} min")
    ax.margins(x=0.2, y=0.1)  # room for the labels beside the outermost points
    ax.set_xlabel("training time (minutes, wall clock, evaluation excluded)")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# --------------------------------------------------------------------------- progress display


class EpochProgress:
    """A rich progress bar per epoch (on a terminal) and one plain line per epoch (always)."""

    def __init__(self, console, enabled: bool):
        self.console, self.enabled = console, enabled

    @contextlib.contextmanager
    def epoch(self, epoch: int, epochs: int, steps: int, start_step: int):
        if not (self.enabled and self.console.is_terminal):
            yield _NoBar()
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        columns = [TextColumn(f"epoch {epoch + 1}/{epochs}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("loss {task.fields[loss]:.4f}  acc {task.fields[acc]:.2%}"),
                   TimeElapsedColumn(), TimeRemainingColumn()]  # fmt: skip
        with Progress(*columns, console=self.console, transient=True) as progress:
            task = progress.add_task("train", total=steps, completed=start_step, loss=float("nan"), acc=0.0)
            yield _Bar(progress, task)

    def epoch_done(self, row: dict) -> None:
        if not self.enabled:
            return
        val = ""
        if row["val_accuracy"] is not None:
            val = f"  val loss {row['val_loss']:.4f} acc {row['val_accuracy']:.2%}"
        named = [(key.replace("train_", "", 1).replace("_", " "), row[key]) for key in _part_keys([row])]
        parts = "".join(f" ({name} {value:.4f})" for name, value in named)  # e.g. (kd loss 0.1234)
        self.console.print(
            f"epoch {row['epoch']:3d}  lr {row['lr']:.4g}  train loss {row['train_loss']:.4f}{parts} "
            f"acc {row['train_accuracy']:.2%}{val}  {row['epoch_seconds']:.1f}s",
            highlight=False,
        )


class _Bar:
    def __init__(self, progress, task):
        self.progress, self.task = progress, task

    def advance(self, totals) -> None:  # tensor [loss sum, correct, count] so far
        loss, correct, count = totals.tolist()
        self.progress.update(self.task, advance=1, loss=loss / count, acc=correct / count)


class _NoBar:
    def advance(self, totals) -> None:  # tensor [loss sum, correct, count] so far
        pass
