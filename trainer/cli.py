"""`trainer` command line: train (one model or an ensemble of seeds), distill (a student from an exported
teacher), tune (a hyperparameter search: tune_cli.py), evaluate, compare, recipes.

Errors a user can fix (unknown dataset, missing files, impossible hyperparameters) are
printed as one line, `trainer: error: ...`, with exit status 2 and no traceback.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path

# OpenMP threads that busy-wait at every barrier make a shared CPU crawl: measured on the
# project's 2-core machine under load, a LeNet step took 5x the CPU time and 4x the wall
# time with the default policy. Must be set before torch (and its libgomp) loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import click
from rich.console import Console
from rich.table import Table

from ensemble_serving.datasets import DATASET_NAMES, DatasetChecksumWarning, DatasetError
from trainer.cli_options import training_options
from trainer.recipes import (
    ARCHITECTURES_FOR,
    DEFAULT_ALPHA,
    DEFAULT_ARCHITECTURE,
    DEFAULT_TEMPERATURE,
    RECIPES,
    TTA_MODES,
    architecture_of,
    get_recipe,
)

# soft_wrap: long lines stay whole in log files instead of breaking at 80 columns.
# Wide tables when writing to a log file instead of rich's 80-column default.
console = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 150)


class OneLineErrors(click.Group):
    """Report usage errors and TrainerError/DatasetError as one line instead of a traceback."""

    def main(self, args=None, prog_name=None, **kwargs):
        from trainer.checkpoint import RunDirError
        from trainer.errors import TrainerError, TrainingInterrupted

        try:
            result = super().main(args=args, prog_name=prog_name or "trainer", standalone_mode=False, **kwargs)
        except click.exceptions.NoArgsIsHelpError as error:
            click.echo(error.ctx.get_help())
            sys.exit(0)
        except click.ClickException as error:
            click.echo(f"trainer: error: {error.format_message()}", err=True)
            sys.exit(2)
        except (TrainerError, DatasetError, RunDirError) as error:
            click.echo(f"trainer: error: {error}", err=True)
            sys.exit(2)
        except (TrainingInterrupted, click.exceptions.Abort, KeyboardInterrupt) as error:
            click.echo(f"trainer: {error or 'interrupted'}", err=True)
            sys.exit(130)
        sys.exit(result if isinstance(result, int) else 0)


@click.group(cls=OneLineErrors, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
def main():
    """Train MNIST / CIFAR-10 classifiers (and ensembles of them) into run dirs.

    A run dir holds model.safetensors and config.json (everything the exporter needs),
    plus the training record: metrics.csv, history.json, curves.png, confusion_matrix.png
    and .json, per_class.csv.
    """


@main.command()
@click.option("--dataset", required=True, type=click.Choice(DATASET_NAMES), help="Which data set to train on.")
@training_options
def train(dataset, **options):
    """Train one model per seed on DATASET and write a run dir for each.

    \b
    Examples:
      trainer train --dataset mnist --seeds 0,1,2              # LeNet-style ensemble
      trainer train --dataset cifar10 --arch airbench --val-fraction 0.1
      torchrun --nproc_per_node=2 -m trainer train --dataset mnist
    """
    return _train_seeds(dataset, None, "", **options)


@main.command()
@click.option("--teacher", required=True, type=click.Path(path_type=Path),
              help="The exported teacher: an .onnx file (uint8 images in, probabilities out), or a model dir of "
                   "a model repository: NAME-fused (one graph, fastest), the ensemble NAME (its members, then "
                   "NAME-average with its weights), or one member.")  # fmt: skip
@click.option("--dataset", type=click.Choice(DATASET_NAMES), default=None,
              help="Which data set to train on. Default: the teacher's (the exporter records it).")  # fmt: skip
@click.option("--temperature", type=float, default=DEFAULT_TEMPERATURE, show_default=True,
              help="Softens teacher and student alike: p^(1/T) renormalized (see docs/distillation.md).")  # fmt: skip
@click.option("--alpha", type=float, default=DEFAULT_ALPHA, show_default=True,
              help="Weight of the soft-label term: "
                   "alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE(labels).")  # fmt: skip
@training_options
def distill(teacher, dataset, temperature, alpha, **options):
    """Train one student per seed on TEACHER's soft labels and write a run dir for each.

    The teacher (an exported model or ensemble, run by onnxruntime; --threads sets its
    threads too) labels the training split once; its probabilities are cached beside the
    run dirs (OUTPUT_DIR/NAME-teacher.npz), so --resume and later students of the same
    teacher do not run it again. Loss: alpha * T^2 * KL(teacher_T || student_T) +
    (1 - alpha) * cross-entropy with the recipe's label smoothing. The student is a run dir
    like any other (config.json adds a `distillation` entry), exportable by `exporter`.
    See docs/distillation.md.

    \b
    Example (a 5-member airbench ensemble exported with --fused, one airbench student):
      trainer distill --teacher model_repository/cifar10-fused --arch airbench --val-fraction 0.1
    """
    from trainer.distill import KnowledgeDistillation, check_settings, teacher_targets
    from trainer.errors import TrainerError
    from trainer.teacher import load_teacher

    check_settings(temperature, alpha)
    model = load_teacher(teacher, threads=options["threads"], cuda=options["device"] != "cpu")
    if dataset is None and model.dataset is None:
        raise TrainerError(f"the teacher {teacher} does not say which data set it learned; pass --dataset")
    if dataset is not None and model.dataset not in (None, dataset):
        raise TrainerError(f"the teacher {teacher} was trained on {model.dataset}, not {dataset}")
    dataset = dataset or model.dataset

    def objective_for(train_set, env, hyper, cache):
        model.check_fits(dataset, train_set.images.shape[1:], train_set.class_names)
        split = options["val_fraction"], options["split_seed"]
        targets = teacher_targets(model, dataset, train_set, *split, cache, hyper["eval_batch_size"], console, env)
        record = targets.record(model, train_set, *split)
        if env.is_main:
            val = record["teacher_val_accuracy"]
            val = "" if val is None else f", validation {val:.2%}"
            console.print(f"teacher {teacher} ({model.kind}, sha256 {model.sha256[:12]}): accuracy on the training "
                          f"split {record['teacher_train_accuracy']:.2%}{val}")  # fmt: skip
        return KnowledgeDistillation(targets.train, temperature, alpha, record)

    return _train_seeds(dataset, objective_for, "-distilled", **options)


def _train_seeds(dataset, objective_for, name_suffix, architecture, recipe_file, seeds, data_dir, no_download, output_dir, name,
                 val_fraction, split_seed, device, precision, channels_last, deterministic, threads, resume,
                 **overrides):  # fmt: skip
    """One run per seed; objective_for(train_set, env, hyper, cache path): what they minimize (None: cross-entropy)."""
    import torch

    from trainer.data import load_datasets
    from trainer.environment import setup_environment
    from trainer.errors import TrainerError
    from trainer.train import RunSpec, train_run

    recipe, base = _base_recipe(dataset, architecture, recipe_file)
    hyper = _apply_overrides(base, overrides)
    architecture = architecture_of(recipe)
    hyper["recipe"] = recipe
    if threads is not None:
        if threads < 1:
            raise TrainerError(f"--threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    env = setup_environment(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", DatasetChecksumWarning)
        train_set, test_set = load_datasets(dataset, data_dir, download=not no_download)
    if env.is_main:
        for warning in caught:  # one readable line each instead of Python's two-line warning format
            console.print(f"[yellow]note: {warning.message}[/]")
    prefix = name or f"{dataset}-{recipe}{name_suffix}"
    cache = Path(output_dir) / f"{prefix}-teacher.npz"
    objective = objective_for(train_set, env, hyper, cache) if objective_for else None
    results = []
    for seed in seeds:
        spec = RunSpec(dataset=dataset, architecture=architecture, hyper=dict(hyper), seed=seed,
                       run_dir=Path(output_dir) / f"{prefix}-s{seed}", val_fraction=val_fraction,
                       split_seed=split_seed, precision=precision, channels_last=channels_last,
                       deterministic=deterministic, resume=resume, objective=objective)  # fmt: skip
        results.append(train_run(spec, env, train_set, test_set, console))
    if env.is_main:
        _print_summary(results, test_set, Path(output_dir), prefix)
    if env.distributed:
        torch.distributed.destroy_process_group()
    return 0


def _base_recipe(dataset: str, architecture: str | None, recipe_file: Path | None) -> tuple[str, dict]:
    """(recipe name, hyperparameters) from --recipe-file, else the built-in recipe of --arch (or the default)."""
    from trainer.errors import TrainerError
    from trainer.recipe_file import load_recipe_file

    if recipe_file is None:
        recipe = architecture or DEFAULT_ARCHITECTURE[dataset]
        if recipe not in ARCHITECTURES_FOR[dataset] and os.environ.get("RANK", "0") == "0":
            console.print(f"[yellow]note: {recipe} is tuned for {get_recipe(recipe)['dataset']}, not {dataset}[/]")
        return recipe, get_recipe(recipe)
    recipe, hyper = load_recipe_file(recipe_file)
    if architecture not in (None, recipe):
        raise TrainerError(f"--recipe-file {recipe_file} is a {recipe} recipe, not --arch {architecture}; drop one")
    if hyper["dataset"] != dataset:
        raise TrainerError(f"--recipe-file {recipe_file} is a recipe for {hyper['dataset']}, not --dataset {dataset}")
    return recipe, hyper


_AUGMENTATION_KEYS = ("translate", "flip", "cutout")


def _apply_overrides(recipe: dict, overrides: dict) -> dict:
    for key, value in overrides.items():
        if value is None:
            continue
        if key in _AUGMENTATION_KEYS:
            recipe["augmentation"][key] = value
        elif key == "widths":
            expected = len(recipe["arch_args"]["widths"])
            if len(value) != expected:
                raise click.BadParameter(f"this network has {expected} stages, got {len(value)} widths",
                                         param_hint="'--widths'")  # fmt: skip
            recipe["arch_args"]["widths"] = value
        else:
            recipe[key] = value
    return recipe


def _print_summary(results: list[dict], test_set, output_dir: Path, prefix: str) -> None:
    import numpy as np

    results = [r for r in results if r]
    table = Table(title="Summary (test accuracy: the run dir's serving model, fp32, uint8 test images)")
    table.add_column("run dir", overflow="fold")
    for column in ("params", "epochs", "train time", "val acc", "test acc", "test ECE"):
        table.add_column(column, justify="right", no_wrap=True)
    for result in results:
        config = result["config"]
        metrics, training = config["metrics"], config.get("training", {})
        val = metrics.get("val_accuracy")
        table.add_row(str(result["run_dir"]), f"{config['parameters']:,}", str(config.get("epochs_completed", "")),
                      f"{training.get('train_seconds', float('nan')):.0f} s", "-" if val is None else f"{val:.2%}",
                      f"{metrics['test_accuracy']:.2%}", f"{metrics['test_ece']:.4f}")  # fmt: skip
    if len(results) > 1:
        mean_probs = np.mean([r["test_probabilities"] for r in results], axis=0)
        accuracy = float((mean_probs.argmax(1) == test_set.labels).mean())
        table.add_row(f"ensemble of {len(results)} (mean probs)", "", "", "", "", f"{accuracy:.2%}", "")
        summary = {"members": [str(r["run_dir"]) for r in results], "test_accuracy": accuracy,
                   "member_test_accuracy": [r["config"]["metrics"]["test_accuracy"] for r in results]}  # fmt: skip
        (output_dir / f"{prefix}-ensemble.json").write_text(json.dumps(summary, indent=2) + "\n")
    console.print(table)
    for result in results:
        if result.get("per_class"):
            run_dir = result["run_dir"]
            console.print(f"{run_dir}: per-class test accuracy " + ", ".join(
                f"{row['class']} {row['recall']:.1%}" for row in result["per_class"]) +
                f"  (confusion matrix: {run_dir / 'confusion_matrix.png'})")  # fmt: skip


@main.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--data-dir", type=click.Path(file_okay=False), default=None, help="Data directory (as for train).")
@click.option("--split", type=click.Choice(["test", "val", "train"]), default="test", show_default=True,
              help="val: the validation images the run held out (its --val-fraction and --split-seed).")  # fmt: skip
@click.option("--tta", type=click.Choice(TTA_MODES), default=None,
              help="Evaluate with this test-time augmentation instead of the run's own (to choose one on val).")  # fmt: skip
@click.option("--no-download", is_flag=True, help="Fail instead of downloading absent data files.")
def evaluate(run_dir, data_dir, split, tta, no_download):
    """Accuracy of RUN_DIR's serving model (fp32, uint8 images) on a split, with per-class figures."""
    import torch

    from ensemble_serving.metrics import confusion_matrix, per_class_metrics
    from trainer.checkpoint import load_serving_model
    from trainer.data import load_datasets, split_train_validation
    from trainer.errors import TrainerError
    from trainer.serving import serving_model_from
    from trainer.train import predict

    model, config = load_serving_model(run_dir)
    if tta is not None:
        model = serving_model_from(model.network, {**config, "serving": {"tta": tta}}).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DatasetChecksumWarning)  # `train` already said so
        train_set, test_set = load_datasets(config["dataset"], data_dir, download=not no_download)
    if split == "test":
        images, labels = test_set.images, test_set.labels
    else:
        _, val_idx = split_train_validation(train_set.labels, config.get("val_fraction", 0.0), config.get("split_seed", 0))
        if split == "val" and len(val_idx) == 0:
            raise TrainerError(f"{run_dir} was trained without a validation split (--val-fraction 0)")
        index = val_idx if split == "val" else slice(None)
        images, labels = train_set.images[index], train_set.labels[index]
    probs = predict(model, images, torch.device("cpu"), config.get("hyperparameters", {}).get("eval_batch_size", 500))
    predictions = probs.argmax(1)
    accuracy = float((predictions == labels).mean())
    class_names = config["class_names"]
    rows = per_class_metrics(confusion_matrix(labels, predictions, len(class_names)), class_names)
    title = f"{run_dir} on {config['dataset']} {split} (TTA {model.tta}): accuracy {accuracy:.2%} ({len(labels)} images)"
    table = Table(title=title)
    for column in ("class", "accuracy (recall)", "precision", "f1", "support"):
        table.add_column(column, justify="left" if column == "class" else "right")
    for row in rows:
        table.add_row(row["class"], f"{row['recall']:.2%}", f"{row['precision']:.2%}", f"{row['f1']:.4f}", str(row["support"]))
    console.print(table)
    recorded = config.get("metrics", {}).get(f"{split}_accuracy")
    if recorded is not None and tta is None:
        console.print(f"recorded in config.json: {recorded:.2%} (difference {abs(recorded - accuracy) * 100:.3f} points)")
    return 0


@main.command()
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--plot", type=click.Path(dir_okay=False), default=None,
              help="Also write a PNG of test accuracy against training minutes.")  # fmt: skip
@click.option("--target", type=click.FloatRange(0, 1), default=None,
              help="Draw this accuracy (0-1) on the plot, e.g. 0.92.")
@click.option("--budget-minutes", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Draw this training-time budget on the plot.")
def compare(run_dirs, plot, target, budget_minutes):
    """Compare finished runs: recipe, size, epochs, batch, training time, val and test accuracy.

    \b
    Example:
      trainer compare runs/cifar10-* --plot accuracy-vs-time.png --target 0.92 --budget-minutes 25
    """
    from trainer.checkpoint import RunDirError, read_config
    from trainer.report import save_comparison_png

    runs = []
    table = Table(title="Runs (test accuracy: the run dir's serving model, fp32)")
    for column in ("run dir", "recipe", "params", "epochs", "batch", "train images", "train time", "val acc", "test acc"):
        table.add_column(column, justify="left" if column in ("run dir", "recipe") else "right", no_wrap=column != "run dir")
    for run_dir in run_dirs:
        try:
            config = read_config(Path(run_dir))
        except RunDirError as error:
            console.print(f"[yellow]skipping {run_dir}: {error}[/]")
            continue
        metrics, hyper = config.get("metrics") or {}, config.get("hyperparameters", {})
        if config.get("status") != "complete" or "test_accuracy" not in metrics:
            console.print(f"[yellow]skipping {run_dir}: not a finished run (status {config.get('status')!r})[/]")
            continue
        seconds, val = config["training"]["train_seconds"], metrics.get("val_accuracy")
        runs.append({"name": Path(run_dir).name, "minutes": seconds / 60, "test_accuracy": metrics["test_accuracy"],
                     "train_samples": config["train_samples"]})  # fmt: skip
        recipe = hyper.get("recipe") or f"{config['architecture']} ({hyper.get('optimizer', '?')})"  # runs before `recipe`
        table.add_row(str(run_dir), recipe, f"{config['parameters']:,}", str(config.get("epochs_completed", "")),
                      str(hyper.get("batch_size", "")), f"{config['train_samples']:,}", f"{seconds / 60:.1f} min",
                      "-" if val is None else f"{val:.2%}", f"{metrics['test_accuracy']:.2%}")  # fmt: skip
    console.print(table)
    if plot and runs:
        save_comparison_png(runs, Path(plot), target, budget_minutes)
        console.print(f"plot: {plot}")
    elif plot:
        console.print(f"[yellow]no finished runs: {plot} not written[/]")
    return 0


@main.command()
@click.argument("architecture", required=False, type=click.Choice(list(RECIPES)))
def recipes(architecture):
    """Print the hyperparameter preset(s) that `train` starts from."""
    for name in [architecture] if architecture else list(RECIPES):
        console.print(f"[bold]{name}[/] (network: {architecture_of(name)})")
        console.print_json(json.dumps(get_recipe(name)))


def _add_tune() -> None:
    """`trainer tune` lives in tune_cli.py (its options alone would push this module past its size)."""
    from trainer.tune_cli import tune

    main.add_command(tune)


_add_tune()

if __name__ == "__main__":
    main()
