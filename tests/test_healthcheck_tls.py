"""deploy/healthcheck.py against a real server with TLS on (and with mutual TLS): HTTPS or
gRPC health over TLS, chosen from the same ENSEMBLE_SERVER_TLS_* variables the server reads."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from tests.support.security import pki  # noqa: F401 (a fixture)
from tests.support.servers import ROOT

HEALTHCHECK = ROOT / "deploy" / "healthcheck.py"


def healthcheck(server, *args: str, **env: str) -> subprocess.CompletedProcess:
    variables = {"ENSEMBLE_SERVER_GRPC_PORT": str(server.grpc_port), "ENSEMBLE_SERVER_HTTP_PORT": str(server.http_port),
                 "PATH": "/usr/bin:/bin", **env}  # fmt: skip
    return subprocess.run([sys.executable, str(HEALTHCHECK), *args], capture_output=True, text=True,
                          env=variables, timeout=30)  # fmt: skip


def _wait_healthy(server, env: dict) -> None:
    deadline = time.monotonic() + 90
    while (result := healthcheck(server, **env)).returncode != 0:
        assert server.process.poll() is None, server.log()[-3000:]
        assert time.monotonic() < deadline, result.stdout + result.stderr
        time.sleep(0.3)


@pytest.fixture(scope="module")
def tls_server(start_server, tiny_repository, pki):  # noqa: F811
    server = start_server(tiny_repository, "--tls-cert", str(pki.server.cert), "--tls-key", str(pki.server.key),
                          wait=False)  # fmt: skip
    _wait_healthy(server, {"ENSEMBLE_SERVER_TLS_CERT": str(pki.server.cert)})
    return server


def test_https_check_trusts_the_servers_own_certificate_or_a_ca(tls_server, pki):  # noqa: F811
    own = healthcheck(tls_server, ENSEMBLE_SERVER_TLS_CERT=str(pki.server.cert))
    url = f"https://127.0.0.1:{tls_server.http_port}/v2/health/ready"
    assert own.returncode == 0 and f"GET {url}: 200 (ready)" in own.stdout, own.stdout
    by_ca = healthcheck(tls_server, ENSEMBLE_SERVER_TLS_CERT=str(pki.server.cert), ENSEMBLE_HEALTHCHECK_CA=str(pki.ca),
                        ENSEMBLE_HEALTHCHECK_SERVER_NAME="localhost")  # fmt: skip
    assert by_ca.returncode == 0, by_ca.stdout
    by_flags = healthcheck(tls_server, "--tls-cert", str(pki.server.cert), "--ca", str(pki.ca))
    assert by_flags.returncode == 0, by_flags.stdout


def test_https_check_refuses_a_certificate_it_cannot_verify(tls_server, pki):  # noqa: F811
    wrong_ca = healthcheck(tls_server, ENSEMBLE_SERVER_TLS_CERT=str(pki.server.cert),
                           ENSEMBLE_HEALTHCHECK_CA=str(pki.other_ca))  # fmt: skip
    assert wrong_ca.returncode == 1 and "CERTIFICATE_VERIFY_FAILED" in wrong_ca.stdout, wrong_ca.stdout
    wrong_name = healthcheck(tls_server, ENSEMBLE_SERVER_TLS_CERT=str(pki.server.cert),
                             ENSEMBLE_HEALTHCHECK_SERVER_NAME="elsewhere.example")  # fmt: skip
    assert wrong_name.returncode == 1 and "unhealthy" in wrong_name.stdout
    # Plain HTTP to a TLS port (what the image's check did before issue 28): unhealthy.
    plain = healthcheck(tls_server)
    assert plain.returncode == 1 and "unhealthy" in plain.stdout


def test_grpc_health_over_tls(tls_server, pki):  # noqa: F811
    env = {"ENSEMBLE_SERVER_TLS_CERT": str(pki.server.cert)}
    result = healthcheck(tls_server, "--grpc", **env)
    assert result.returncode == 0 and f"127.0.0.1:{tls_server.grpc_port} health (TLS): SERVING" in result.stdout, \
        result.stdout + result.stderr
    http_off = healthcheck(tls_server, **env, ENSEMBLE_SERVER_HTTP_PORT="0")  # HTTP off: the gRPC check
    assert http_off.returncode == 0 and "SERVING" in http_off.stdout, http_off.stdout
    model = healthcheck(tls_server, "--grpc", "no-such-model", **env)
    assert model.returncode == 1 and "NOT_FOUND" in model.stdout
    wrong_ca = healthcheck(tls_server, "--grpc", **env, ENSEMBLE_HEALTHCHECK_CA=str(pki.other_ca))
    assert wrong_ca.returncode == 1 and "unhealthy" in wrong_ca.stdout


def test_mutual_tls_needs_a_client_certificate(start_server, tiny_repository, pki):  # noqa: F811
    server = start_server(tiny_repository, "--tls-cert", str(pki.server.cert), "--tls-key", str(pki.server.key),
                          "--tls-client-ca", str(pki.ca), wait=False)  # fmt: skip
    env = {"ENSEMBLE_SERVER_TLS_CERT": str(pki.server.cert), "ENSEMBLE_SERVER_TLS_CLIENT_CA": str(pki.ca)}
    missing = healthcheck(server, **env)
    assert missing.returncode == 1 and "requires client certificates (mutual TLS)" in missing.stdout
    client = {"ENSEMBLE_HEALTHCHECK_CLIENT_CERT": str(pki.client.cert),
              "ENSEMBLE_HEALTHCHECK_CLIENT_KEY": str(pki.client.key)}  # fmt: skip
    _wait_healthy(server, {**env, **client})
    for args in ((), ("--grpc",)):
        result = healthcheck(server, *args, **env, **client)
        assert result.returncode == 0, result.stdout + result.stderr
    stranger = healthcheck(server, **env, ENSEMBLE_HEALTHCHECK_CLIENT_CERT=str(pki.stranger.cert),
                           ENSEMBLE_HEALTHCHECK_CLIENT_KEY=str(pki.stranger.key))  # fmt: skip
    assert stranger.returncode == 1 and "unhealthy" in stranger.stdout
