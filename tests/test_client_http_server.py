"""The client over HTTP/REST against our real server: the same answers, reports and messages
as over gRPC (test_client.py), and HTTPS, mutual TLS and bearer tokens (test_security_server.py).
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
from client.security import ClientSecurity
from client.transport import ClientError
from tests.support import known_answer as known
from tests.support.security import TOKEN, pki  # noqa: F401, F811 (pki is a fixture)
from tests.support.servers import ROOT, wait_until


def run_client(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "160", "PYTHONWARNINGS": "ignore", **(env or {})}
    return subprocess.run([sys.executable, "-m", "client", *args], capture_output=True, text=True, cwd=ROOT,
                          env=env, timeout=120)  # fmt: skip


def one_error_line(result) -> str:
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 1 and len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    return errors[0]


# --------------------------------------------------------------------------- the same answers


def test_evaluate_over_http_reports_the_known_answer_exactly(known_server, known_data_dir, tmp_path):
    url = known_server.http_url
    result = run_client("evaluate", "--dataset", "mnist", "--data-dir", str(known_data_dir), "--no-download",
                        "--url", url, "--model", "known", "--batch-size", "3", "--concurrency", "2",
                        "--top-k", "2", "--out", str(tmp_path))  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["protocol"] == "http" and report["url"] == url
    assert report["accuracy"] == pytest.approx(known.EXPECTED_ACCURACY, abs=1e-12)
    assert report["top_k"]["accuracy"] == pytest.approx(known.EXPECTED_TOP2, abs=1e-12)
    assert report["ece"] == pytest.approx(known.EXPECTED_ECE, abs=1e-6)
    assert report["confusion_matrix"] == known.EXPECTED_CONFUSION.tolist()
    assert report["performance"]["requests"] == 7  # 20 images in batches of 3


@pytest.mark.parametrize("batch_size, concurrency", [(1, 1), (64, 8)])
def test_streamed_probabilities_over_http_match_onnxruntime(server, tiny_repository, batch_size, concurrency):
    url = server.http_url
    images = tiny_repository.images(45, seed=3)
    with connect(url) as connection:
        model = connection.image_model(tiny_repository.ensemble)
        result = stream_probabilities(connection, model, images, batch_size=batch_size, concurrency=concurrency)
    expected = tiny_repository.expected_probabilities(tiny_repository.ensemble, images)
    np.testing.assert_allclose(result.probabilities, expected, atol=1e-5)
    assert model.max_batch_size == tiny_repository.max_batch_size  # read from /v2/models/{m}/config
    assert len(result.latencies_s) == -(-45 // min(batch_size, tiny_repository.max_batch_size))


def test_status_over_http_says_what_grpc_says(server):
    url = server.http_url
    over = {}
    for protocol, address in (("grpc", server.grpc_address), ("http", url)):
        result = CliRunner().invoke(main, ["status", "--url", address, "--json"])
        assert result.exit_code == 0, result.output
        over[protocol] = json.loads(result.stdout)
        assert over[protocol].pop("protocol") == protocol and over[protocol].pop("url") == address
    assert over["http"] == over["grpc"]


def test_predict_over_http_names_the_classes_through_the_extension(known_server, tmp_path):
    from PIL import Image

    url = known_server.http_url
    Image.fromarray(known.images()[7, :, :, 0], mode="L").save(tmp_path / "seven.png")  # predicted 5, runner-up 2
    result = run_client("predict", str(tmp_path / "seven.png"), "--url", url, "--model", "known", "--top-k", "2",
                        "--json")  # fmt: skip
    assert result.returncode == 0, result.stderr
    [prediction] = json.loads(result.stdout)
    assert [(p["index"], p["label"]) for p in prediction["top"]] == [(5, "digit-5"), (2, "digit-2")]
    assert [p["score"] for p in prediction["top"]] == pytest.approx([0.71, 0.21], abs=1e-5)


# --------------------------------------------------------------------------- the same messages


@pytest.mark.parametrize("model, fragments", [
    ("resnet", ["model 'resnet' not found on server {url} (available: known, other)"]),
    ("other", ["model 'other' is on server {url} but not ready", "not selected with --model"]),
])  # fmt: skip
def test_model_errors_over_http_read_as_over_grpc(known_server, known_data_dir, model, fragments):
    url = known_server.http_url
    for address in (known_server.grpc_address, url):
        line = one_error_line(run_client("evaluate", "--dataset", "mnist", "--data-dir", str(known_data_dir),
                                         "--url", address, "--model", model))  # fmt: skip
        for fragment in fragments:
            assert fragment.format(url=address) in line, line


def test_an_invalid_request_over_http_is_the_server_s_400_message(server, tiny_repository):
    url = server.http_url
    with connect(url) as connection:
        model = connection.image_model(tiny_repository.ensemble)
        wrong = tiny_repository.images(1)[:, :-1]  # one row short
        with pytest.raises(ClientError, match=rf"inference on model '\S+' failed on {url}: HTTP 400: "):
            connection.infer(model, wrong)


# --------------------------------------------------------------------------- HTTPS, mutual TLS, tokens


def _https_url(server) -> str:
    return server.http_url.replace("http://", "https://")


def _wait_ready(server, url: str, security: ClientSecurity) -> None:
    """conftest waits over plaintext gRPC; a secured server is probed over HTTPS."""

    def ready() -> bool:
        try:
            with connect(url, timeout_s=1.0, security=security) as connection:
                return connection.server_ready()
        except ClientError:
            return False

    wait_until(server, ready, what="ready over HTTPS")


def test_https_with_our_ca(start_server, tiny_repository, pki):
    server = start_server(tiny_repository, "--tls-cert", str(pki.server.cert), "--tls-key", str(pki.server.key),
                          wait=False)  # fmt: skip
    url = _https_url(server)
    _wait_ready(server, url, ClientSecurity(ca_file=pki.ca))
    assert run_client("status", "--url", url, "--tls-ca", str(pki.ca)).returncode == 0
    assert "TLS with" in one_error_line(run_client("status", "--url", url, "--tls-ca", str(pki.other_ca)))
    plaintext = one_error_line(run_client("status", "--url", url.replace("https://", "http://")))
    assert "server unreachable" in plaintext, plaintext


def test_https_with_a_client_certificate(start_server, tiny_repository, pki):
    server = start_server(tiny_repository, "--tls-cert", str(pki.server.cert), "--tls-key", str(pki.server.key),
                          "--tls-client-ca", str(pki.ca), wait=False)  # fmt: skip
    url = _https_url(server)
    member = ClientSecurity(ca_file=pki.ca, cert_file=pki.client.cert, key_file=pki.client.key)
    _wait_ready(server, url, member)
    ok = run_client("status", "--url", url, env={"ENSEMBLE_SERVING_TLS_CA": str(pki.ca),
                                                 "ENSEMBLE_SERVING_TLS_CERT": str(pki.client.cert),
                                                 "ENSEMBLE_SERVING_TLS_KEY": str(pki.client.key)})  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    assert "TLS with" in one_error_line(run_client("status", "--url", url, "--tls-ca", str(pki.ca)))


def test_bearer_token_over_https(start_server, tiny_repository, pki, tmp_path):
    tokens_file = tmp_path / "tokens"
    tokens_file.write_text(f"{TOKEN}\n")
    tokens_file.chmod(0o600)
    server = start_server(tiny_repository, "--tls-cert", str(pki.server.cert), "--tls-key", str(pki.server.key),
                          "--auth-tokens-file", str(tokens_file), wait=False)  # fmt: skip
    url = _https_url(server)
    _wait_ready(server, url, ClientSecurity(ca_file=pki.ca))  # health stays open without a token
    ok = run_client("status", "--url", url, "--tls-ca", str(pki.ca), env={"ENSEMBLE_SERVING_TOKEN": TOKEN})
    assert ok.returncode == 0, ok.stderr
    refused = one_error_line(run_client("status", "--url", url, "--tls-ca", str(pki.ca)))
    assert f"failed on {url}: HTTP 401: " in refused, refused
    assert TOKEN not in server.log()
