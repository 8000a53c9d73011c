"""The study engine of `trainer tune`: open (or join) an Optuna study and run trials until
a limit, with no coordinator of our own.

Several processes, on one machine or many, share a study by sharing its storage: an
SQLite file, or any SQLAlchemy URL (PostgreSQL across machines). Optuna's storage hands
out trial numbers atomically, so no trial runs twice; its heartbeat marks the running
trials of a process that died as FAIL, so a joined study never waits on them.

Limits, checked before each trial:
  n_trials       trials this process runs;
  study_trials   the study's total of finished (complete or pruned) and running trials,
                 the limit several processes finish one study by;
  budget         seconds since this process started, and no trial is started that the
                 median of this process's trials says would overrun it.
Ctrl-C (KeyboardInterrupt, or the trainer's TrainingInterrupted) ends the current trial as
FAIL with the user attribute `interrupted`, and stops; the study stays resumable.
"""

from __future__ import annotations

import statistics
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable

import optuna
from optuna.trial import TrialState

from trainer.errors import TrainerError, TrainingInterrupted

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
PRUNERS = ("median", "hyperband", "none")


class _Surplus(Exception):
    """Raised inside a trial that another process's trials made one too many for study_trials."""


@dataclass
class Limits:
    n_trials: int | None = None
    study_trials: int | None = None
    budget_seconds: float | None = None

    def check(self) -> None:
        if self.n_trials is None and self.study_trials is None and self.budget_seconds is None:
            raise TrainerError("say when to stop: --n-trials, --study-trials and/or --budget-minutes")
        for name, value in (("--n-trials", self.n_trials), ("--study-trials", self.study_trials)):
            if value is not None and value < 1:
                raise TrainerError(f"{name} must be >= 1, got {value}")
        if self.budget_seconds is not None and self.budget_seconds <= 0:
            raise TrainerError(f"--budget-minutes must be > 0, got {self.budget_seconds / 60:g}")


@dataclass
class Outcome:
    trials: list = field(default_factory=list)  # the FrozenTrials this process ran
    stopped_by: str = ""  # which limit ended the run, or "interrupted"


def make_storage(url: str, attempts: int = 5):
    """An RDB storage for the URL, with a heartbeat so a dead process's trials do not stay RUNNING.

    Processes started together on a fresh database race to create Optuna's tables; the loser
    meets an IntegrityError (or a locked SQLite file) and opens the storage again once the
    winner is done.
    """
    import sqlalchemy.exc

    engine_kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    for attempt in range(attempts):
        try:
            with warnings.catch_warnings():  # the heartbeat is "experimental" in Optuna's words
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, heartbeat_interval=30,
                                                  grace_period=120)  # fmt: skip
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.OperationalError) as error:
            if attempt == attempts - 1:
                raise TrainerError(f"--storage {url}: cannot open it ({type(error).__name__}: {error})") from None
            time.sleep(1 + attempt)
        except Exception as error:  # sqlalchemy's other errors: a bad URL, an absent driver
            raise TrainerError(f"--storage {url}: cannot open it ({type(error).__name__}: {error})") from None


def make_pruner(name: str, startup_trials: int, max_epochs: int):
    """The median pruner (prune below the median of earlier trials at the same epoch), Hyperband, or none."""
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=startup_trials, n_warmup_steps=0)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max(max_epochs, 1))
    return optuna.pruners.NopPruner()


def open_study(storage, name: str, settings: dict, sampler_seed: int | None, pruner) -> optuna.Study:
    """Create the study, or load it when it exists; refuse to join one run with other settings.

    settings (recipe, dataset, epochs per trial, split, seed) are the study's user attributes:
    the trials of one study are comparable only when they agree.
    """
    with warnings.catch_warnings():  # constant_liar and multivariate are "experimental" in Optuna's words
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        # constant_liar: a running trial counts as a poor result, so processes sharing the
        # study spread out instead of all sampling next to the same best point.
        sampler = optuna.samplers.TPESampler(seed=sampler_seed, multivariate=True, constant_liar=True)
    study = optuna.create_study(storage=storage, study_name=name, direction="maximize", sampler=sampler,
                                pruner=pruner, load_if_exists=True)  # fmt: skip
    recorded = study.user_attrs.get("settings")
    if recorded is None:
        study.set_user_attr("settings", settings)
    elif recorded != settings:
        differ = ", ".join(f"{k} {recorded.get(k)!r} (not {settings.get(k)!r})" for k in sorted(set(recorded) | set(settings))
                           if recorded.get(k) != settings.get(k))  # fmt: skip
        raise TrainerError(f"study {name!r} was run with {differ}; resume it with the same settings or pick another --study")
    return study


def _live_count(study: optuna.Study, below: int | None = None) -> int:
    """Trials that finished or are running (numbered below `below`, if given)."""
    trials = study.get_trials(deepcopy=False, states=(*FINISHED, TrialState.RUNNING))
    return sum(1 for t in trials if below is None or t.number < below)


def run_trials(study: optuna.Study, objective: Callable, limits: Limits,
               on_trial_done: Callable | None = None) -> Outcome:  # fmt: skip
    """Run objective(trial) -> validation accuracy, one trial at a time, until a limit; Ctrl-C stops cleanly."""
    outcome, started, durations, current = Outcome(), time.monotonic(), [], {}

    def guarded(trial):
        current["number"] = trial.number
        if limits.study_trials is not None and _live_count(study, below=trial.number) >= limits.study_trials:
            trial.set_user_attr("surplus", True)  # another process took the last place first
            raise _Surplus
        try:
            return objective(trial)
        except (KeyboardInterrupt, TrainingInterrupted):
            trial.set_user_attr("interrupted", True)
            raise

    while True:
        outcome.stopped_by = _limit_reached(study, limits, len(outcome.trials), time.monotonic() - started, durations)
        if outcome.stopped_by:
            return outcome
        trial_started = time.monotonic()
        try:
            # One trial per call: Optuna's own loop records PRUNED and FAIL and runs the heartbeat.
            study.optimize(guarded, n_trials=1, catch=(), gc_after_trial=False)
        except _Surplus:
            outcome.stopped_by = "study_trials"
            return outcome
        except (KeyboardInterrupt, TrainingInterrupted):
            outcome.stopped_by = "interrupted"
            outcome.trials.extend(_trial(study, current.get("number")))
            return outcome
        durations.append(time.monotonic() - trial_started)
        outcome.trials.extend(_trial(study, current.get("number")))
        if on_trial_done is not None:
            on_trial_done(outcome.trials[-1])


def _trial(study: optuna.Study, number: int | None) -> list:
    """[the trial this process just ran] (the study may hold newer trials of other processes)."""
    return [t for t in study.get_trials(deepcopy=False) if t.number == number]


def _limit_reached(study, limits: Limits, done: int, elapsed: float, durations: list[float]) -> str:
    if limits.n_trials is not None and done >= limits.n_trials:
        return "n_trials"
    if limits.study_trials is not None and _live_count(study) >= limits.study_trials:
        return "study_trials"
    if limits.budget_seconds is not None:
        expected = statistics.median(durations) if durations else 0.0
        if elapsed + expected > limits.budget_seconds:
            return "budget"
    return ""
