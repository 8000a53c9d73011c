"""`trainer` command line: train (one model or an ensemble of seeds), evaluate, compare, recipes.

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

from ensemble_serving.datasets import DATA_DIR_ENV, DATASET_NAMES, DatasetChecksumWarning, DatasetError
from trainer.recipes import (
    ARCHITECTURES_FOR,
    DEFAULT_ARCHITECTURE,
    FLIPS,
    OPTIMIZERS,
    PRECISIONS,
    RECIPES,
    SCHEDULES,
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


def _parse_seeds(_ctx, _param, value: str) -> list[int]:
    try:
        seeds = [int(part) for part in value.split(",") if part.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers like 0,1,2, got {value!r}") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise click.BadParameter(f"expected distinct comma-separated integers like 0,1,2, got {value!r}")
    return seeds


def _parse_widths(_ctx, _param, value: str | None) -> list[int] | None:
    if value is None:
        return None
    try:
        widths = [int(part) for part in value.split(",")]
    except ValueError:
        widths = []
    if not widths or min(widths) < 1:
        raise click.BadParameter(f"expected comma-separated positive integers like 64,256,256, got {value!r}")
    return widths


@main.command()
@click.option("--dataset", required=True, type=click.Choice(DATASET_NAMES), help="Which data set to train on.")
@click.option("--arch", "architecture", type=click.Choice(list(RECIPES)),
              help="Network and its recipe (airbench_sgd: the airbench net with airbench94's SGD recipe). "
                   "Default: lenet for mnist, airbench for cifar10. "
                   "mnist: lenet, mnist_cnn; cifar10: cifar_cnn, airbench, airbench_sgd.")  # fmt: skip
@click.option("--seeds", default="0", show_default=True, callback=_parse_seeds,
              help="Comma-separated seeds; one run dir per seed (an ensemble: --seeds 0,1,2).")  # fmt: skip
@click.option("--data-dir", type=click.Path(file_okay=False), default=None,
              help=f"Data directory (torchvision layout). Default: ${DATA_DIR_ENV}, else ~/.cache/ensemble-serving/data.")  # fmt: skip
@click.option("--no-download", is_flag=True, help="Fail instead of downloading absent data files.")
@click.option("--output-dir", type=click.Path(file_okay=False), default="runs", show_default=True,
              help="Where run dirs go.")  # fmt: skip
@click.option("--name", default=None, help="Run name prefix; run dirs are NAME-s<seed>. Default: <dataset>-<arch>.")
@click.option("--epochs", type=int, help="Epochs (recipe default if omitted; see `trainer recipes`).")
@click.option("--batch-size", type=int, help="Global batch size (split over processes under torchrun).")
@click.option("--optimizer", type=click.Choice(OPTIMIZERS),
              help="sgd (with momentum), muon (Muon on conv filters, SGD on the rest) or Adam/AdamW.")  # fmt: skip
@click.option("--lr", type=float, help="Peak learning rate (mean loss, this batch size).")
@click.option("--muon-lr", type=float, help="With --optimizer muon: step length of the orthogonalized filter updates.")
@click.option("--momentum", type=float, help="SGD momentum.")
@click.option("--nesterov/--no-nesterov", default=None, help="Nesterov momentum for SGD.")
@click.option("--weight-decay", type=float, help="L2 weight decay (decoupled for AdamW).")
@click.option("--label-smoothing", type=float, help="Cross-entropy label smoothing in [0, 1).")
@click.option("--schedule", type=click.Choice(SCHEDULES),
              help="LR schedule after warmup: onecycle (linear up/down), cosine, step (x0.1 at 50%, 75%).")  # fmt: skip
@click.option("--warmup", type=float, help="Warmup length as a fraction of all steps.")
@click.option("--translate", type=int, help="Augmentation: random shift of up to N pixels (0 = off).")
@click.option("--flip", type=click.Choice(FLIPS), help="Augmentation: horizontal flips.")
@click.option("--cutout", type=int, help="Augmentation: zero a random NxN square (0 = off).")
@click.option("--widths", callback=_parse_widths,
              help="Channel widths of the network's conv stages, comma-separated (airbench: 64,256,256; "
                   "airbench95's wider net: 128,384,384). Same count as the recipe's.")  # fmt: skip
@click.option("--lookahead/--no-lookahead", default=None, help="Lookahead slow weights (airbench).")
@click.option("--tta", type=click.Choice(TTA_MODES),
              help="Test-time augmentation inside the served graph: average logits over the mirror image "
                   "(hflip), and also over 1-pixel shifts (hflip_translate, 6 views).")  # fmt: skip
@click.option("--val-fraction", type=float, default=0.0, show_default=True,
              help="Hold out this share of the training set (stratified) for validation; the test set is only "
                   "used for the final figure.")  # fmt: skip
@click.option("--split-seed", type=int, default=0, show_default=True, help="Seed of the validation split.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N or mps.")
@click.option("--precision", type=click.Choice(PRECISIONS), default="auto", show_default=True,
              help="Autocast: auto = bf16 on CPUs with bf16 units, bf16/fp16 AMP on CUDA.")  # fmt: skip
@click.option("--channels-last/--no-channels-last", default=True, show_default=True, help="NHWC memory format.")
@click.option("--deterministic", is_flag=True, help="Deterministic algorithms only (slower on GPU).")
@click.option("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice).")
@click.option("--resume", is_flag=True,
              help="Continue interrupted runs from their checkpoint.pt; finished runs are kept, absent ones start.")  # fmt: skip
def train(dataset, architecture, seeds, data_dir, no_download, output_dir, name, val_fraction, split_seed, device,
          precision, channels_last, deterministic, threads, resume, **overrides):  # fmt: skip
    """Train one model per seed on DATASET and write a run dir for each.

    \b
    Examples:
      trainer train --dataset mnist --seeds 0,1,2              # LeNet-style ensemble
      trainer train --dataset cifar10 --arch airbench --val-fraction 0.1
      torchrun --nproc_per_node=2 -m trainer train --dataset mnist
    """
    import torch

    from trainer.data import load_datasets
    from trainer.environment import setup_environment
    from trainer.errors import TrainerError
    from trainer.train import RunSpec, train_run

    recipe = architecture or DEFAULT_ARCHITECTURE[dataset]
    if recipe not in ARCHITECTURES_FOR[dataset] and os.environ.get("RANK", "0") == "0":
        console.print(f"[yellow]note: {recipe} is tuned for {get_recipe(recipe)['dataset']}, not {dataset}[/]")
    hyper = _apply_overrides(get_recipe(recipe), overrides)
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
    prefix = name or f"{dataset}-{recipe}"
    results = []
    for seed in seeds:
        spec = RunSpec(dataset=dataset, architecture=architecture, hyper=dict(hyper), seed=seed,
                       run_dir=Path(output_dir) / f"{prefix}-s{seed}", val_fraction=val_fraction,
                       split_seed=split_seed, precision=precision, channels_last=channels_last,
                       deterministic=deterministic, resume=resume)  # fmt: skip
        results.append(train_run(spec, env, train_set, test_set, console))
    if env.is_main:
        _print_summary(results, test_set, Path(output_dir), prefix)
    if env.distributed:
        torch.distributed.destroy_process_group()
    return 0


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


if __name__ == "__main__":
    main()
