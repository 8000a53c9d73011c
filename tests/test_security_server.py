"""TLS, mutual TLS and bearer tokens on the real server, end to end.

`server` subprocesses started with the security flags, driven by our stubs, by our
client's command line and by tritonclient (in its own process; see the team brief).
The in-process unit tests of server/transport/security.py and client/security.py are test_security.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from client.security import ClientSecurity, open_channel
from ensemble_serving.protocol import grpc_service_pb2 as pb
from ensemble_serving.protocol import grpc_service_pb2_grpc as pb_grpc
from tests.support.http import call, infer, tls_context
from tests.support.security import OTHER_TOKEN, TOKEN, pki, rpc_code  # noqa: F401 (pki is a fixture)
from tests.support.servers import wait_until

ROOT = Path(__file__).resolve().parents[1]
SECURE_CLIENT = ROOT / "tests" / "tritonclient_scripts" / "secure_client.py"


def wait_serving(server, security: ClientSecurity, timeout: float = 90.0) -> None:
    """conftest waits with a plaintext, token-less ServerReady; a secured server needs its own probe."""
    serving = health_pb2.HealthCheckResponse.SERVING
    with open_channel(server.grpc_address, security) as channel:
        health_stub = health_pb2_grpc.HealthStub(channel)
        wait_until(server, lambda: health_stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == serving,
                   timeout, what="serving")  # fmt: skip


def infer_images(address: str, security: ClientSecurity, model: str, images: np.ndarray, metadata=None) -> np.ndarray:
    request = pb.ModelInferRequest(model_name=model)
    request.inputs.add(name="images", datatype="UINT8", shape=list(images.shape))
    request.raw_input_contents.append(images.tobytes())
    with open_channel(address, security) as channel:
        response = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30, metadata=metadata)
    return np.frombuffer(response.raw_output_contents[0], "<f4").reshape(list(response.outputs[0].shape))


def client_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "client", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env={**os.environ, **(env or {})})  # fmt: skip


def triton_client(server, repository, *args: str) -> dict:
    shape = ",".join(map(str, repository.image_shape))
    result = subprocess.run([sys.executable, str(SECURE_CLIENT), "--url", server.grpc_address, "--model",
                             repository.ensemble, "--shape", shape, *args],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)


def test_tls_server_end_to_end(start_server, tiny_repository, pki):
    server = start_server(tiny_repository, "--tls-cert", str(pki.server.cert), "--tls-key", str(pki.server.key),
                          wait=False)  # fmt: skip
    trusting = ClientSecurity(ca_file=pki.ca)
    wait_serving(server, trusting)
    images = tiny_repository.images(3)
    model = tiny_repository.ensemble
    np.testing.assert_allclose(infer_images(server.grpc_address, trusting, model, images),
                               tiny_repository.expected_probabilities(model, images), rtol=1e-5, atol=1e-6)
    for stranger in (ClientSecurity(), ClientSecurity(ca_file=pki.other_ca)):  # plaintext; trusts another CA
        assert rpc_code(lambda: infer_images(server.grpc_address, stranger, model, images)) == grpc.StatusCode.UNAVAILABLE
    assert "security (gRPC and HTTP): TLS; no authentication" in server.log()
    # HTTPS on the HTTP port, with the same certificate
    answer = infer(server.http_port, model, images, tls=tls_context(pki.ca))
    np.testing.assert_allclose(answer.output(), tiny_repository.expected_probabilities(model, images),
                               rtol=1e-5, atol=1e-6)
    for stranger in (None, tls_context(pki.other_ca)):  # plaintext; trusts another CA
        with pytest.raises(OSError):
            call(server.http_port, "GET", "/v2/health/ready", tls=stranger, timeout=5)

    status = client_cli("status", "--url", server.grpc_address, "--tls-ca", str(pki.ca))
    assert status.returncode == 0, status.stdout + status.stderr
    answer = triton_client(server, tiny_repository, "--ca", str(pki.ca))
    assert answer["ready"]
    np.testing.assert_allclose(answer["probabilities"], tiny_repository.expected_probabilities(
        model, np.array(answer["images"], dtype=np.uint8)), rtol=1e-5, atol=1e-6)


def test_mutual_tls_server_end_to_end(start_server, tiny_repository, pki):
    server = start_server(tiny_repository, "--tls-cert", str(pki.server.cert), "--tls-key", str(pki.server.key),
                          "--tls-client-ca", str(pki.ca), wait=False)  # fmt: skip
    member = ClientSecurity(ca_file=pki.ca, cert_file=pki.client.cert, key_file=pki.client.key)
    wait_serving(server, member)
    images = tiny_repository.images(2)
    model = tiny_repository.members[0]
    np.testing.assert_allclose(infer_images(server.grpc_address, member, model, images),
                               tiny_repository.expected_probabilities(model, images), rtol=1e-5, atol=1e-6)
    no_certificate = ClientSecurity(ca_file=pki.ca)
    stranger = ClientSecurity(ca_file=pki.ca, cert_file=pki.stranger.cert, key_file=pki.stranger.key)
    for outsider in (no_certificate, stranger):
        assert rpc_code(lambda: infer_images(server.grpc_address, outsider, model, images)) == grpc.StatusCode.UNAVAILABLE
    assert "mutual TLS" in server.log()
    with_certificate = tls_context(pki.ca, pki.client.cert, pki.client.key)
    assert call(server.http_port, "GET", "/v2/health/ready", tls=with_certificate).status == 200
    for outsider in (tls_context(pki.ca), tls_context(pki.ca, pki.stranger.cert, pki.stranger.key)):
        with pytest.raises(OSError):
            call(server.http_port, "GET", "/v2/health/ready", tls=outsider, timeout=5)

    status = client_cli("status", "--url", server.grpc_address, env={
        "ENSEMBLE_SERVING_TLS_CA": str(pki.ca), "ENSEMBLE_SERVING_TLS_CERT": str(pki.client.cert),
        "ENSEMBLE_SERVING_TLS_KEY": str(pki.client.key)})  # fmt: skip
    assert status.returncode == 0, status.stdout + status.stderr
    refused = client_cli("status", "--url", server.grpc_address, "--tls-ca", str(pki.ca))
    assert refused.returncode != 0
    assert triton_client(server, tiny_repository, "--ca", str(pki.ca), "--cert", str(pki.client.cert),
                         "--key", str(pki.client.key))["ready"]  # fmt: skip
    assert "error" in triton_client(server, tiny_repository, "--ca", str(pki.ca))


def test_token_server_end_to_end(start_server, tiny_repository, pki, tmp_path, monkeypatch):
    tokens_file = tmp_path / "tokens"
    tokens_file.write_text(f"# clients\n{TOKEN}\n")
    tokens_file.chmod(0o600)
    monkeypatch.setenv("ENSEMBLE_SERVER_AUTH_TOKENS", OTHER_TOKEN)  # a second source, merged
    server = start_server(tiny_repository, "--tls-cert", str(pki.server.cert), "--tls-key", str(pki.server.key),
                          "--auth-tokens-file", str(tokens_file), wait=False)  # fmt: skip
    anonymous = ClientSecurity(ca_file=pki.ca)
    wait_serving(server, anonymous)  # health stays open without a token
    address, model, images = server.grpc_address, tiny_repository.ensemble, tiny_repository.images(2)
    expected = tiny_repository.expected_probabilities(model, images)

    for token in (TOKEN, OTHER_TOKEN):
        np.testing.assert_allclose(infer_images(address, ClientSecurity(ca_file=pki.ca, token=token), model, images),
                                   expected, rtol=1e-5, atol=1e-6)  # fmt: skip
    wrong = ClientSecurity(ca_file=pki.ca, token="guessed-token-0123456789abcdef")
    assert rpc_code(lambda: infer_images(address, anonymous, model, images)) == grpc.StatusCode.UNAUTHENTICATED
    assert rpc_code(lambda: infer_images(address, wrong, model, images)) == grpc.StatusCode.UNAUTHENTICATED
    with open_channel(address, anonymous) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        for rpc in (lambda: stub.ServerReady(pb.ServerReadyRequest(), timeout=10),
                    lambda: stub.ModelMetadata(pb.ModelMetadataRequest(name=model), timeout=10),
                    lambda: stub.RepositoryIndex(pb.RepositoryIndexRequest(), timeout=10)):  # fmt: skip
            assert rpc_code(rpc) == grpc.StatusCode.UNAUTHENTICATED
        reflection = reflection_stub(channel)
        assert rpc_code(reflection) == grpc.StatusCode.UNAUTHENTICATED

    _check_http_tokens(server, tiny_repository, tls_context(pki.ca), expected)

    text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    assert 'ensemble_server_unauthenticated_requests_total{reason="missing"}' in text
    assert 'ensemble_server_unauthenticated_requests_total{reason="invalid"} 2.0' in text  # one gRPC, one HTTP
    assert TOKEN not in server.log() and OTHER_TOKEN not in server.log()
    assert "bearer tokens required (2 accepted; health checks open)" in server.log()

    ok = client_cli("status", "--url", address, "--tls-ca", str(pki.ca), env={"ENSEMBLE_SERVING_TOKEN": TOKEN})
    assert ok.returncode == 0, ok.stdout + ok.stderr
    refused = client_cli("status", "--url", address, "--tls-ca", str(pki.ca))
    assert refused.returncode != 0 and "UNAUTHENTICATED" in refused.stdout + refused.stderr
    assert triton_client(server, tiny_repository, "--ca", str(pki.ca), "--token", OTHER_TOKEN)["ready"]
    assert "UNAUTHENTICATED" in triton_client(server, tiny_repository, "--ca", str(pki.ca))["error"]


def _check_http_tokens(server, tiny_repository, tls, expected) -> None:
    """Over HTTP: health open, everything else 401 without a valid `Authorization: Bearer`."""
    model, images = tiny_repository.ensemble, tiny_repository.images(2)
    port = server.http_port
    assert call(port, "GET", "/v2/health/ready", tls=tls).status == 200
    for path in ("/v2", f"/v2/models/{model}"):
        refused = call(port, "GET", path, tls=tls)
        assert refused.status == 401 and "missing bearer token" in refused.error
        assert refused.headers["www-authenticate"] == "Bearer"
    wrong = infer(port, model, images, tls=tls, headers={"Authorization": "Bearer guessed-token-0123456789abcdef"})
    assert wrong.status == 401 and wrong.error == "invalid bearer token"
    answer = infer(port, model, images, tls=tls, headers={"Authorization": f"Bearer {TOKEN}"})
    np.testing.assert_allclose(answer.output(), expected, rtol=1e-5, atol=1e-6)


def reflection_stub(channel):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    def list_services():
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10)
        return list(responses)

    return list_services


@pytest.mark.parametrize(
    "flags, message",
    [
        (lambda pki, tmp: ["--tls-client-ca", str(pki.ca)], "--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key"),
        (lambda pki, tmp: ["--tls-cert", str(pki.server.cert)], "--tls-cert and --tls-key go together"),
        (lambda pki, tmp: ["--tls-cert", str(pki.server.key), "--tls-key", str(pki.server.key)],
         "not a PEM file holding a CERTIFICATE"),
        (lambda pki, tmp: ["--auth-tokens-file", str(tmp)], "no tokens found"),
    ],
    ids=["client-ca-without-cert", "cert-without-key", "key-as-cert", "empty-tokens-file"],
)
def test_bad_security_settings_are_one_line_startup_errors(tiny_repository, pki, tmp_path, flags, message):
    from tests.support.servers import free_port, server_command

    empty = tmp_path / "tokens"
    empty.write_text("# nobody yet\n")
    command = server_command(tiny_repository.path, free_port(), free_port(), *flags(pki, empty))
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("server: error:")]
    assert len(errors) == 1 and message in errors[0], result.stderr[-2000:]
