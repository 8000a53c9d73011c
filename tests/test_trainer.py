"""The trainer end to end on tiny generated data sets (written in the real on-disk formats).

Real training on the shared data sets is in the realdata-marked tests at the bottom and
in the run dirs under runs/; these tests check the machinery: run dir contents, reload
to identical outputs, ensembles, DDP under torchrun, resume after Ctrl-C, bad input.
"""

from __future__ import annotations

import os

# Before torch loads: spinning OpenMP threads make the shared 2-core machine crawl (see trainer/cli.py).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from ensemble_serving.datasets import load_dataset
from tests.support.datasets import write_cifar_batches, write_mnist_split
from trainer import data as tdata
from trainer.checkpoint import RunDirError, load_serving_model, read_config
from trainer.cli import main
from trainer.environment import Environment
from trainer.optim import Lookahead, lr_factor
from trainer.recipes import get_recipe
from trainer.serving import serving_model_from
from trainer.train import RunSpec, train_run

REPO = Path(__file__).resolve().parents[1]
REAL_DATA = REPO.parent / "shared" / "data"
RUN_DIR_FILES = {"model.safetensors", "config.json", "metrics.csv", "history.json", "curves.png",
                 "confusion_matrix.png", "confusion_matrix.json", "per_class.csv"}  # fmt: skip

pytestmark = [
    pytest.mark.filterwarnings("ignore::ensemble_serving.datasets.DatasetChecksumWarning"),
    pytest.mark.usefixtures("few_threads"),
]


# --------------------------------------------------------------------------- tiny data sets


def _learnable_images(n: int, size: int, channels: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """Noise plus a bright 4x4 patch whose position encodes the class: learnable in an epoch."""
    labels = rng.integers(0, 10, n)
    images = rng.integers(0, 60, (n, size, size, channels)).astype(np.uint8)
    for i, label in enumerate(labels):
        row, col = divmod(int(label), 5)
        y, x = 4 + row * 10, 2 + col * 5
        images[i, y : y + 4, x : x + 4, :] = 255
    return images, labels


@pytest.fixture(scope="module")
def tiny_mnist(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mnist-data")
    rng = np.random.default_rng(0)
    for split, n in (("train", 600), ("test", 200)):
        images, labels = _learnable_images(n, 28, 1, rng)
        write_mnist_split(root, split, images, labels.astype(np.uint8), gz=True, gz_labels=False)  # both forms
    return root


@pytest.fixture(scope="module")
def tiny_cifar(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cifar-data")
    rng = np.random.default_rng(1)
    batches = {name: _learnable_images(100, 32, 3, rng) for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]}
    return write_cifar_batches(root, batches, label_names=[f"c{i}" for i in range(10)])


def _invoke(args: list[str]):
    return CliRunner().invoke(main, args, catch_exceptions=False)


# --------------------------------------------------------------------------- end to end


def test_one_epoch_ensemble_writes_complete_run_dirs_that_reload(tiny_mnist, tmp_path):
    out = tmp_path / "runs"
    result = _invoke(["train", "--dataset", "mnist", "--data-dir", str(tiny_mnist), "--output-dir", str(out),
                      "--epochs", "1", "--batch-size", "64", "--seeds", "0,1", "--val-fraction", "0.2",
                      "--widths", "8,24", "--no-download"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "Summary" in result.output and "per-class test accuracy" in result.output
    test = load_dataset("mnist", "test", tiny_mnist, download=False)
    accuracies = []
    for seed in (0, 1):
        run_dir = out / f"mnist-lenet-s{seed}"
        assert RUN_DIR_FILES <= {p.name for p in run_dir.iterdir()}
        assert not (run_dir / "checkpoint.pt").exists(), "a finished run drops its resume state"
        config = json.loads((run_dir / "config.json").read_text())
        assert config["format_version"] == 1 and config["status"] == "complete"
        assert config["architecture"] == "lenet" and config["seed"] == seed
        assert config["arch_args"]["widths"] == [8, 24]  # --widths reaches the rebuilt network
        assert config["input"] == {"height": 28, "width": 28, "channels": 1, "dtype": "uint8", "layout": "NHWC"}
        assert config["normalization"] == {"mean": [0.1307], "std": [0.3081]}
        assert config["train_samples"] == 480 and config["val_samples"] == 120
        assert config["hyperparameters"]["epochs"] == 1 and config["versions"]["torch"] == torch.__version__
        # train_seconds is rounded to 0.1 s, so a fast epoch may read 0.0: check the epoch ran instead.
        assert len(config["metrics"]) and config["epochs_completed"] == 1 and config["training"]["train_seconds"] >= 0

        # The recorded figure is exactly what the reloaded serving model gives on uint8 images.
        model, loaded_config = load_serving_model(run_dir)
        assert loaded_config == config
        with torch.no_grad():
            probs = model(torch.from_numpy(test.images)).numpy()
        assert probs.dtype == np.float32 and probs.shape == (200, 10)
        np.testing.assert_allclose(probs.sum(1), 1, rtol=1e-5)
        accuracy = float((probs.argmax(1) == test.labels).mean())
        assert accuracy == config["metrics"]["test_accuracy"]
        accuracies.append(accuracy)

        per_class = (run_dir / "per_class.csv").read_text().splitlines()
        assert per_class[0] == "class,accuracy,precision,recall,f1,support" and len(per_class) == 11
        cm = json.loads((run_dir / "confusion_matrix.json").read_text())["matrix"]
        assert np.trace(np.array(cm)) == round(accuracy * 200)
        assert len(json.loads((run_dir / "history.json").read_text())) == 1
    assert max(accuracies) > 0.3, "one epoch on the patch data must beat chance (10%)"
    evaluated = _invoke(["evaluate", str(out / "mnist-lenet-s0"), "--data-dir", str(tiny_mnist), "--no-download"])
    assert evaluated.exit_code == 0 and f"accuracy {accuracies[0]:.2%}" in evaluated.output
    assert "(difference 0.000 points)" in evaluated.output
    on_val = _invoke(["evaluate", str(out / "mnist-lenet-s0"), "--split", "val", "--data-dir", str(tiny_mnist)])
    assert on_val.exit_code == 0 and "(120 images)" in on_val.output and "(difference 0.000 points)" in on_val.output
    ensemble = json.loads((out / "mnist-lenet-ensemble.json").read_text())
    assert ensemble["members"] == [str(out / "mnist-lenet-s0"), str(out / "mnist-lenet-s1")]
    assert ensemble["member_test_accuracy"] == accuracies and 0 <= ensemble["test_accuracy"] <= 1

    # `compare` reads the same figures back, skips what is not a finished run, and plots.
    interrupted = {**json.loads((out / "mnist-lenet-s1" / "config.json").read_text()), "status": "interrupted"}
    (tmp_path / "interrupted-run").mkdir()
    (tmp_path / "interrupted-run" / "config.json").write_text(json.dumps(interrupted))
    plot = tmp_path / "compare.png"
    compared = _invoke(["compare", str(out / "mnist-lenet-s0"), str(out / "mnist-lenet-s1"),
                        str(tmp_path / "interrupted-run"), str(out),
                        "--plot", str(plot), "--target", "0.5", "--budget-minutes", "1"])  # fmt: skip
    assert compared.exit_code == 0, compared.output
    assert "not a finished run (status 'interrupted')" in compared.output
    assert f"skipping {out}: {out} has no config.json" in compared.output
    for accuracy in accuracies:
        assert f"{accuracy:.2%}" in compared.output
    parameters = json.loads((out / "mnist-lenet-s0" / "config.json").read_text())["parameters"]
    assert f"{parameters:,}" in compared.output
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("recipe", ["airbench", "airbench_sgd"])
def test_airbench_run_reloads_to_identical_outputs(recipe, tiny_cifar, tmp_path):
    """Whitening init, Muon or SGD with lookahead, BN-bias lr scaling, flip TTA: the reloaded module matches bit for bit."""
    hyper = get_recipe(recipe)
    hyper.update(epochs=1, batch_size=100, arch_args={"widths": [16, 32, 32], "whiten_width": 12}, tta="hflip_translate")
    train = load_dataset("cifar10", "train", tiny_cifar, download=False)
    test = load_dataset("cifar10", "test", tiny_cifar, download=False)
    spec = RunSpec(dataset="cifar10", architecture="airbench", hyper=hyper, seed=3, run_dir=tmp_path / "air",
                   val_fraction=0.1, precision="fp32")  # fmt: skip
    summary = train_run(spec, Environment(torch.device("cpu")), train, test, console=_quiet_console())
    config = summary["config"]
    assert config["serving"] == {"tta": "hflip_translate"}
    assert config["hyperparameters"]["lookahead"] is (recipe == "airbench_sgd")
    assert config["hyperparameters"]["optimizer"] == ("sgd" if recipe == "airbench_sgd" else "muon")

    in_memory = serving_model_from(summary["network"], config).eval()
    reloaded, _ = load_serving_model(tmp_path / "air")
    images = torch.from_numpy(test.images)
    with torch.no_grad():
        assert torch.equal(in_memory(images), reloaded(images))
        # Flip TTA really averages over the mirror image: a mirrored input gives the same output.
        flip_only = serving_model_from(summary["network"], {**config, "serving": {"tta": "hflip"}}).eval()
        np.testing.assert_allclose(flip_only(images.flip(2)).numpy(), flip_only(images).numpy(), atol=1e-5)
        assert not torch.allclose(flip_only(images), reloaded(images))  # the shifted views count too


def _quiet_console():
    from rich.console import Console

    return Console(file=open(os.devnull, "w"))


# --------------------------------------------------------------------------- distributed and resume


def _trainer_subprocess_env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def test_torchrun_two_processes_on_cpu(tiny_mnist, tmp_path):
    out = tmp_path / "runs"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "trainer", "train", "--dataset", "mnist", "--data-dir", str(tiny_mnist), "--output-dir", str(out),
               "--epochs", "1", "--batch-size", "64", "--device", "cpu", "--no-download", "--threads", "1"]  # fmt: skip
    # Its own session, so a timeout takes down torchrun's workers too, not only torchrun.
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=_trainer_subprocess_env(), cwd=REPO, start_new_session=True)  # fmt: skip
    try:
        stdout, stderr = process.communicate(timeout=280)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
    assert process.returncode == 0, stdout + stderr
    assert "2 processes" in stdout
    config = json.loads((out / "mnist-lenet-s0" / "config.json").read_text())
    assert config["training"]["world_size"] == 2 and config["status"] == "complete"
    assert RUN_DIR_FILES <= {p.name for p in (out / "mnist-lenet-s0").iterdir()}
    load_serving_model(out / "mnist-lenet-s0")


def test_ctrl_c_leaves_a_checkpoint_that_resume_finishes(tiny_mnist, tmp_path):
    out = tmp_path / "runs"
    base = [sys.executable, "-m", "trainer", "train", "--dataset", "mnist", "--data-dir", str(tiny_mnist),
            "--output-dir", str(out), "--batch-size", "64", "--no-download", "--threads", "1"]  # fmt: skip
    run_dir = out / "mnist-lenet-s0"
    # A shell that runs this suite in the background starts it with SIGINT ignored, and the
    # trainer would inherit that; give it the default disposition a terminal's Ctrl-C meets.
    process = subprocess.Popen(base + ["--epochs", "40"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=_trainer_subprocess_env(), cwd=REPO,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
    deadline = time.monotonic() + 120
    while not (run_dir / "checkpoint.pt").exists():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "no checkpoint after two minutes"
        time.sleep(0.1)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stdout + stderr
    assert "--resume" in stderr and "Traceback" not in stderr
    interrupted = json.loads((run_dir / "config.json").read_text())
    assert interrupted["status"] == "interrupted" and interrupted["epochs_completed"] < 40
    load_serving_model(run_dir)  # usable as it stands

    # Resume with a shorter --epochs on the command line: the saved hyperparameters win.
    done = subprocess.run(base + ["--epochs", "1", "--resume"], capture_output=True, text=True, timeout=300,
                          env=_trainer_subprocess_env(), cwd=REPO)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "resuming" in done.stdout
    finished = json.loads((run_dir / "config.json").read_text())
    assert finished["status"] == "complete" and finished["epochs_completed"] == 40
    assert [row["epoch"] for row in json.loads((run_dir / "history.json").read_text())] == list(range(1, 41))


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--dataset", "svhn"], "Invalid value for '--dataset': 'svhn' is not one of 'mnist', 'cifar10'"),
        (["--dataset", "mnist", "--arch", "resnet"], "Invalid value for '--arch'"),
        (["--dataset", "mnist", "--batch-size", "0"], "--batch-size must be >= 1"),
        (["--dataset", "mnist", "--batch-size", "5000"], "larger than the 600 training images"),
        (["--dataset", "mnist", "--lr", "-0.1"], "--lr must be a positive number"),
        (["--dataset", "mnist", "--val-fraction", "1.5"], "--val-fraction must be in [0, 1)"),
        (["--dataset", "mnist", "--label-smoothing", "1"], "--label-smoothing must be in [0, 1)"),
        (["--dataset", "mnist", "--seeds", "0,x"], "comma-separated integers"),
        (["--dataset", "mnist", "--widths", "16,x"], "comma-separated positive integers"),
        (["--dataset", "mnist", "--widths", "16,32,64"], "this network has 2 stages, got 3 widths"),
        (["--dataset", "cifar10"], "CIFAR-10 train files not found"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tiny_mnist, tmp_path, args, message):
    result = CliRunner().invoke(main, ["train", "--data-dir", str(tiny_mnist), "--output-dir", str(tmp_path),
                                       "--no-download", *args])  # fmt: skip
    assert result.exit_code == 2
    assert message in result.stderr
    assert result.stderr.startswith("trainer: error: ") and result.stderr.count("\n") == 1
    assert "Traceback" not in result.output


def test_missing_data_from_the_real_command_has_no_traceback(tmp_path):
    done = subprocess.run([sys.executable, "-m", "trainer", "train", "--dataset", "mnist", "--data-dir", str(tmp_path),
                           "--output-dir", str(tmp_path / "runs"), "--no-download"],
                          capture_output=True, text=True, timeout=120, cwd=REPO)  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "MNIST train files not found" in done.stderr
    assert "--data-dir" in done.stderr and "ENSEMBLE_SERVING_DATA_DIR" in done.stderr
    assert not (tmp_path / "runs").exists()


# --------------------------------------------------------------------------- pieces


@pytest.mark.parametrize(("architecture", "channels", "size"),
                         [("lenet", 1, 28), ("mnist_cnn", 1, 28), ("cifar_cnn", 3, 32), ("airbench", 3, 32)])  # fmt: skip
def test_every_architecture_serves_uint8_nhwc_as_probabilities(architecture, channels, size):
    from trainer.serving import ServingModel
    from trainer.models import build_model

    network = build_model(architecture, channels, 10, size, **get_recipe(architecture)["arch_args"])
    model = ServingModel(network, [0.5] * channels, [0.25] * channels, tta="hflip" if channels == 3 else "none").eval()
    with torch.no_grad():
        probs = model(torch.randint(0, 256, (3, size, size, channels), dtype=torch.uint8))
    assert probs.shape == (3, 10) and probs.dtype == torch.float32
    torch.testing.assert_close(probs.sum(1), torch.ones(3))


def test_a_config_without_serving_tta_is_refused_not_served_without_it(tmp_path):
    """Drafts before format_version 1 wrote serving {"hflip_tta": true}; no shim reads that any more,
    so such a run dir must fail loudly rather than serve without its test-time augmentation."""
    config = {"format_version": 1, "architecture": "lenet", "dataset": "mnist", "class_names": list("0123456789"),
              "input": {"height": 28, "width": 28, "channels": 1}, "normalization": {"mean": [0.1], "std": [0.3]},
              "serving": {"hflip_tta": True}}  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(RunDirError, match=r"serving\.tta is None, expected one of none, hflip, hflip_translate"):
        read_config(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**config, "serving": {"tta": "hflip"}}))
    assert read_config(tmp_path)["serving"] == {"tta": "hflip"}


def test_lr_schedules_warm_up_then_decay():
    h = get_recipe("airbench_sgd")  # onecycle 0.2 -> 1 over 23%, then -> 0.07
    assert lr_factor(0, 100, h) == pytest.approx(0.2)
    assert lr_factor(23, 100, h) == pytest.approx(1.0)
    assert lr_factor(100, 100, h) == pytest.approx(0.07)
    h.update(schedule="cosine", warmup=0.1, lr_end_factor=0.0)
    assert lr_factor(10, 100, h) == pytest.approx(1.0) and lr_factor(55, 100, h) == pytest.approx(0.5)
    h.update(schedule="step", warmup=0.0, step_milestones=[0.5, 0.75], step_gamma=0.1)
    assert [lr_factor(s, 100, h) for s in (0, 49, 50, 80)] == pytest.approx([1, 1, 0.1, 0.01])


def test_lookahead_averages_more_as_training_ends_and_finishes_on_slow_weights():
    network = torch.nn.Linear(1, 1, bias=False)
    torch.nn.init.zeros_(network.weight)
    lookahead = Lookahead(network, every=1, decay=0.5)
    with torch.no_grad():
        network.weight.fill_(1.0)
    lookahead.step(network, global_step=1, total_steps=100)  # decay ~0: slow jumps to fast
    assert network.weight.item() == pytest.approx(1.0, abs=1e-5)
    with torch.no_grad():
        network.weight.fill_(3.0)
    lookahead.step(network, global_step=100, total_steps=100)  # decay 0.5: halfway
    assert network.weight.item() == pytest.approx(2.0, abs=1e-4)
    with torch.no_grad():
        network.weight.fill_(9.0)
    lookahead.finish(network)
    assert network.weight.item() == pytest.approx(2.0, abs=1e-4)


def test_validation_split_is_stratified_disjoint_and_seeded():
    labels = np.repeat(np.arange(10), 50)
    train_idx, val_idx = tdata.split_train_validation(labels, 0.2, seed=0)
    assert len(np.intersect1d(train_idx, val_idx)) == 0 and len(train_idx) + len(val_idx) == 500
    assert np.bincount(labels[val_idx]).tolist() == [10] * 10
    assert np.array_equal(val_idx, tdata.split_train_validation(labels, 0.2, seed=0)[1])
    assert not np.array_equal(val_idx, tdata.split_train_validation(labels, 0.2, seed=1)[1])


def test_augmentation_is_a_pure_function_of_seed_and_epoch():
    images = torch.arange(8 * 3 * 8 * 8, dtype=torch.int64).remainder(251).to(torch.uint8).view(8, 3, 8, 8)
    aug = tdata.Augmentation(translate=2, pad_mode="reflect", flip="alternating", cutout=3)
    first = tdata.augment_epoch(images, aug, epoch=0, seed=5)
    assert torch.equal(first, tdata.augment_epoch(images, aug, epoch=0, seed=5))
    assert not torch.equal(first, tdata.augment_epoch(images, aug, epoch=1, seed=5))
    # Alternating flips: each image is mirrored in exactly one of two consecutive epochs.
    m0, m1 = tdata.flip_mask(8, "alternating", 0, 5), tdata.flip_mask(8, "alternating", 1, 5)
    assert torch.equal(m0, ~m1)


def test_translate_shifts_content_and_cutout_zeroes_a_square():
    images = torch.zeros(64, 1, 9, 9, dtype=torch.uint8)
    images[:, :, 4, 4] = 200  # one bright pixel in the middle
    shifted = tdata.random_translate(images, 2, "constant", torch.Generator().manual_seed(0))
    positions = {tuple(torch.nonzero(img[0]).flatten().tolist()) for img in shifted}
    assert positions <= {(y, x) for y in range(2, 7) for x in range(2, 7)} and len(positions) > 10
    ones = torch.full((16, 1, 16, 16), 7, dtype=torch.uint8)
    cut = tdata.random_cutout(ones, 4, torch.Generator().manual_seed(0))
    zeroed = (cut == 0).sum(dim=(1, 2, 3))
    assert (zeroed <= 16).all() and (zeroed > 0).all()


def test_uint8_reflect_padding_matches_torch_reflect_padding():
    images = torch.randint(0, 256, (3, 2, 5, 6), dtype=torch.uint8)
    expected = torch.nn.functional.pad(images.float(), (2, 2, 2, 2), mode="reflect").to(torch.uint8)
    assert torch.equal(tdata.pad(images, 2, "reflect"), expected)


def test_loader_shards_each_batch_across_ranks():
    images = torch.zeros(40, 1, 4, 4, dtype=torch.uint8)
    labels = torch.arange(40)
    ranks = [list(tdata.InMemoryLoader(images, labels, 8, None, seed=0, rank=r, world_size=2).epoch(0)) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 5
    for (_, a), (_, b) in zip(*ranks):
        assert len(a) == len(b) == 4 and not set(a.tolist()) & set(b.tolist())
    seen = torch.cat([lab for rank in ranks for _, lab in rank])
    assert sorted(seen.tolist()) == list(range(40))


# --------------------------------------------------------------------------- real data (slow)


@pytest.mark.realdata
@pytest.mark.slow
@pytest.mark.skipif(not REAL_DATA.is_dir(), reason="../shared/data not present")
def test_lenet_on_real_mnist_reaches_99_3(tmp_path):
    result = _invoke(["train", "--dataset", "mnist", "--data-dir", str(REAL_DATA), "--output-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "mnist-lenet-s0" / "config.json").read_text())
    assert config["metrics"]["test_accuracy"] >= 0.993
