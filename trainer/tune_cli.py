"""`trainer tune`: a hyperparameter search on Optuna over a recipe's search space
(recipes.SEARCH_SPACES), maximizing validation accuracy (never test), resumable, shared
by any number of processes through its storage. See docs/training.md, "Tuning".
"""

from __future__ import annotations

import signal
import sys
import warnings
from pathlib import Path

import click
from rich.console import Console

from ensemble_serving.datasets import DATA_DIR_ENV, DATASET_NAMES, DatasetChecksumWarning
from trainer.recipes import DEFAULT_ARCHITECTURE, PRECISIONS, SEARCH_SPACES, architecture_of, get_recipe

console = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 150)


# fmt: off
@click.command()
@click.option("--dataset", required=True, type=click.Choice(DATASET_NAMES), help="Which data set to tune on.")
@click.option("--arch", "recipe", type=click.Choice(list(SEARCH_SPACES)), default=None,
              help="The recipe whose search space is searched (`trainer recipes`). Default: lenet for mnist, "
                   "airbench for cifar10.")
@click.option("--epochs", type=click.IntRange(min=1), default=None,
              help="Epochs per trial (default: the recipe's). Short trials rank recipes cheaply; best_recipe.json "
                   "keeps the recipe's full epoch count.")
@click.option("--n-trials", type=int, default=None, help="Trials this process runs (then it stops).")
@click.option("--study-trials", type=int, default=None,
              help="Stop when the study holds this many finished or running trials, counting every process's: "
                   "how several processes or machines finish one study together.")
@click.option("--budget-minutes", type=float, default=None,
              help="Start no trial after this many minutes, nor one that the median trial so far would take "
                   "past them.")
@click.option("--study", "study_name", default=None,
              help="Study name; an existing study of that name in --storage is resumed (or joined). "
                   "Default: <dataset>-<arch>.")
@click.option("--storage", default=None,
              help="Where the study lives: any SQLAlchemy URL, such as postgresql://user@host/db for several "
                   "machines. Default: sqlite:///OUTPUT_DIR/optuna.db.")
@click.option("--space", "space_specs", multiple=True, metavar="NAME=SPEC",
              help="Narrow or fix one searched parameter (repeatable): lr=0.05:0.5 (range), "
                   "'batch_size=128|256' (choices), dropout=0.1 (fixed). `trainer tune --show-space` lists them.")
@click.option("--show-space", is_flag=True, help="Print the search space (after --space) and exit.")
@click.option("--pruner", type=click.Choice(["median", "hyperband", "none"]), default="median", show_default=True,
              help="Ends a trial early on its per-epoch validation accuracy: median (below the median of earlier "
                   "trials at that epoch) or Hyperband.")
@click.option("--pruner-startup-trials", type=click.IntRange(min=0), default=5, show_default=True,
              help="median: trials that run in full before any is pruned.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Training seed of every trial (the same for all, so trials differ only in their parameters).")
@click.option("--sampler-seed", type=int, default=None,
              help="Seed of the TPE sampler (default: random, so processes sharing a study sample differently).")
@click.option("--val-fraction", type=float, default=0.1, show_default=True,
              help="Share of the training set held out; its accuracy is the objective. The test set is not used.")
@click.option("--split-seed", type=int, default=0, show_default=True, help="Seed of the validation split.")
@click.option("--data-dir", type=click.Path(file_okay=False), default=None,
              help=f"Data directory (torchvision layout). Default: ${DATA_DIR_ENV}, else ~/.cache/ensemble-serving/data.")
@click.option("--no-download", is_flag=True, help="Fail instead of downloading absent data files.")
@click.option("--output-dir", type=click.Path(file_okay=False), default="runs/tune", show_default=True,
              help="The SQLite storage (by default) and OUTPUT_DIR/<study>/: trials.md/.json, best_recipe.json, "
                   "plots/*.png.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N or mps.")
@click.option("--precision", type=click.Choice(PRECISIONS), default="auto", show_default=True,
              help="Autocast, as for train.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="torch intra-op threads.")
# fmt: on
def tune(dataset, recipe, epochs, n_trials, study_trials, budget_minutes, study_name, storage, space_specs,
         show_space, pruner, pruner_startup_trials, seed, sampler_seed, val_fraction, split_seed, data_dir,
         no_download, output_dir, device, precision, threads):  # fmt: skip
    """Search RECIPE's hyperparameters on DATASET's validation split with Optuna (TPE, pruning).

    Ctrl-C ends the current trial and leaves the study resumable: rerun the same command.
    Then train the best recipe in full, scored once on test:

    \b
      trainer tune --dataset mnist --epochs 3 --budget-minutes 30 --data-dir ../shared/data
      trainer train --dataset mnist --recipe-file runs/tune/mnist-lenet/best_recipe.json --val-fraction 0.1
    \b
    Several processes or machines share one study through one storage:
      trainer tune --dataset mnist --study-trials 60 --storage postgresql://tuner@db-host/optuna
    """
    from trainer import search_space
    from trainer.errors import TrainerError

    recipe = recipe or DEFAULT_ARCHITECTURE[dataset]
    space, fixed = search_space.narrow(search_space.space_for(recipe), list(space_specs))
    if show_space:
        for name, param in space.items():
            console.print(f"{name:16s} {param.describe()}")
        for name, value in fixed.items():
            console.print(f"{name:16s} fixed at {value}")
        return 0
    if not 0 < val_fraction < 1:
        raise TrainerError(f"--val-fraction must be in (0, 1): the objective is validation accuracy, got {val_fraction}")
    if get_recipe(recipe)["dataset"] != dataset:
        raise TrainerError(f"{recipe} is a recipe for {get_recipe(recipe)['dataset']}, not {dataset}")
    from trainer.tune import Limits

    limits = Limits(n_trials, study_trials, None if budget_minutes is None else budget_minutes * 60)
    limits.check()
    return _run(dataset, recipe, epochs, limits, study_name, storage, space, fixed, pruner, pruner_startup_trials,
                seed, sampler_seed, val_fraction, split_seed, data_dir, no_download, Path(output_dir), device,
                precision, threads)  # fmt: skip


def _run(dataset, recipe, epochs, limits, study_name, storage, space, fixed, pruner, startup, seed, sampler_seed,
         val_fraction, split_seed, data_dir, no_download, output_dir, device, precision, threads):  # fmt: skip
    import optuna
    import torch

    from trainer import search_space, tune_report
    from trainer.data import load_datasets
    from trainer.environment import setup_environment
    from trainer.tune import make_pruner, make_storage, open_study, run_trials
    from trainer.tune_objective import TrainingObjective

    optuna.logging.set_verbosity(optuna.logging.ERROR)  # our own line per trial says it all
    full = get_recipe(recipe)
    full["recipe"] = recipe
    base = search_space.apply(full, fixed)
    base["epochs"] = epochs or full["epochs"]
    output_dir.mkdir(parents=True, exist_ok=True)
    storage = storage or f"sqlite:///{(output_dir / 'optuna.db').resolve()}"
    study_name = study_name or f"{dataset}-{recipe}"
    settings = {"recipe": recipe, "dataset": dataset, "epochs_per_trial": base["epochs"],
                "val_fraction": val_fraction, "split_seed": split_seed, "seed": seed}  # fmt: skip
    study = open_study(make_storage(storage), study_name, settings, sampler_seed,
                       make_pruner(pruner, startup, base["epochs"]))  # fmt: skip
    if threads is not None:
        torch.set_num_threads(threads)
    env = setup_environment(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", DatasetChecksumWarning)
        train_set, test_set = load_datasets(dataset, data_dir, download=not no_download)
    for warning in caught:
        console.print(f"[yellow]note: {warning.message}[/]")
    study_dir = output_dir / study_name
    before = len(study.trials)
    console.print(f"study {study_name!r} in {storage}: {before} trials so far; {recipe} on {dataset}, "
                  f"{base['epochs']} epochs per trial, searching {', '.join(space)}"
                  + (f"; fixed {fixed}" if fixed else ""))  # fmt: skip
    progress = tune_report.TrialProgress(console, limits.n_trials or limits.study_trials, study_name)
    objective = TrainingObjective(dataset=dataset, recipe=recipe, architecture=architecture_of(recipe), base=base,
                                  space=space, train_set=train_set, test_set=test_set, env=env,
                                  scratch_dir=study_dir / "trials", seed=seed, val_fraction=val_fraction,
                                  split_seed=split_seed, precision=precision,
                                  on_epoch=lambda trial, row: progress.epoch(trial, row, base["epochs"]))  # fmt: skip

    def done(trial):
        row = next(r for r in tune_report.trial_rows(study) if r["number"] == trial.number)
        progress.trial_done(row, _best_value(study))

    # `kill PID` (a background study) ends the trial as Ctrl-C does, instead of leaving it RUNNING
    # until the heartbeat's grace period marks it failed.
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        with progress.running():
            outcome = run_trials(study, objective, limits, on_trial_done=done)
    finally:
        signal.signal(signal.SIGTERM, previous)
    _report(study, study_dir, recipe, objective, full["epochs"], settings, outcome)
    return 130 if outcome.stopped_by == "interrupted" else 0


def _best_value(study):
    try:
        return study.best_value
    except ValueError:
        return None


def _report(study, study_dir: Path, recipe: str, objective, full_epochs: int, settings: dict, outcome) -> None:
    from trainer import search_space, tune_report

    study_dir.mkdir(parents=True, exist_ok=True)
    rows = tune_report.trial_rows(study)
    title = (f"study {study.study_name}: {len(rows)} trials, {settings['recipe']} on {settings['dataset']}, "
             f"{settings['epochs_per_trial']} epochs per trial, val accuracy on {settings['val_fraction']:g} of train")  # fmt: skip
    tune_report.print_table(console, rows, title)
    tune_report.write_tables(study_dir, rows, title)
    tuned = tune_report.write_best_recipe(study_dir / "best_recipe.json", study, recipe,
                                          lambda params: search_space.apply(objective.base, params), full_epochs,
                                          settings)  # fmt: skip
    plots = tune_report.save_plots(study, study_dir / "plots")
    if tuned is not None:
        console.print(f"best: trial {tuned['trial']}, val {tuned['val_accuracy']:.2%}, {tuned['params']}")
        console.print(f"recipe: {study_dir / 'best_recipe.json'} (trainer train --recipe-file ...)")
    console.print(f"trials: {study_dir / 'trials.md'}, plots: " + ", ".join(
        f"{name} ({where})" if where.startswith("skipped") else name for name, where in plots.items()))  # fmt: skip
    if outcome.stopped_by == "interrupted":
        console.print("[yellow]interrupted: the current trial is recorded as FAIL (interrupted); rerun the same "
                      "command to continue the study[/]")  # fmt: skip
    else:
        console.print(f"stopped by {outcome.stopped_by} after {len(outcome.trials)} trials in this process")
