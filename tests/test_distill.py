"""`trainer distill` end to end on tiny generated data: train members -> export (with the
exporter, --fused) -> distill a student from that teacher -> export the student.

Also: the teacher as an ensemble model dir (members, then the average) agrees with the
fused graph; bad --teacher values are one clear line; --resume reads the teacher's
cached probabilities instead of running it again; the KD loss and softening by themselves.
"""

from __future__ import annotations

import os

# Before torch loads: spinning OpenMP threads make the shared 2-core machine crawl (see trainer/cli.py).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import csv
import hashlib
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from ensemble_serving.datasets import load_dataset
from tests.support.tiny_pipeline import train_tiny_run, write_digit_like_data
from trainer import distill, teacher
from trainer.cli import main
from trainer.data import split_train_validation

pytestmark = [
    pytest.mark.filterwarnings("ignore::ensemble_serving.datasets.DatasetChecksumWarning"),
    pytest.mark.usefixtures("few_threads"),
]

NAME = "tiny"
VAL_FRACTION = 0.25
# A student as small as the tiny members, a few epochs of 240 images: seconds on one core.
STUDENT = ["--arch", "lenet", "--widths", "4,8", "--batch-size", "32", "--val-fraction", str(VAL_FRACTION),
           "--precision", "fp32", "--no-channels-last", "--threads", "1", "--device", "cpu",
           "--no-download"]  # fmt: skip


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> dict:
    """Two tiny LeNets on digit-like data, exported with --fused: tiny-m0, tiny-m1, tiny-average, tiny, tiny-fused."""
    from exporter.export import export_repository

    root = tmp_path_factory.mktemp("distill")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # generated IDX files are not the official release's md5
        data_dir = write_digit_like_data(root / "data")
        runs = [train_tiny_run(root / "runs" / f"{NAME}-s{seed}", data_dir, seed) for seed in (0, 1)]
        export_repository(runs, root / "model_repository", NAME, data_dir=data_dir, fused=True, max_batch_size=16)
    return {"data_dir": data_dir, "repository": root / "model_repository", "runs": runs}


def _distill(args: list[str]):
    return CliRunner().invoke(main, ["distill", *args], catch_exceptions=False)


def _metrics(run_dir: Path) -> list[dict]:
    with open(run_dir / "metrics.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def test_student_from_a_fused_teacher_learns_and_exports(pipeline, tmp_path):
    fused = pipeline["repository"] / f"{NAME}-fused"
    out = tmp_path / "runs"
    result = _distill(["--teacher", str(fused), "--data-dir", str(pipeline["data_dir"]), "--output-dir", str(out),
                       "--epochs", "4", "--temperature", "3", "--alpha", "0.8", *STUDENT])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "teacher on the training split: 240 images" in result.output  # 320 minus the 25% validation split
    run_dir = out / "mnist-lenet-distilled-s0"  # the dataset came from the teacher's metadata
    config = json.loads((run_dir / "config.json").read_text())
    assert config["status"] == "complete" and config["dataset"] == "mnist" and config["architecture"] == "lenet"
    kd = config["distillation"]
    model_file = fused / "1" / "model.onnx"
    assert kd["teacher"]["path"] == str(fused) and kd["teacher"]["kind"] == "onnx"
    assert kd["teacher"]["sha256"] == hashlib.sha256(model_file.read_bytes()).hexdigest()
    assert kd["temperature"] == 3.0 and kd["alpha"] == 0.8
    assert kd["teacher_probabilities"] == str(out / "mnist-lenet-distilled-teacher.npz")
    assert 0 <= kd["teacher_train_accuracy"] <= 1 and 0 <= kd["teacher_val_accuracy"] <= 1
    assert config["val_samples"] == 80 and config["metrics"]["val_accuracy"] is not None
    assert 0 <= config["metrics"]["test_accuracy"] <= 1

    rows = _metrics(run_dir)
    assert [row["epoch"] for row in rows] == ["1", "2", "3", "4"]
    assert {"train_loss", "train_kd_loss", "train_ce_loss"} <= set(rows[0])
    kd_losses = [float(row["train_kd_loss"]) for row in rows]
    totals = [float(row["train_loss"]) for row in rows]
    assert kd_losses[-1] < kd_losses[0] and totals[-1] < totals[0], rows
    for row in rows:  # the total is the weighted sum of the parts
        expected = 0.8 * float(row["train_kd_loss"]) + 0.2 * float(row["train_ce_loss"])
        assert float(row["train_loss"]) == pytest.approx(expected, rel=1e-6)
    assert (run_dir / "curves.png").read_bytes()[:4] == b"\x89PNG"

    # The student is a run dir like any other: the exporter takes it (with its parity check).
    from exporter.export import export_repository

    exported = export_repository([run_dir], tmp_path / "student_repository", "student", data_dir=pipeline["data_dir"])
    assert exported.model_names == ["student"]


def test_ensemble_dir_teacher_equals_the_fused_graph_and_the_members_mean(pipeline):
    repository = pipeline["repository"]
    images = load_dataset("mnist", "test", pipeline["data_dir"], download=False).images[:40]
    as_ensemble = teacher.load_teacher(repository / NAME, threads=1)
    as_fused = teacher.load_teacher(repository / f"{NAME}-fused", threads=1)
    members = [teacher.load_teacher(repository / f"{NAME}-m{i}" / "1" / "model.onnx", threads=1) for i in (0, 1)]
    assert as_ensemble.kind == "ensemble" and len(as_ensemble.steps) == 3  # two members, then the average
    assert as_ensemble.dataset == "mnist" and as_ensemble.class_names == [str(i) for i in range(10)]
    assert len(as_ensemble.files) == 3 and as_ensemble.sha256 != as_fused.sha256
    mean = np.mean([member.predict(images) for member in members], axis=0)
    np.testing.assert_allclose(as_ensemble.predict(images), mean, atol=1e-6)
    np.testing.assert_allclose(as_fused.predict(images), mean, atol=1e-5)


@pytest.mark.parametrize(
    ("teacher_arg", "extra", "message"),
    [
        ("missing.onnx", [], "no such file or directory; expected an .onnx file whose input is uint8 images"),
        ("model_repository", [], "a directory without <version>/model.onnx or an ensemble config.pbtxt"),
        ("model_repository/tiny-m0/labels.txt", [], "not an .onnx file"),
        ("model_repository/tiny-average", [], "has 2 inputs"),
        ("broken.onnx", [], "onnxruntime cannot load it"),
        ("model_repository/tiny-fused", ["--dataset", "cifar10"], "was trained on mnist, not cifar10"),
        ("model_repository/tiny-fused", ["--temperature", "0"], "--temperature must be > 0"),
        ("model_repository/tiny-fused", ["--alpha", "1.5"], "--alpha must be in [0, 1]"),
    ],
)
def test_bad_teacher_is_one_clear_line(pipeline, tmp_path, teacher_arg, extra, message):
    root = pipeline["repository"].parent
    (root / "broken.onnx").write_bytes(b"not a graph")
    args = [
        "--teacher",
        str(root / teacher_arg),
        "--data-dir",
        str(pipeline["data_dir"]),
        "--output-dir",
        str(tmp_path),
    ]
    result = CliRunner().invoke(main, ["distill", *args, *STUDENT, *extra])
    assert result.exit_code == 2, result.output
    assert message in result.stderr
    assert result.stderr.startswith("trainer: error: ") and result.stderr.count("\n") == 1
    assert not list(tmp_path.iterdir()), "nothing is written for a refused teacher"


def test_resume_reads_the_cached_teacher_probabilities(pipeline, tmp_path, monkeypatch):
    args = ["--teacher", str(pipeline["repository"] / NAME), "--data-dir", str(pipeline["data_dir"]),
            "--output-dir", str(tmp_path), "--name", "student", "--epochs", "3", *STUDENT]  # fmt: skip
    run_dir, cache = tmp_path / "student-s0", tmp_path / "student-teacher.npz"

    def interrupt_after_the_first_epoch(self, row):  # Ctrl-C as the first epoch ends
        if row["epoch"] == 1:
            raise KeyboardInterrupt

    with monkeypatch.context() as patched:
        patched.setattr("trainer.report.EpochProgress.epoch_done", interrupt_after_the_first_epoch)
        interrupted = _distill(args)
    assert interrupted.exit_code == 130 and "--resume" in interrupted.stderr
    assert (run_dir / "checkpoint.pt").is_file() and cache.is_file()
    cached = np.load(cache)["train"]
    train = load_dataset("mnist", "train", pipeline["data_dir"], download=False)
    train_idx, _ = split_train_validation(train.labels, VAL_FRACTION, 0)
    expected = teacher.load_teacher(pipeline["repository"] / NAME, threads=1).predict(train.images[train_idx])
    np.testing.assert_allclose(cached, expected, atol=1e-6)

    def no_teacher_runs(*_args, **_kwargs):
        raise AssertionError("the teacher ran again although its probabilities were cached")

    monkeypatch.setattr(teacher.Teacher, "predict", no_teacher_runs)
    resumed = _distill([*args, "--resume"])
    assert resumed.exit_code == 0, resumed.output
    assert "read from" in resumed.output and "resuming" in resumed.output
    assert [row["epoch"] for row in _metrics(run_dir)] == ["1", "2", "3"]
    assert json.loads((run_dir / "config.json").read_text())["status"] == "complete"


def test_resuming_with_another_objective_is_refused(pipeline, tmp_path, monkeypatch):
    args = ["--teacher", str(pipeline["repository"] / f"{NAME}-fused"), "--data-dir", str(pipeline["data_dir"]),
            "--output-dir", str(tmp_path), "--name", "student", "--epochs", "2", *STUDENT]  # fmt: skip

    def interrupt(self, row):
        raise KeyboardInterrupt

    with monkeypatch.context() as patched:
        patched.setattr("trainer.report.EpochProgress.epoch_done", interrupt)
        assert _distill(args).exit_code == 130
    # Another T (or --alpha, or --teacher) cannot continue this checkpoint, nor can plain `train --resume`.
    refused = _distill([*args, "--resume", "--temperature", "2"])
    assert refused.exit_code == 2 and "resume it with the same command" in refused.stderr
    as_plain = CliRunner().invoke(main, ["train", "--dataset", "mnist", "--data-dir", str(pipeline["data_dir"]),
                                         "--output-dir", str(tmp_path), "--name", "student", "--epochs", "2",
                                         "--resume", *STUDENT])  # fmt: skip
    assert as_plain.exit_code == 2 and "not the hard labels" in as_plain.stderr


# --------------------------------------------------------------------------- pieces


def test_softening_probabilities_equals_softening_logits():
    logits = torch.randn(5, 10, dtype=torch.float64) * 4
    probs = torch.softmax(logits, dim=1).float().numpy()
    for temperature in (1.0, 2.0, 4.0):
        expected = torch.log_softmax(logits / temperature, dim=1).float()
        torch.testing.assert_close(distill.soften(probs, temperature), expected, atol=1e-5, rtol=1e-5)
    # A probability that underflowed to 0 stays tiny instead of becoming -inf (or NaN in the loss).
    softened = distill.soften(np.array([[1.0, 0.0]], np.float32), 4.0)
    assert torch.isfinite(softened).all() and softened[0, 1] < -20


def test_kd_loss_is_zero_on_the_teacher_and_positive_elsewhere():
    logits = torch.randn(8, 10)
    teacher_log_probs = distill.soften(torch.softmax(logits, dim=1).numpy(), 4.0)
    assert distill.kd_loss(logits, teacher_log_probs, 4.0).item() == pytest.approx(0, abs=1e-5)
    assert distill.kd_loss(torch.randn(8, 10), teacher_log_probs, 4.0).item() > 0.01
