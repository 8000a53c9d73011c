"""The client against NVIDIA's real Triton (../shared/tools/triton/serve), over HTTP and gRPC.

Triton defines the HTTP/REST protocol our server speaks (KServe v2 + its binary tensor and
classification extensions), so this is the reference check of client/http_connection.py:
the same tiny repository, the same answers over both protocols, equal to onnxruntime's.

Slow (Triton takes a while to start on a shared machine) and needs the tool beside the
repository:  pytest -m slow tests/test_client_triton.py
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import numpy as np
import pytest
from click.testing import CliRunner

from client.cli import main
from client.connect import connect
from client.evaluate import stream_probabilities
from client.transport import ClientError
from tests.support import known_answer as known
from tests.support.servers import ROOT, free_port

TRITON = ROOT.parent / "shared" / "tools" / "triton" / "serve"
START_TIMEOUT_S = 300  # the first run installs Triton into /tmp (minutes)

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not TRITON.exists(), reason=f"no Triton at {TRITON}")]


@pytest.fixture(scope="module")
def triton(tiny_repository, tmp_path_factory):
    """Triton serving the tiny repository: {"grpc": HOST:PORT, "http": URL}."""
    grpc_port, http_port, metrics_port = free_port(), free_port(), free_port()
    log_path = tmp_path_factory.mktemp("triton") / "triton.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen([str(TRITON), str(tiny_repository.path), str(grpc_port), str(http_port),
                                    str(metrics_port)], stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)  # fmt: skip
    urls = {"grpc": f"127.0.0.1:{grpc_port}", "http": f"http://127.0.0.1:{http_port}"}
    try:
        _wait_ready(process, urls["http"], log_path)
        yield urls
    finally:
        os.killpg(process.pid, signal.SIGTERM)  # the script and the tritonserver it exec'd
        process.wait(60)


def _wait_ready(process: subprocess.Popen, url: str, log_path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"Triton exited with status {process.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            with connect(url, timeout_s=1.0) as connection:
                if connection.server_ready():
                    return
        except ClientError:
            pass
        time.sleep(0.5)
    pytest.fail(f"Triton not ready after {START_TIMEOUT_S} s:\n{log_path.read_text()[-3000:]}")


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_streamed_probabilities_match_onnxruntime(triton, tiny_repository, protocol):
    images = tiny_repository.images(45, seed=3)
    with connect(triton[protocol]) as connection:
        model = connection.image_model(tiny_repository.ensemble)
        result = stream_probabilities(connection, model, images, batch_size=7, concurrency=4)
    np.testing.assert_allclose(result.probabilities,
                               tiny_repository.expected_probabilities(tiny_repository.ensemble, images), atol=1e-5)
    assert model.max_batch_size == tiny_repository.max_batch_size


def test_status_over_http_says_what_grpc_says(triton):
    over = {}
    for protocol, url in triton.items():
        result = CliRunner().invoke(main, ["status", "--url", url, "--json"])
        assert result.exit_code == 0, result.output
        over[protocol] = json.loads(result.stdout)
        assert over[protocol].pop("protocol") == protocol and over[protocol].pop("url") == url
    assert over["http"] == over["grpc"]
    assert over["http"]["server"]["name"] == "triton" and "binary_tensor_data" in over["http"]["server"]["extensions"]


def test_evaluate_reports_agree_over_both_protocols(triton, tiny_repository, tmp_path):
    images = tiny_repository.images(40, seed=5)
    labels = tiny_repository.expected_probabilities(tiny_repository.ensemble, images).argmax(axis=1)
    known.write_mnist_test_split(tmp_path / "data", images, labels)  # the tiny models take MNIST's shape
    reports = {}
    for protocol, url in triton.items():
        result = CliRunner().invoke(main, ["evaluate", "--dataset", "mnist", "--data-dir", str(tmp_path / "data"),
                                           "--no-download", "--url", url, "--model", tiny_repository.ensemble,
                                           "--batch-size", "16", "--out", str(tmp_path / protocol)])  # fmt: skip
        assert result.exit_code == 0, result.output
        reports[protocol] = json.loads((tmp_path / protocol / "report.json").read_text())
    assert reports["http"]["accuracy"] == reports["grpc"]["accuracy"] == 1.0
    for key in ("confusion_matrix", "per_class", "ece", "mean_confidence", "num_images"):
        assert reports["http"][key] == reports["grpc"][key], key


def test_predict_over_http_gets_class_names_from_the_classification_extension(triton, tiny_repository, tmp_path):
    from PIL import Image

    image = tiny_repository.images(1, seed=9)[0]
    Image.fromarray(image[:, :, 0], mode="L").save(tmp_path / "digit.png")
    predictions = {}
    for protocol, url in triton.items():
        result = CliRunner().invoke(main, ["predict", str(tmp_path / "digit.png"), "--url", url,
                                           "--model", tiny_repository.ensemble, "--top-k", "3", "--json"])  # fmt: skip
        assert result.exit_code == 0, result.output
        [predictions[protocol]] = json.loads(result.stdout)
    assert predictions["http"] == predictions["grpc"]
    expected = tiny_repository.expected_probabilities(tiny_repository.ensemble, image[np.newaxis])[0]
    top = predictions["http"]["top"]
    assert [p["index"] for p in top] == list(np.argsort(-expected)[:3])
    assert [p["label"] for p in top] == [tiny_repository.class_names[p["index"]] for p in top]


def test_errors_over_http_read_as_over_grpc(triton, tiny_repository):
    for url in triton.values():
        with connect(url) as connection:
            with pytest.raises(ClientError, match=rf"model 'resnet' not found on server {url} \(available: "):
                connection.image_model("resnet")
            model = connection.image_model(tiny_repository.ensemble)
            with pytest.raises(ClientError, match=rf"inference on model '\S+' failed on {url}: "):
                connection.infer(model, tiny_repository.images(1)[:, :-1])  # one row short
