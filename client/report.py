"""Turn gathered probabilities into a report: numbers, terminal tables and files.

`build_report` is pure (arrays in, a JSON-ready dict out) so that a known-answer test
can check it exactly; `print_report` renders it with rich; `write_report_files` writes
report.json, per_class.csv and confusion_matrix.png.
"""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from ensemble_serving import metrics

ECE_BINS = 15
REPORT_FILES = ("report.json", "per_class.csv", "confusion_matrix.png")


def build_report(
    probabilities: np.ndarray,
    labels: np.ndarray,
    class_names: list[str],
    top_k: int = 5,
    latencies_s: np.ndarray | None = None,
    wall_time_s: float | None = None,
    context: dict | None = None,
) -> dict:
    """Accuracy, top-k, per-class metrics, confusion matrix, calibration and (optional) speed.

    `context` (model, url, dataset, ...) is copied into the report as is.
    """
    probabilities = np.asarray(probabilities)
    labels = np.asarray(labels, dtype=np.int64)
    num_classes = len(class_names)
    if probabilities.shape != (len(labels), num_classes):
        raise ValueError(f"probabilities {probabilities.shape} do not match {len(labels)} labels x {num_classes} classes")
    predictions = probabilities.argmax(axis=1)
    cm = metrics.confusion_matrix(labels, predictions, num_classes)
    k = min(top_k, num_classes)
    report = dict(context or {})
    report.update(
        {
            "num_images": int(len(labels)),
            "class_names": list(class_names),
            "accuracy": metrics.accuracy(labels, predictions),
            "top_k": {"k": k, "accuracy": metrics.top_k_accuracy(probabilities, labels, k)},
            "mean_confidence": float(probabilities.max(axis=1).mean()),
            "ece": metrics.expected_calibration_error(probabilities, labels, n_bins=ECE_BINS),
            "ece_bins": ECE_BINS,
            "per_class": metrics.per_class_metrics(cm, class_names),
            "confusion_matrix": cm.tolist(),
        }
    )
    if latencies_s is not None and wall_time_s is not None:
        report["performance"] = performance_summary(len(labels), latencies_s, wall_time_s)
    report["created"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    return report


def performance_summary(num_images: int, latencies_s: np.ndarray, wall_time_s: float) -> dict:
    latencies_ms = np.asarray(latencies_s, dtype=np.float64) * 1000.0
    p50, p90, p99 = np.percentile(latencies_ms, [50, 90, 99]) if latencies_ms.size else (float("nan"),) * 3
    return {
        "wall_time_s": float(wall_time_s),
        "throughput_images_per_s": float(num_images / wall_time_s) if wall_time_s > 0 else float("nan"),
        "requests": int(latencies_ms.size),
        "latency_ms": {
            "p50": float(p50),
            "p90": float(p90),
            "p99": float(p99),
            "mean": float(latencies_ms.mean()) if latencies_ms.size else float("nan"),
            "max": float(latencies_ms.max()) if latencies_ms.size else float("nan"),
        },
    }


# --------------------------------------------------------------------------- terminal


def print_report(report: dict, console: Console, normalize: bool = False) -> None:
    console.print(summary_table(report))
    console.print(per_class_table(report))
    console.print(confusion_table(report, normalize=normalize))


def summary_table(report: dict) -> Table:
    title = f"{report.get('model', 'model')} on {report.get('dataset', 'dataset')} {report.get('split', '')}".strip()
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column("metric", style="bold")
    table.add_column("value", justify="right")
    correct = round(report["accuracy"] * report["num_images"])
    table.add_row("images", f"{report['num_images']:,}")
    table.add_row("accuracy", f"{100 * report['accuracy']:.2f} %  ({correct:,} correct)")
    table.add_row(f"top-{report['top_k']['k']} accuracy", f"{100 * report['top_k']['accuracy']:.2f} %")
    table.add_row("mean confidence", f"{report['mean_confidence']:.4f}")
    table.add_row(f"ECE ({report['ece_bins']} bins)", f"{report['ece']:.4f}")
    perf = report.get("performance")
    if perf:
        latency = perf["latency_ms"]
        table.add_row("wall time", f"{perf['wall_time_s']:.2f} s")
        table.add_row("throughput", f"{perf['throughput_images_per_s']:,.0f} images/s")
        table.add_row(
            "latency per request",
            f"p50 {latency['p50']:.1f} ms · p90 {latency['p90']:.1f} ms · p99 {latency['p99']:.1f} ms",
        )
        if "batch_size" in report:
            table.add_row("requests", f"{perf['requests']:,} × batch {report['batch_size']}, "
                                      f"{report.get('concurrency', '?')} in flight")  # fmt: skip
    return table


def per_class_table(report: dict) -> Table:
    table = Table(title="per class", title_justify="left")
    table.add_column("class")
    for column in ("precision", "recall", "F1", "support"):
        table.add_column(column, justify="right")
    for row in report["per_class"]:
        table.add_row(row["class"], f"{row['precision']:.4f}", f"{row['recall']:.4f}",
                      f"{row['f1']:.4f}", f"{row['support']:,}")  # fmt: skip
    return table


def confusion_table(report: dict, normalize: bool = False) -> Table:
    """Rows are true classes, columns predictions; the diagonal (correct) in green."""
    cm = np.asarray(report["confusion_matrix"], dtype=np.int64)
    names = report["class_names"]
    shown = metrics.row_normalized(cm) if normalize else cm
    kind = "row-normalized (recall on the diagonal)" if normalize else "counts"
    table = Table(title=f"confusion matrix, {kind}: rows = true class, columns = predicted", title_justify="left")
    table.add_column("true \\ pred", style="bold")
    for name in names:
        table.add_column(name, justify="right")
    for i, name in enumerate(names):
        cells = []
        for j in range(len(names)):
            text = f"{shown[i, j]:.3f}" if normalize else str(int(shown[i, j]))
            if i == j:
                cells.append(f"[green]{text}[/green]")
            elif cm[i, j]:
                cells.append(f"[red]{text}[/red]")
            else:
                cells.append(f"[dim]{text}[/dim]")
        table.add_row(name, *cells)
    return table


# --------------------------------------------------------------------------- files


def write_report_files(report: dict, out_dir: str | Path, normalize: bool = False) -> list[Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / "report.json"
    json_path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")

    csv_path = out_dir / "per_class.csv"
    with open(csv_path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["class", "precision", "recall", "f1", "support"])
        writer.writeheader()
        writer.writerows(report["per_class"])

    png_path = out_dir / "confusion_matrix.png"
    title = (f"{report.get('model', 'model')} on {report.get('dataset', '')} {report.get('split', '')}: "
             f"accuracy {100 * report['accuracy']:.2f} %")  # fmt: skip
    metrics.save_confusion_matrix_png(
        np.asarray(report["confusion_matrix"]), report["class_names"], png_path, title=title, normalize=normalize
    )
    return [json_path, csv_path, png_path]
