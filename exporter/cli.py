"""`exporter to-onnx`: trained run dirs -> a parity-checked Triton model repository.

Heavy imports (torch, onnx, onnxruntime) happen inside the command so that
`exporter --help` answers at once.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.tree import Tree

QUANTIZE_HELP = (
    "Also write int8 variants (<model>-int8): onnxruntime static QDQ quantization calibrated on real "
    "training images; refused if accuracy on the run's validation split (the test split for a run trained "
    "without one) drops more than --max-accuracy-drop points."
)
WEIGHTS_HELP = (
    "Ensemble weights: 'uniform' (1/N each), 'fit' (minimise the negative log-likelihood of the weighted mean "
    "of the members' probabilities on the validation images every member held out: members trained with the "
    "same --val-fraction > 0 and --split-seed, training images in --data-dir), or W1,W2,... (one "
    "non-negative number per run dir, normalized to sum 1). They go into NAME-average (and NAME-fused); "
    "weights.json beside them records them with validation NLL and accuracy."
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Export trained run dirs (written by `trainer`) as ONNX models in a Triton model repository."""


@main.command("to-onnx")
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(path_type=Path), metavar="RUN_DIR...")
@click.option("--repository", required=True, type=click.Path(path_type=Path, file_okay=False),
              help="Model repository to write into (Triton layout; created if absent).")
@click.option("--name", required=True, help="Model name: the ensemble's (members become NAME-m0, NAME-m1, ...) "
              "or, for a single run dir, the model's.")
@click.option("--weights", default="uniform", show_default=True, metavar="uniform|fit|W1,W2,...", help=WEIGHTS_HELP)
@click.option("--fused", is_flag=True, help="Also write NAME-fused: one ONNX graph holding every member and the mean.")
@click.option("--overwrite", is_flag=True, help="Replace models of the same names already in the repository.")
@click.option("--max-batch-size", default=64, show_default=True, type=int,
              help="config.pbtxt max_batch_size (the ONNX graphs themselves take any batch).")
@click.option("--data-dir", default=None, type=click.Path(path_type=Path, file_okay=False),
              help="Dataset root for the parity images (and int8 calibration, the validation images for --weights). "
              "Default: $ENSEMBLE_SERVING_DATA_DIR, else ~/.cache/ensemble-serving/data. "
              "Without the test images there, parity runs on synthetic images (the report says so).")
@click.option("--quantize", "quantize_mode", type=click.Choice(["int8"]), default=None, help=QUANTIZE_HELP)
@click.option("--max-accuracy-drop", default=0.5, show_default=True, type=float,
              help="Largest accuracy loss (in percentage points) allowed for --quantize.")
@click.option("--instance-kind", type=click.Choice(["cpu", "gpu", "auto"]), default="cpu", show_default=True,
              help="instance_group kind in config.pbtxt (auto = Triton's KIND_AUTO: GPU when available, else CPU).")
@click.option("--instances", default=1, show_default=True, type=int, help="instance_group count per model.")
@click.option("--max-queue-delay-us", default=1000, show_default=True, type=int,
              help="dynamic_batching max_queue_delay_microseconds: how long a request may wait to join a batch.")
@click.option("--version", "version", default=None, type=click.IntRange(1),
              help="Add this version to models that already exist (other versions and config.pbtxt untouched; "
                   "the folder is renamed into place, so a polling server never sees half of it).")
@click.option("--next-version", is_flag=True,
              help="Like --version, with the next free number (one more than the highest version of the models).")
def to_onnx(run_dirs, repository, name, weights, fused, overwrite, max_batch_size, data_dir, quantize_mode,
            max_accuracy_drop, instance_kind, instances, max_queue_delay_us, version, next_version) -> None:  # fmt: skip
    """Export RUN_DIR... to ONNX, prove parity with PyTorch, and write the model repository.

    \b
    One run dir      -> model NAME.
    Several run dirs -> members NAME-m0.., the averaging model NAME-average and the
                        ensemble NAME (platform "ensemble": members, then the average).
    Each model dir holds config.pbtxt, labels.txt, 1/model.onnx and parity.json.
    --weights fit: the averaging model holds the weights that minimise the ensemble's
    validation NLL (the trainer's split, held out by every member); weights.json beside
    it records them with the validation NLL and accuracy of them, of uniform, and of
    each member.
    With --version V or --next-version, models that exist get V/model.onnx (and
    V/parity.json) beside their other versions: retrain, export, and a server in poll
    mode (or a load call in explicit mode) serves it with no downtime.

    Parity (always): onnxruntime on CPU vs PyTorch at batch sizes 1 and 64 on real test
    images; any probability off by more than 1e-4 or any changed argmax refuses the
    export (exit 1) and nothing is written. Bad input exits 2, also writing nothing.
    """
    from exporter.errors import ExportError

    stderr = Console(stderr=True)
    try:
        parsed_weights = _parse_weights(weights, len(run_dirs))
        with _RichSteps(stderr) if stderr.is_terminal else _LineSteps(stderr) as progress:
            from exporter.export import export_repository

            result = export_repository(
                list(run_dirs), repository, name, weights=parsed_weights, fused=fused, overwrite=overwrite,
                data_dir=data_dir, max_batch_size=max_batch_size, quantize=quantize_mode,
                max_accuracy_drop=max_accuracy_drop, instance_kind=instance_kind, instances=instances,
                max_queue_delay_us=max_queue_delay_us, version=version, next_version=next_version,
                progress=progress,
            )  # fmt: skip
    except ExportError as error:
        click.echo(f"error: {error}", err=True)
        sys.exit(error.exit_code)
    stdout = Console()
    if not stdout.is_terminal:  # a log file: room for the whole table rather than 80 columns
        stdout = Console(width=132)
    _print_summary(stdout, result)


def _parse_weights(text: str, num_run_dirs: int) -> str | list[float]:
    """'uniform', 'fit' or the numbers; anything else is a usage error (exit 2) before any work."""
    from exporter.weights import FIT, parse_option, weights_problem

    context = click.get_current_context()
    try:
        parsed = parse_option(text)
    except ValueError as error:
        raise click.BadParameter(f"{text!r}: {error}", ctx=context, param_hint="'--weights'") from None
    if parsed == FIT and num_run_dirs < 2:
        raise click.BadParameter("'fit' needs at least two run dirs (a single model has no ensemble weights)",
                                 ctx=context, param_hint="'--weights'")  # fmt: skip
    problem = weights_problem(parsed, num_run_dirs) if isinstance(parsed, list) else None
    if problem:
        raise click.BadParameter(f"{text!r} {problem}", ctx=context, param_hint="'--weights'")
    return parsed


class _RichSteps:
    """exporter.export.Steps on a rich progress bar (stderr, so stdout stays the summary)."""

    def __init__(self, console: Console):
        self.progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                                 MofNCompleteColumn(), TimeElapsedColumn(), console=console, transient=True)  # fmt: skip
        self.task = None

    def __enter__(self) -> "_RichSteps":
        self.progress.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.progress.stop()  # transient: the summary (or the error line) replaces the bar
        if self.task is not None and exc_info[0] is None:
            elapsed = self.progress.tasks[0].elapsed or 0.0
            self.progress.console.print(f"exported in {elapsed:.1f} s")

    def begin(self, total: int) -> None:
        self.task = self.progress.add_task("starting", total=total)

    def step(self, description: str) -> None:
        task = self.progress.tasks[0]
        # Advance for the step just finished; the first call only sets the description.
        self.progress.update(self.task, description=description, advance=1 if task.description != "starting" else 0)


class _LineSteps:
    """exporter.export.Steps for a log file: one timestamped line per step."""

    def __init__(self, console: Console):
        self.console, self.total, self.done = console, 0, 0

    def __enter__(self) -> "_LineSteps":
        import time

        self.started = time.perf_counter()
        return self

    def __exit__(self, *exc_info) -> None:
        import time

        if exc_info[0] is None:
            self.console.print(f"exported in {time.perf_counter() - self.started:.1f} s", highlight=False)

    def begin(self, total: int) -> None:
        self.total = total

    def step(self, description: str) -> None:
        import time

        self.done += 1
        elapsed = time.perf_counter() - self.started
        self.console.print(f"[{self.done}/{self.total} {elapsed:6.1f}s] {description}", highlight=False, markup=False,
                           soft_wrap=True)  # fmt: skip


def _print_summary(console: Console, result) -> None:
    quantized = any("quantization.json" in model.reports for model in result.models)
    columns = ["model", "kind", "platform", "|ΔP| bs1", "|ΔP| bs64", "argmax"]
    columns += ["int8 Δacc", "int8 speed-up"] if quantized else []
    table = Table(title=f"Written to {result.repository}", title_justify="left",
                  caption="|ΔP|: max abs difference of probabilities, onnxruntime vs PyTorch; argmax: agreement",
                  caption_justify="left")  # fmt: skip
    for column in columns:
        table.add_column(column, justify="left" if column in ("model", "kind", "platform") else "right", no_wrap=True)
    for model in result.models:
        cells = [model.name, model.kind, model.platform, *_parity_cells(model.reports.get("parity.json"))]
        if quantized:
            cells += _quantization_cells(model.reports.get("quantization.json"))
        table.add_row(*cells)
    console.print(table)
    images = next((m.reports["parity.json"]["images"] for m in result.models if "parity.json" in m.reports), None)
    if images:
        where = (f"{images['count']} real {images['dataset']} {images['split']} images" if images["source"] == "real"
                 else f"{images['count']} synthetic images ({images['why_not_real']})")  # fmt: skip
        console.print(f"Parity images: {where}; tolerance 1e-4, every argmax must agree.")
    weights = next((m.reports["weights.json"] for m in result.models if "weights.json" in m.reports), None)
    if weights:
        console.print(_weights_table(weights))
    console.print(_repository_tree(result))


def _weights_table(report: dict) -> Table:
    """weights.json as a table: each member's weight and validation figures, then uniform vs the chosen weights."""
    validation = report.get("validation")
    if validation:
        images = f"{validation['images']} {validation['dataset']} validation images"
        title = f"Ensemble weights: {report['mode']}, on {images}"
        caption = (f"Validation split: val_fraction {validation['val_fraction']}, split_seed {validation['split_seed']}; "
                   "NLL: mean negative log-likelihood of the true class (nats)")  # fmt: skip
        if "fit" in report:
            caption += "; the weights were fitted on these images (in-sample): judge them on the test split"
    else:
        title, caption = f"Ensemble weights: {report['mode']}", f"No validation figures: {report['why_no_validation']}"
    table = Table(title=title, title_justify="left", caption=caption, caption_justify="left")
    for column in ("model", "run", "weight", "val accuracy", "val NLL"):
        table.add_column(column, justify="left" if column in ("model", "run") else "right", no_wrap=True)
    for member in report["members"]:
        figures = [f"{member['val_accuracy']:.2%}", f"{member['val_nll']:.4f}"] if validation else ["", ""]
        table.add_row(member["model"], Path(member["source_run"]).name, f"{member['weight']:.4f}", *figures)
    if validation:
        table.add_section()
        uniform, chosen = report["uniform"], report["chosen"]
        table.add_row("ensemble, uniform", "", f"{uniform['weights'][0]:.4f} each", f"{uniform['val_accuracy']:.2%}",
                      f"{uniform['val_nll']:.4f}")  # fmt: skip
        table.add_row(
            f"ensemble, {report['mode']}", "", "", f"{chosen['val_accuracy']:.2%}", f"{chosen['val_nll']:.4f}"
        )
    return table


def _parity_cells(report: dict | None) -> list[str]:
    if not report:
        return ["", "", ""]
    by_size = report["batch_sizes"]
    return [f"{by_size['1']['max_abs_diff']:.2e}", f"{by_size['64']['max_abs_diff']:.2e}",
            f"{report['argmax_agreement']:.2%}"]  # fmt: skip


def _quantization_cells(report: dict | None) -> list[str]:
    if not report:
        return ["", ""]
    change = f"{report['accuracy_change_points']:+.2f} pt"
    timing = report.get("timing")
    speedup = f"{timing['batch_sizes']['64']['speedup']:.2f}x (bs64)" if timing else ""
    return [change, speedup]


def _repository_tree(result) -> Tree:
    tree = Tree(f"{result.repository}/")
    for model in result.models:
        _add_directory(tree.add(f"{model.name}/"), model.path)
    return tree


def _add_directory(branch: Tree, directory: Path) -> None:
    for path in sorted(directory.iterdir(), key=lambda p: (p.is_file(), p.name)):
        if path.is_dir():
            _add_directory(branch.add(f"{path.name}/"), path)
        else:
            branch.add(f"{path.name} ({_size(path.stat().st_size)})")


def _size(size: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size} B"


if __name__ == "__main__":
    main()
