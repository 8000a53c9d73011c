"""`trainer tune` end to end on a tiny generated MNIST: real Optuna studies in real SQLite
files (and, marked slow, a real PostgreSQL cluster started here), real training trials,
real subprocesses sharing one study; the recipe file it writes, read back by `trainer train`.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads (see trainer/cli.py)

import glob
import json
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import optuna
import pytest
from click.testing import CliRunner

from tests.support.datasets import write_mnist_split
from trainer import search_space
from trainer.checkpoint import read_config
from trainer.cli import main
from trainer.errors import TrainerError
from trainer.recipe_file import load_recipe_file, write_recipe_file
from trainer.recipes import get_recipe
from trainer.tune import Limits, make_storage, open_study, run_trials
from trainer.tune_report import trial_rows, write_tables

REPO = Path(__file__).resolve().parents[1]

pytestmark = [
    pytest.mark.filterwarnings("ignore::ensemble_serving.datasets.DatasetChecksumWarning"),
    pytest.mark.usefixtures("few_threads"),
]


@pytest.fixture(scope="module")
def tiny_mnist(tmp_path_factory) -> Path:
    """600 train / 200 test images: noise plus a bright patch whose place is the class."""
    root = tmp_path_factory.mktemp("mnist-data")
    rng = np.random.default_rng(0)
    for split, n in (("train", 600), ("test", 200)):
        labels = rng.integers(0, 10, n)
        images = rng.integers(0, 60, (n, 28, 28)).astype(np.uint8)
        for i, label in enumerate(labels):
            row, col = divmod(int(label), 5)
            images[i, 4 + row * 10 : 8 + row * 10, 2 + col * 5 : 6 + col * 5] = 255
        write_mnist_split(root, split, images, labels.astype(np.uint8))
    return root


def _tune_args(data: Path, out: Path, *extra: str) -> list[str]:
    # Small batches only: 540 training images after the 10 % split.
    return ["tune", "--dataset", "mnist", "--data-dir", str(data), "--no-download", "--output-dir", str(out),
            "--epochs", "2", "--space", "batch_size=64|128", "--space", "widths=8,16", "--space", "hidden=64",
            "--device", "cpu", "--threads", "1", *extra]  # fmt: skip


def _invoke(args: list[str]):
    return CliRunner().invoke(main, args, catch_exceptions=False)


def _study(out: Path, name: str = "mnist-lenet") -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{out / 'optuna.db'}")


# --------------------------------------------------------------------------- one process


def test_three_trial_study_writes_its_report_and_resume_adds_trials(tiny_mnist, tmp_path):
    out = tmp_path / "tune"
    first = _invoke(_tune_args(tiny_mnist, out, "--n-trials", "3", "--sampler-seed", "1"))
    assert first.exit_code == 0, first.output
    study = _study(out)
    assert [t.number for t in study.trials] == [0, 1, 2]
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)  # 5 startup trials: none pruned
    assert all(sorted(t.intermediate_values) == [1, 2] for t in study.trials)  # one report per epoch
    best = study.best_trial
    assert 0 < best.value <= 1 and best.user_attrs["epochs_run"] == 2

    study_dir = out / "mnist-lenet"
    table = (study_dir / "trials.md").read_text()
    assert table.count("| COMPLETE |") == 2 and "**COMPLETE**" in table  # the best row in bold
    rows = json.loads((study_dir / "trials.json").read_text())
    assert [r["params"]["lr"] for r in rows] == [t.params["lr"] for t in study.trials]
    for plot in ("optimization_history", "intermediate_values", "parallel_coordinate", "slice", "param_importances"):
        assert (study_dir / "plots" / f"{plot}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", plot
    assert not (study_dir / "trials").exists() or not any((study_dir / "trials").iterdir())  # scratch removed

    name, hyper = load_recipe_file(study_dir / "best_recipe.json")
    assert name == "lenet" and hyper["lr"] == best.params["lr"] and hyper["epochs"] == get_recipe("lenet")["epochs"]
    assert hyper["arch_args"]["widths"] == [8, 16] and hyper["arch_args"]["dropout"] == best.params["dropout"]

    # Resume: the same command adds trials to the same study, numbered on.
    again = _invoke(_tune_args(tiny_mnist, out, "--n-trials", "2"))
    assert again.exit_code == 0, again.output
    assert "3 trials so far" in again.output
    assert [t.number for t in _study(out).trials] == [0, 1, 2, 3, 4]


def test_a_study_refuses_to_resume_with_other_settings(tiny_mnist, tmp_path):
    out = tmp_path / "tune"
    assert _invoke(_tune_args(tiny_mnist, out, "--n-trials", "1")).exit_code == 0
    result = CliRunner().invoke(main, _tune_args(tiny_mnist, out, "--n-trials", "1") + ["--epochs", "3"])
    assert result.exit_code == 2
    assert "epochs_per_trial 2 (not 3)" in result.output and "pick another --study" in result.output


# --------------------------------------------------------------------------- pruning


def test_a_clearly_worse_trial_is_pruned_and_shown_as_such(tmp_path):
    """A stub objective: three trials at 0.9 per epoch, then one at 0.1, which the median pruner ends."""
    storage = make_storage(f"sqlite:///{tmp_path / 'stub.db'}")
    study = open_study(storage, "stub", {"stub": True}, sampler_seed=0,
                       pruner=optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=0))  # fmt: skip
    epochs_run = []

    def objective(trial):
        trial.suggest_float("lr", 0.01, 1.0, log=True)
        accuracy = 0.1 if trial.number == 3 else 0.9
        for epoch in range(1, 4):
            epochs_run.append((trial.number, epoch))
            trial.report(accuracy, step=epoch)
            trial.set_user_attr("epochs_run", epoch)
            if trial.should_prune():
                raise optuna.TrialPruned()
        return accuracy

    outcome = run_trials(study, objective, Limits(n_trials=4))
    assert outcome.stopped_by == "n_trials"
    assert [t.state.name for t in outcome.trials] == ["COMPLETE", "COMPLETE", "COMPLETE", "PRUNED"]
    assert (3, 2) not in epochs_run  # pruned after its first epoch
    rows = trial_rows(study)
    assert rows[3]["state"] == "PRUNED" and rows[3]["epochs_run"] == 1 and rows[3]["val_accuracy"] == pytest.approx(0.1)
    write_tables(tmp_path, rows, "stub")
    assert "| 3 | PRUNED | 10.00% | 1 |" in (tmp_path / "trials.md").read_text()


def test_budget_and_study_trials_stop_the_loop(tmp_path):
    study = open_study(make_storage(f"sqlite:///{tmp_path / 's.db'}"), "s", {}, 0, optuna.pruners.NopPruner())

    def objective(trial):
        time.sleep(0.3)
        return trial.suggest_float("x", 0, 1)

    outcome = run_trials(study, objective, Limits(budget_seconds=1.0))
    assert outcome.stopped_by == "budget" and 2 <= len(outcome.trials) <= 4  # the median trial must still fit
    more = run_trials(study, objective, Limits(study_trials=len(study.trials) + 1))
    assert more.stopped_by == "study_trials" and len(more.trials) == 1


# --------------------------------------------------------------------------- several processes


def _subprocess_env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(REPO)}


def _share_one_study(data: Path, out: Path, storage: str, total: int) -> optuna.Study:
    """Two `trainer tune` processes on one storage until the study holds `total` trials."""
    command = [sys.executable, "-m", "trainer", *_tune_args(data, out, "--study-trials", str(total),
               "--storage", storage, "--study", "shared", "--pruner", "none")]  # fmt: skip
    processes = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                  env=_subprocess_env(), cwd=REPO, start_new_session=True) for _ in range(2)]  # fmt: skip
    try:
        outputs = [p.communicate(timeout=280)[0] for p in processes]
    finally:
        for p in processes:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    assert [p.returncode for p in processes] == [0, 0], "\n".join(outputs)
    return optuna.load_study(study_name="shared", storage=storage)


def _check_shared(study: optuna.Study, total: int) -> None:
    finished = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(finished) == total
    assert len({t.number for t in study.trials}) == len(study.trials)  # each trial number once
    assert all(len(t.intermediate_values) == 2 for t in finished)  # each trained once, two epochs
    workers = {t.user_attrs["worker"] for t in finished}
    assert len(workers) == 2, f"one process ran every trial: {workers}"
    surplus = [t for t in study.trials if t.state != optuna.trial.TrialState.COMPLETE]
    assert all(t.user_attrs.get("surplus") for t in surplus)  # at most the one each process asked too many


def test_two_processes_finish_one_study_with_no_trial_run_twice(tiny_mnist, tmp_path):
    out = tmp_path / "tune"
    out.mkdir()
    storage = f"sqlite:///{out / 'shared.db'}"
    _check_shared(_share_one_study(tiny_mnist, out, storage, total=8), total=8)


# --------------------------------------------------------------------------- the recipe file


def test_recipe_file_round_trips_through_trainer_train(tiny_mnist, tmp_path):
    hyper = search_space.apply(get_recipe("lenet"), {"lr": 0.0731, "widths": "8,16", "dropout": 0.05, "batch_size": 64})
    hyper["epochs"] = 1
    path = tmp_path / "recipe.json"
    write_recipe_file(path, "lenet", hyper, {"note": "hand-made"})
    assert load_recipe_file(path) == ("lenet", hyper)
    result = _invoke(["train", "--dataset", "mnist", "--recipe-file", str(path), "--data-dir", str(tiny_mnist),
                      "--output-dir", str(tmp_path / "runs"), "--no-download", "--device", "cpu"])  # fmt: skip
    assert result.exit_code == 0, result.output
    config = read_config(tmp_path / "runs" / "mnist-lenet-s0")
    recorded = {**config["hyperparameters"], "arch_args": config["arch_args"], "dataset": config["dataset"]}
    assert {k: v for k, v in recorded.items() if k != "recipe"} == hyper
    assert config["epochs_completed"] == 1 and config["arch_args"]["widths"] == [8, 16]


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ("{", "not JSON"),
        ('{"recipe": "lenet"}', 'expected a JSON object with "format"'),
        ('{"format": "ensemble-serving-recipe/1", "recipe": "resnet", "hyperparameters": {}}', '"recipe" must be one of'),
        ('{"format": "ensemble-serving-recipe/1", "recipe": "lenet", "hyperparameters": {"lr": 0.1, "speed": 3}}',
         "unknown recipe entries speed"),
        ('{"format": "ensemble-serving-recipe/1", "recipe": "lenet", "hyperparameters": {"arch_args": {"depth": 3}}}',
         "unknown arch_args entries depth"),
    ],
)
def test_a_bad_recipe_file_is_one_precise_line(tmp_path, document, message):
    path = tmp_path / "bad.json"
    path.write_text(document)
    result = CliRunner().invoke(main, ["train", "--dataset", "mnist", "--recipe-file", str(path)])
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output


def test_a_recipe_file_for_another_data_set_is_refused(tmp_path):
    path = tmp_path / "airbench.json"
    write_recipe_file(path, "airbench", get_recipe("airbench"))
    result = CliRunner().invoke(main, ["train", "--dataset", "mnist", "--recipe-file", str(path)])
    assert result.exit_code == 2 and "is a recipe for cifar10, not --dataset mnist" in result.output


# --------------------------------------------------------------------------- the search space


def test_space_narrows_and_fixes_from_the_command_line():
    space, fixed = search_space.narrow(search_space.space_for("lenet"),
                                       ["lr=0.05:0.5", "batch_size=128|256", "dropout=0.1", "widths=8,16|16,32"])  # fmt: skip
    assert (space["lr"].kind, space["lr"].low, space["lr"].high) == ("log", 0.05, 0.5)
    assert space["batch_size"].choices == (128, 256) and space["widths"].choices == ((8, 16), (16, 32))
    assert fixed == {"dropout": 0.1} and "dropout" not in space
    hyper = search_space.apply(get_recipe("lenet"), {**fixed, "widths": "16,32", "lr": 0.2})
    assert hyper["arch_args"] == {"widths": [16, 32], "hidden": 128, "dropout": 0.1}


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("momentum=0.9", "momentum is not searched for this recipe; it searches"),
        ("lr", "expected NAME=SPEC"),
        ("lr=0.5:0.05", "low < high"),
        ("lr=0:0.5", "log scale"),
        ("batch_size=big", "'big' is not a int like 64"),
        ("widths=8,16,32", "this network has 2 stages"),
    ],
)
def test_a_bad_space_option_is_one_precise_line(tiny_mnist, tmp_path, spec, message):
    result = CliRunner().invoke(main, ["tune", "--dataset", "mnist", "--n-trials", "1", "--space", spec,
                                       "--output-dir", str(tmp_path)])  # fmt: skip
    assert result.exit_code == 2 and message in result.output, result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "say when to stop"),
        (["--n-trials", "1", "--val-fraction", "0"], "the objective is validation accuracy"),
        (["--n-trials", "1", "--arch", "airbench"], "airbench is a recipe for cifar10, not mnist"),
        (["--n-trials", "1", "--storage", "nosuchdb://x"], "--storage nosuchdb://x: cannot open it"),
    ],
)
def test_bad_tune_options_are_one_precise_line(tmp_path, args, message):
    result = CliRunner().invoke(main, ["tune", "--dataset", "mnist", "--output-dir", str(tmp_path), *args])
    assert result.exit_code == 2 and message in result.output, result.output


def test_ctrl_c_ends_the_trial_and_leaves_the_study_resumable(tiny_mnist, tmp_path):
    out = tmp_path / "tune"
    command = [sys.executable, "-m", "trainer", *_tune_args(tiny_mnist, out, "--n-trials", "50")]
    command[command.index("--epochs") + 1] = "30"  # long trials, so the signal lands inside one
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=_subprocess_env(), cwd=REPO,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
    deadline = time.monotonic() + 120
    while not list((out / "mnist-lenet" / "trials").glob("trial-0/checkpoint.pt")):
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "no trial checkpoint after two minutes"
        time.sleep(0.1)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stdout + stderr
    assert "rerun the same command" in stdout and "Traceback" not in stdout + stderr
    trial = _study(out).trials[0]
    assert trial.state == optuna.trial.TrialState.FAIL and trial.user_attrs["interrupted"]
    assert "FAIL (interrupted)" in (out / "mnist-lenet" / "trials.md").read_text()
    # Resumable: the next run adds trial 1 and finishes it.
    again = _invoke(_tune_args(tiny_mnist, out, "--n-trials", "1", "--epochs", "30"))
    assert again.exit_code == 0, again.output
    assert [t.state.name for t in _study(out).trials] == ["FAIL", "COMPLETE"]


# --------------------------------------------------------------------------- PostgreSQL


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def postgresql_url():
    """A throwaway PostgreSQL cluster (Debian's package), trust auth on 127.0.0.1, removed afterwards."""
    binaries = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not binaries:
        pytest.skip("PostgreSQL's initdb is not installed (Debian: apt-get install postgresql)")
    pytest.importorskip("psycopg2", reason="psycopg2 (the test extra's psycopg2-binary) is not installed")
    bin_dir = Path(binaries[-1]).parent
    run_as = []
    if os.geteuid() == 0:  # initdb refuses root: run the cluster as the package's postgres user
        run_as = ["runuser", "-u", "postgres", "--"]
    data = Path(tempfile.mkdtemp(prefix="pg-tune-"))
    if run_as:
        shutil.chown(data, "postgres")
    port = _free_port()
    subprocess.run([*run_as, str(bin_dir / "initdb"), "-D", str(data / "db"), "-A", "trust", "-U", "tuner"],
                   check=True, capture_output=True)  # fmt: skip
    options = f"-c listen_addresses=127.0.0.1 -c port={port} -c unix_socket_directories={data}"
    subprocess.run([*run_as, str(bin_dir / "pg_ctl"), "-D", str(data / "db"), "-o", options, "-w",
                    "-l", str(data / "log"), "start"], check=True, capture_output=True)  # fmt: skip
    try:
        yield f"postgresql+psycopg2://tuner@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*run_as, str(bin_dir / "pg_ctl"), "-D", str(data / "db"), "-m", "immediate", "stop"],
                       capture_output=True)  # fmt: skip
        shutil.rmtree(data, ignore_errors=True)


@pytest.mark.slow
def test_a_real_postgresql_holds_a_study_that_two_processes_share(postgresql_url, tiny_mnist, tmp_path):
    out = tmp_path / "tune"
    out.mkdir()
    study = _share_one_study(tiny_mnist, out, postgresql_url, total=8)
    _check_shared(study, total=8)
    import sqlalchemy

    with sqlalchemy.create_engine(postgresql_url).connect() as connection:  # it really is in PostgreSQL
        count = connection.execute(sqlalchemy.text("SELECT count(*) FROM trials WHERE state = 'COMPLETE'")).scalar()
    assert count == 8
