"""The client end to end against real server subprocesses (tests/conftest.py).

- the known-answer model (tests/support/known_answer.py) served for real: `client evaluate`
  must report exactly the hand-computed accuracy, confusion matrix and ECE;
- the shared tiny ensemble: streamed probabilities equal onnxruntime's own answer, in
  dataset order, whatever the batch size and concurrency;
- every error path: one line on stderr, no traceback, non-zero exit.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from client.cli import main
from client.connect import connect
from client.evaluate import stream_probabilities
from tests.support import known_answer as known
from tests.support.servers import ROOT, free_port


@pytest.fixture(scope="module")
def cifar_shaped_data_dir(tmp_path_factory):
    """A CIFAR-10 layout test_batch of 4 images (32x32x3), for the shape-mismatch path."""
    import pickle

    root = tmp_path_factory.mktemp("cifar_data")
    folder = root / "cifar-10-batches-py"
    folder.mkdir()
    batch = {"data": np.zeros((4, 3072), dtype=np.uint8), "labels": [0, 1, 2, 3]}
    (folder / "test_batch").write_bytes(pickle.dumps(batch, protocol=4))  # 4: arrays as _reconstruct + raw bytes
    return root


def run_client(*args: str) -> subprocess.CompletedProcess:
    """`python -m client ARGS` as a user would run it (a wide terminal so tables do not wrap)."""
    env = {**os.environ, "COLUMNS": "160", "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "client", *args], capture_output=True, text=True, cwd=ROOT,
                          env=env, timeout=120)  # fmt: skip


def assert_one_line_error(result, exit_code: int, *fragments: str) -> None:
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    code = result.exit_code if hasattr(result, "exit_code") else result.returncode
    assert code == exit_code, result.stderr
    assert len(errors) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


# --------------------------------------------------------------------------- known answer


def test_evaluate_reports_the_known_answer_exactly(known_server, known_data_dir, tmp_path):
    out = tmp_path / "report"
    result = run_client("evaluate", "--dataset", "mnist", "--data-dir", str(known_data_dir), "--no-download",
                        "--url", known_server.grpc_address, "--model", "known",
                        "--batch-size", "3", "--concurrency", "2", "--top-k", "2", "--out", str(out))  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["num_images"] == 20
    assert report["accuracy"] == pytest.approx(known.EXPECTED_ACCURACY, abs=1e-12)
    assert report["top_k"]["accuracy"] == pytest.approx(known.EXPECTED_TOP2, abs=1e-12)
    assert report["mean_confidence"] == pytest.approx(known.EXPECTED_CONFIDENCE, abs=1e-6)
    assert report["ece"] == pytest.approx(known.EXPECTED_ECE, abs=1e-6)
    assert report["confusion_matrix"] == known.EXPECTED_CONFUSION.tolist()
    precision = {int(row["class"]): row["precision"] for row in report["per_class"]}
    assert precision[9] == 0.0 and precision[8] == pytest.approx(0.5)
    # 20 images in batches of 3: 7 requests, the last one partial.
    assert report["performance"]["requests"] == 7
    assert report["batch_size"] == 3 and report["concurrency"] == 2
    assert (out / "per_class.csv").read_text().startswith("class,precision,recall,f1,support")
    assert (out / "confusion_matrix.png").read_bytes()[:4] == b"\x89PNG"
    # The terminal report: summary, per-class table and the confusion matrix with class names.
    assert "80.00 %  (16 correct)" in result.stdout and "0.0900" in result.stdout
    assert "true \\ pred" in result.stdout and "per class" in result.stdout


def test_evaluate_limit_and_normalized_matrix(known_server, known_data_dir, tmp_path):
    result = CliRunner().invoke(main, [
        "evaluate", "--dataset", "mnist", "--data-dir", str(known_data_dir), "--no-download",
        "--url", known_server.grpc_address, "--model", "known", "--limit", "8", "--normalize",
        "--out", str(tmp_path),
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "report.json").read_text())
    # The first 8 images (classes 0..3, image 7 = 3 predicted as 5) -> 7 of 8 right.
    assert report["num_images"] == 8 and report["accuracy"] == pytest.approx(7 / 8)
    assert "row-normalized" in result.output and "0.500" in result.output


# --------------------------------------------------------------------------- the shared tiny ensemble


def _onnxruntime_ensemble(tiny_repository, images: np.ndarray) -> np.ndarray:
    """What the ensemble must answer: the mean of its members, computed here by onnxruntime."""
    import onnxruntime

    outputs = []
    for member in tiny_repository.members:
        session = onnxruntime.InferenceSession(str(tiny_repository.path / member / "1" / "model.onnx"),
                                               providers=["CPUExecutionProvider"])  # fmt: skip
        outputs.append(session.run(["probabilities"], {"images": images})[0])
    return np.mean(outputs, axis=0)


@pytest.mark.parametrize("batch_size, concurrency", [(1, 1), (7, 4), (64, 8)])
def test_streamed_probabilities_match_onnxruntime_in_dataset_order(server, tiny_repository, batch_size, concurrency):
    images = tiny_repository.images(45, seed=3)
    progress = []
    with connect(server.grpc_address) as connection:
        model = connection.image_model(tiny_repository.ensemble)
        result = stream_probabilities(connection, model, images, batch_size=batch_size, concurrency=concurrency,
                                      on_progress=progress.append)  # fmt: skip
    np.testing.assert_allclose(result.probabilities, _onnxruntime_ensemble(tiny_repository, images), atol=1e-5)
    assert sum(progress) == 45
    # Batches larger than the model's max_batch_size (from ModelConfig) are split to fit.
    assert model.max_batch_size == tiny_repository.max_batch_size
    sent = min(batch_size, tiny_repository.max_batch_size)
    assert result.batch_size == sent and len(result.latencies_s) == -(-45 // sent)
    assert result.wall_time_s > 0


def _write_dataset_for(tiny_repository, root, images, labels) -> str:
    """The fixture's images as an MNIST test split (both tiny repositories take MNIST's
    shape, tests/support/tiny_models.py); the data set's name."""
    assert tiny_repository.image_shape == (28, 28, 1), tiny_repository.image_shape
    known.write_mnist_test_split(root, images, labels)
    return "mnist"


def test_evaluate_the_fixture_ensemble_reports_what_onnxruntime_predicts(server, tiny_repository, tmp_path):
    images = tiny_repository.images(40, seed=5)
    expected = _onnxruntime_ensemble(tiny_repository, images)
    # Labels: the ensemble's own prediction for the first 30 images, a wrong class for the last 10.
    labels = expected.argmax(axis=1)
    labels[30:] = (labels[30:] + 1) % len(tiny_repository.class_names)
    dataset = _write_dataset_for(tiny_repository, tmp_path / "data", images, labels)
    result = CliRunner().invoke(main, [
        "evaluate", "--dataset", dataset, "--data-dir", str(tmp_path / "data"), "--no-download",
        "--url", server.grpc_address, "--model", tiny_repository.ensemble, "--out", str(tmp_path / "out"),
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["accuracy"] == pytest.approx(30 / 40)
    assert report["mean_confidence"] == pytest.approx(float(expected.max(axis=1).mean()), abs=1e-5)
    assert np.trace(np.array(report["confusion_matrix"])) == 30
    assert report["batch_size"] == tiny_repository.max_batch_size  # 64 asked, capped to fit
    assert "takes at most" in result.stderr


def test_status_lists_the_fixture_models_with_their_signatures(server, tiny_repository):
    result = CliRunner().invoke(main, ["status", "--url", server.grpc_address, "--json"])
    assert result.exit_code == 0, result.output
    status = json.loads(result.stdout)
    assert status["live"] and status["ready"] and "classification" in status["server"]["extensions"]
    models = {model["name"]: model for model in status["models"]}
    assert set(models) == {tiny_repository.ensemble, tiny_repository.average, *tiny_repository.members}
    ensemble = models[tiny_repository.ensemble]
    assert ensemble["ready"] and ensemble["platform"] == "ensemble" and ensemble["classifier"]
    height, width, channels = tiny_repository.image_shape
    assert ensemble["inputs"] == [f"images UINT8 [-1, {height}, {width}, {channels}]"]
    assert not models[tiny_repository.average]["classifier"]  # takes probabilities, not images


def test_status_table(known_server):
    result = run_client("status", "--url", known_server.grpc_address)
    assert result.returncode == 0, result.stderr
    assert "live yes" in result.stdout and "ready yes" in result.stdout
    assert "known" in result.stdout and "images UINT8 [-1, 28, 28, 1]" in result.stdout
    assert "other: not loaded" in result.stdout


# --------------------------------------------------------------------------- predict


def test_predict_shows_top_k_with_the_server_s_class_names(known_server, tmp_path):
    from PIL import Image

    images = known.images()
    Image.fromarray(images[7, :, :, 0], mode="L").save(tmp_path / "seven.png")  # true 3, predicted 5, runner-up 2
    result = run_client("predict", str(tmp_path / "seven.png"), "--url", known_server.grpc_address,
                        "--model", "known", "--top-k", "2", "--json")  # fmt: skip
    assert result.returncode == 0, result.stderr
    [prediction] = json.loads(result.stdout)
    assert [(p["index"], p["label"]) for p in prediction["top"]] == [(5, "digit-5"), (2, "digit-2")]
    assert [p["score"] for p in prediction["top"]] == pytest.approx([0.71, 0.21], abs=1e-5)


def test_predict_resizes_and_converts_and_accepts_local_labels(known_server, tmp_path):
    from PIL import Image

    # An RGB JPEG twice the model's size; nearest-neighbour upscaling keeps the weights in
    # 2x2 blocks, and the server sees a resized grayscale image.
    big = Image.fromarray(known.images()[0, :, :, 0], mode="L").resize((56, 56), Image.Resampling.NEAREST)
    big.convert("RGB").save(tmp_path / "zero.jpg", quality=95)
    (tmp_path / "labels.txt").write_text("".join(f"class {i}\n" for i in range(10)))
    result = CliRunner().invoke(main, ["predict", str(tmp_path / "zero.jpg"), "--url", known_server.grpc_address,
                                       "--model", "known", "--labels", str(tmp_path / "labels.txt"), "--json"])  # fmt: skip
    assert result.exit_code == 0, result.output
    [prediction] = json.loads(result.stdout)
    assert prediction["notes"] == ["converted RGB -> L", "resized 56x56 -> 28x28"]
    assert prediction["top"][0]["label"] == "class 0" and len(prediction["top"]) == 5


# --------------------------------------------------------------------------- error paths


def test_unreachable_server(known_data_dir):
    url = f"127.0.0.1:{free_port()}"  # nothing listens there
    for args in (["status"], ["evaluate", "--dataset", "mnist", "--data-dir", str(known_data_dir), "--model", "x"]):
        result = run_client(*args, "--url", url)
        assert_one_line_error(result, 1, f"server unreachable at {url}")


def test_unknown_model(known_server, known_data_dir):
    result = run_client("evaluate", "--dataset", "mnist", "--data-dir", str(known_data_dir),
                        "--url", known_server.grpc_address, "--model", "resnet")  # fmt: skip
    assert_one_line_error(result, 1, "model 'resnet' not found", "available: known, other")


def test_model_not_ready(known_server, known_data_dir, tmp_path):
    result = CliRunner().invoke(main, [
        "evaluate", "--dataset", "mnist", "--data-dir", str(known_data_dir), "--url", known_server.grpc_address,
        "--model", "other"])  # fmt: skip
    assert_one_line_error(result, 1, "model 'other' is on server", "not ready", "not selected with --model")


def test_missing_dataset(known_server, tmp_path):
    result = run_client("evaluate", "--dataset", "mnist", "--data-dir", str(tmp_path / "empty"), "--no-download",
                        "--url", known_server.grpc_address, "--model", "known")  # fmt: skip
    assert_one_line_error(result, 2, "MNIST test files not found", str(tmp_path / "empty"))


def test_shape_mismatch_names_both_shapes(known_server, cifar_shaped_data_dir):
    result = run_client("evaluate", "--dataset", "cifar10", "--data-dir", str(cifar_shaped_data_dir),
                        "--url", known_server.grpc_address, "--model", "known")  # fmt: skip
    assert_one_line_error(result, 1, "shape mismatch", "[-1, 28, 28, 1]", "[4, 32, 32, 3]")


def test_shape_mismatch_against_the_fixture_ensemble(server, tiny_repository, cifar_shaped_data_dir):
    # The fixture takes MNIST's shape (28, 28, 1): CIFAR-10's images do not fit it.
    result = CliRunner().invoke(main, ["evaluate", "--dataset", "cifar10", "--data-dir", str(cifar_shaped_data_dir),
                                       "--url", server.grpc_address, "--model", tiny_repository.ensemble])  # fmt: skip
    assert_one_line_error(result, 1, "shape mismatch", "[-1, 28, 28, 1]", "[4, 32, 32, 3]")


def test_predict_errors(known_server, tmp_path):
    result = run_client("predict", str(tmp_path / "missing.png"), "--url", known_server.grpc_address, "--model", "known")
    assert_one_line_error(result, 1, "missing.png does not exist")
