"""TLS, mutual TLS and bearer tokens: server/transport/security.py and client/security.py.

The unit part runs a real gRPC thread-pool server on a free port (in this process)
with a minimal ServerLive servicer and the standard health service, so the
credentials and the interceptor are exercised over real sockets and real handshakes.
Certificates are generated per test module (tests/support/tls_certificates.py).
The real `server` with the security flags, end to end, is test_security_server.py.
"""

from __future__ import annotations

import asyncio
import threading
from concurrent import futures
from contextlib import contextmanager

import click
import grpc
import pytest
from click.testing import CliRunner
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from client.security import ClientSecurity, SecurityError, open_channel, security_options
from ensemble_serving.protocol import grpc_service_pb2 as pb
from ensemble_serving.protocol import grpc_service_pb2_grpc as pb_grpc
from server.transport.security import (
    BearerTokenInterceptor,
    SecurityConfigError,
    TokenCheck,
    bearer_token,
    load_auth_tokens,
    server_credentials,
)
from tests.support.aio_client import open_aio_channel
from tests.support.security import OTHER_TOKEN, TOKEN, pki, rpc_code  # noqa: F401 (pki is a fixture)


class _LiveOnly(pb_grpc.GRPCInferenceServiceServicer):
    def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)


class _EventLoopThread:
    """One asyncio loop in a daemon thread, for the grpc.aio client test.

    grpc.aio keeps per-process state tied to the loop it first ran on, so every aio
    client of this module runs on this one loop.
    """

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()

    def run(self, coroutine, timeout: float = 10):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)


_loop_thread: _EventLoopThread | None = None


def run_on_client_loop(coroutine):
    global _loop_thread
    if _loop_thread is None:
        _loop_thread = _EventLoopThread()
    return _loop_thread.run(coroutine)


@contextmanager
def running_server(credentials: grpc.ServerCredentials | None = None, tokens=()):
    """A gRPC thread-pool server (as the real server runs) on 127.0.0.1:<free port>; yields the port."""
    interceptors = [BearerTokenInterceptor(TokenCheck(tokens))] if tokens else []
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), interceptors=interceptors)
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(_LiveOnly(), server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    if credentials is None:
        port = server.add_insecure_port("127.0.0.1:0")
    else:
        port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    try:
        yield port
    finally:
        server.stop(None)


def server_live(port: int, security: ClientSecurity = ClientSecurity(), metadata=None) -> bool:
    with open_channel(f"localhost:{port}", security) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        return stub.ServerLive(pb.ServerLiveRequest(), timeout=5, metadata=metadata).live


# --------------------------------------------------------------------------- token loading


def test_tokens_from_file_and_env_merge(tmp_path):
    tokens_file = tmp_path / "tokens"
    tokens_file.write_text(f"# service accounts\n{TOKEN}\n\n   \n  {OTHER_TOKEN}  \n")
    tokens_file.chmod(0o600)
    assert load_auth_tokens(tokens_file) == {TOKEN, OTHER_TOKEN}
    assert load_auth_tokens(None, f" {TOKEN} ,{OTHER_TOKEN},") == {TOKEN, OTHER_TOKEN}
    assert load_auth_tokens(tokens_file, "third-token-0123456789") == {TOKEN, OTHER_TOKEN, "third-token-0123456789"}
    assert load_auth_tokens(None, None) == frozenset()


def test_tokens_file_errors_name_the_flag(tmp_path):
    with pytest.raises(SecurityConfigError, match="--auth-tokens-file .*missing.*cannot read"):
        load_auth_tokens(tmp_path / "missing")
    (tmp_path / "empty").write_text("# nothing but a comment\n\n")
    with pytest.raises(SecurityConfigError, match="no tokens found"):
        load_auth_tokens(tmp_path / "empty")
    with pytest.raises(SecurityConfigError, match="no tokens found"):
        load_auth_tokens(None, " , ")
    with pytest.raises(SecurityConfigError, match="non-printable"):
        load_auth_tokens(None, "tab\tinside-a-token-0123")


def test_world_readable_tokens_file_warns(tmp_path, caplog):
    tokens_file = tmp_path / "tokens"
    tokens_file.write_text(TOKEN)
    tokens_file.chmod(0o644)
    load_auth_tokens(tokens_file)
    assert "readable by other users" in caplog.text


@pytest.mark.parametrize(
    "metadata, expected",
    [
        ((("authorization", f"Bearer {TOKEN}"),), TOKEN),
        ((("Authorization", f"bearer   {TOKEN} "),), TOKEN),
        ((("x-other", "1"), ("authorization", f"Bearer {TOKEN}".encode())), TOKEN),
        ((("authorization", f"Basic {TOKEN}"),), None),
        ((("authorization", "Bearer "),), None),
        ((("authorization", TOKEN),), None),
        ((), None),
        (None, None),
    ],
)
def test_bearer_token_parsing(metadata, expected):
    assert bearer_token(metadata) == expected


def test_token_check_needs_a_token():
    with pytest.raises(SecurityConfigError):
        TokenCheck([])


# --------------------------------------------------------------------------- TLS file checks


def test_server_credentials_name_the_bad_flag(pki, tmp_path):
    with pytest.raises(SecurityConfigError, match="--tls-cert .*cannot read"):
        server_credentials(tmp_path / "nope.crt", pki.server.key)
    with pytest.raises(SecurityConfigError, match="--tls-cert .*not a PEM file holding a CERTIFICATE"):
        server_credentials(pki.server.key, pki.server.key)  # key given as the certificate
    with pytest.raises(SecurityConfigError, match="--tls-key .*PRIVATE KEY"):
        server_credentials(pki.server.cert, pki.server.cert)
    with pytest.raises(SecurityConfigError, match="--tls-client-ca"):
        server_credentials(pki.server.cert, pki.server.key, tmp_path / "missing-ca.crt")


def test_client_security_needs_cert_and_key_together(pki):
    with pytest.raises(SecurityError, match="--tls-cert and --tls-key go together"):
        ClientSecurity(cert_file=pki.client.cert)
    assert not ClientSecurity(token=TOKEN).uses_tls
    assert ClientSecurity(tls=True).uses_tls and ClientSecurity(ca_file=pki.ca).uses_tls


# --------------------------------------------------------------------------- tokens over the wire


def test_missing_or_wrong_token_is_unauthenticated_health_stays_open():
    with running_server(tokens=[TOKEN, OTHER_TOKEN]) as port:
        assert rpc_code(lambda: server_live(port)) == grpc.StatusCode.UNAUTHENTICATED
        assert rpc_code(lambda: server_live(port, ClientSecurity(token="wrong-token-0123456789"))) == (
            grpc.StatusCode.UNAUTHENTICATED
        )
        # The scheme matters: the token alone, without "Bearer", is not accepted.
        assert rpc_code(lambda: server_live(port, metadata=(("authorization", TOKEN),))) == (
            grpc.StatusCode.UNAUTHENTICATED
        )
        assert server_live(port, ClientSecurity(token=TOKEN))
        assert server_live(port, ClientSecurity(token=OTHER_TOKEN))
        with grpc.insecure_channel(f"localhost:{port}") as channel:
            check = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert check.status == health_pb2.HealthCheckResponse.SERVING


def test_unauthenticated_message_tells_the_fix():
    with running_server(tokens=[TOKEN]) as port:
        with pytest.raises(grpc.RpcError) as error:
            server_live(port)
    assert "authorization: Bearer <token>" in error.value.details()


def test_aio_channel_sends_the_token():
    async def live(port, security):
        async with open_aio_channel(f"localhost:{port}", security) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            return (await stub.ServerLive(pb.ServerLiveRequest(), timeout=5)).live

    with running_server(tokens=[TOKEN]) as port:
        assert run_on_client_loop(live(port, ClientSecurity(token=TOKEN)))
        with pytest.raises(grpc.aio.AioRpcError) as error:
            run_on_client_loop(live(port, ClientSecurity(token="wrong-token-0123456789")))
    assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED


# --------------------------------------------------------------------------- TLS and mutual TLS


def test_tls_server_accepts_clients_that_trust_its_ca(pki):
    with running_server(server_credentials(pki.server.cert, pki.server.key)) as port:
        assert server_live(port, ClientSecurity(ca_file=pki.ca))
        # Server name override: the certificate names localhost, the client asks for another name.
        assert server_live(port, ClientSecurity(ca_file=pki.ca, server_name="localhost"))
        # A client that trusts another CA (here the system roots or other-ca) fails the handshake.
        assert rpc_code(lambda: server_live(port, ClientSecurity(tls=True))) == grpc.StatusCode.UNAVAILABLE
        assert rpc_code(lambda: server_live(port, ClientSecurity(ca_file=pki.other_ca))) == grpc.StatusCode.UNAVAILABLE
        # A plaintext client cannot talk to a TLS port.
        assert rpc_code(lambda: server_live(port)) == grpc.StatusCode.UNAVAILABLE


def test_tls_certificate_must_match_the_host(pki):
    with running_server(server_credentials(pki.server.cert, pki.server.key)) as port:
        wrong_name = ClientSecurity(ca_file=pki.ca, server_name="not-this-server.example")
        assert rpc_code(lambda: server_live(port, wrong_name)) == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_requires_a_client_certificate_from_the_ca(pki):
    credentials = server_credentials(pki.server.cert, pki.server.key, client_ca_file=pki.ca)
    with running_server(credentials) as port:
        good = ClientSecurity(ca_file=pki.ca, cert_file=pki.client.cert, key_file=pki.client.key)
        assert server_live(port, good)
        no_certificate = ClientSecurity(ca_file=pki.ca)
        assert rpc_code(lambda: server_live(port, no_certificate)) == grpc.StatusCode.UNAVAILABLE
        stranger = ClientSecurity(ca_file=pki.ca, cert_file=pki.stranger.cert, key_file=pki.stranger.key)
        assert rpc_code(lambda: server_live(port, stranger)) == grpc.StatusCode.UNAVAILABLE


def test_tls_and_token_together(pki):
    with running_server(server_credentials(pki.server.cert, pki.server.key), tokens=[TOKEN]) as port:
        assert rpc_code(lambda: server_live(port, ClientSecurity(ca_file=pki.ca))) == grpc.StatusCode.UNAUTHENTICATED
        assert server_live(port, ClientSecurity(ca_file=pki.ca, token=TOKEN))


# --------------------------------------------------------------------------- client flags


@click.command()
@click.option("--url", default="localhost:8001")
@security_options
def _probe(url, security):
    click.echo(repr(security))
    port = int(url.rsplit(":", 1)[1])
    click.echo(f"live={server_live(port, security)}")


def test_client_flags_reach_the_server(pki):
    runner = CliRunner()
    with running_server(server_credentials(pki.server.cert, pki.server.key, pki.ca), tokens=[TOKEN]) as port:
        result = runner.invoke(
            _probe,
            ["--url", f"localhost:{port}", "--tls-ca", str(pki.ca), "--tls-cert", str(pki.client.cert),
             "--tls-key", str(pki.client.key)],
            env={"ENSEMBLE_SERVING_TOKEN": TOKEN},
        )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "live=True" in result.output


def test_client_flags_reject_a_cert_without_its_key(pki):
    result = CliRunner().invoke(_probe, ["--tls-cert", str(pki.client.cert)])
    assert result.exit_code == 2
    assert "--tls-cert and --tls-key go together" in result.output


def test_client_flags_help_names_the_env_vars():
    result = CliRunner().invoke(_probe, ["--help"])
    assert result.exit_code == 0
    for text in ("--tls-ca", "--tls-cert", "--tls-key", "--token", "ENSEMBLE_SERVING_TOKEN"):
        assert text in result.output


# --------------------------------------------------------------------------- checkpoints never execute code

SOURCE_PACKAGES = ("trainer", "exporter", "server", "client", "ensemble_serving")


def _calls(tree):
    import ast

    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and isinstance(node.func.value, ast.Name):
            yield node, f"{node.func.value.id}.{node.func.attr}"


def test_every_torch_load_is_weights_only_and_nothing_unpickles_freely():
    """Static check of the source tree: torch.load(..., weights_only=True) only; no
    pickle.load(s) / np.load(allow_pickle=True) (datasets.py's restricted Unpickler is fine)."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    offences = []
    for package in SOURCE_PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            for call, name in _calls(ast.parse(path.read_text(), str(path))):
                keywords = {k.arg: k.value for k in call.keywords}
                where = f"{path.relative_to(root)}:{call.lineno}"
                if name == "torch.load":
                    flag = keywords.get("weights_only")
                    if not (isinstance(flag, ast.Constant) and flag.value is True):
                        offences.append(f"{where}: torch.load without weights_only=True")
                elif name in ("pickle.load", "pickle.loads", "dill.load", "joblib.load"):
                    offences.append(f"{where}: {name}")
                elif name == "np.load" and "allow_pickle" in keywords:
                    offences.append(f"{where}: np.load(allow_pickle=...)")
    assert not offences, offences


class _Payload:
    """Unpickling this would create the file `marker` (a stand-in for arbitrary code)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import pathlib

        return pathlib.Path.touch, (pathlib.Path(self.marker),)


def test_a_booby_trapped_training_state_is_refused_without_running(tmp_path):
    torch = pytest.importorskip("torch")
    checkpoint = pytest.importorskip("trainer.checkpoint")
    marker = tmp_path / "code-ran"
    torch.save({"epoch": 3, "payload": _Payload(str(marker))}, tmp_path / checkpoint.TRAINING_STATE_FILE)
    with pytest.raises(checkpoint.RunDirError, match="cannot be read"):
        checkpoint.load_training_state(tmp_path)
    assert not marker.exists()


def test_a_booby_trapped_weights_file_is_refused_without_running(tmp_path):
    """model.safetensors holding a pickle instead of safetensors: an error, no code run."""
    import pickle

    safetensors_torch = pytest.importorskip("safetensors.torch")
    marker = tmp_path / "code-ran"
    path = tmp_path / "model.safetensors"
    path.write_bytes(pickle.dumps({"weight": _Payload(str(marker))}))
    with pytest.raises(Exception):
        safetensors_torch.load_file(path)
    assert not marker.exists()
