"""One `trainer tune` trial: the recipe with the trial's parameters, trained by train_run on
the training split, scored by the validation accuracy that train_run computes after each
epoch. The test set is never looked at (RunSpec.score_test=False); `trainer train
--recipe-file` scores it once, with the best parameters.

After each epoch the validation accuracy is reported to Optuna, whose pruner may end the
trial there (optuna.TrialPruned, raised out of train_run's epoch loop). The objective is the
last epoch's validation accuracy. A trial's run dir (checkpoints) is scratch, removed when
the trial ends.
"""

from __future__ import annotations

import os
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import optuna
from rich.console import Console

from trainer import search_space
from trainer.environment import Environment
from trainer.train import RunSpec, train_run


@dataclass
class TrainingObjective:
    dataset: str
    recipe: str
    architecture: str
    base: dict  # the recipe with fixed parameters and --epochs applied
    space: dict  # name -> search_space.Param
    train_set: object
    test_set: object  # required by train_run's signature; never scored (score_test=False)
    env: Environment
    scratch_dir: Path
    seed: int
    val_fraction: float
    split_seed: int
    precision: str = "auto"
    channels_last: bool = True
    on_epoch: Callable[[optuna.trial.Trial, dict], None] | None = None  # progress display

    def hyper_for(self, trial) -> dict:
        return search_space.apply(self.base, search_space.suggest(trial, self.space))

    def __call__(self, trial: optuna.trial.Trial) -> float:
        hyper = self.hyper_for(trial)
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        run_dir = self.scratch_dir / f"trial-{trial.number}"
        started = time.monotonic()
        last = {"epochs": 0}

        def report(row: dict) -> None:
            last["epochs"] = row["epoch"]
            trial.set_user_attr("epochs_run", row["epoch"])
            trial.report(row["val_accuracy"], step=row["epoch"])
            if self.on_epoch is not None:
                self.on_epoch(trial, row)
            if trial.should_prune():
                raise optuna.TrialPruned(f"val accuracy {row['val_accuracy']:.4f} after epoch {row['epoch']}")

        spec = RunSpec(dataset=self.dataset, architecture=self.architecture, hyper=hyper, seed=self.seed,
                       run_dir=run_dir, val_fraction=self.val_fraction, split_seed=self.split_seed,
                       precision=self.precision, channels_last=self.channels_last, on_epoch=report,
                       score_test=False, command=f"trainer tune (trial {trial.number})")  # fmt: skip
        quiet = Console(file=open(os.devnull, "w"))  # the tune display speaks for the trial
        try:
            summary = train_run(spec, self.env, self.train_set, self.test_set, quiet)
            return summary["history"][-1]["val_accuracy"]
        finally:
            trial.set_user_attr("seconds", round(time.monotonic() - started, 1))
            quiet.file.close()
            shutil.rmtree(run_dir, ignore_errors=True)
