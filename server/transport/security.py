"""Who may talk to the server: TLS / mutual TLS on the gRPC port and bearer-token auth.

Two independent layers, both off by default (the server then listens in plaintext
and answers everyone, as Triton does):

- TLS: `server_credentials(cert, key)` encrypts the gRPC port; adding a client CA
  (`client_ca=`) turns on mutual TLS, and the handshake then refuses any client
  whose certificate that CA did not sign.
- Tokens: `BearerTokenInterceptor` answers UNAUTHENTICATED to any call that lacks
  the metadata `authorization: Bearer <token>` with a known token. The standard
  health service (`grpc.health.v1.Health`) stays open, because load balancers and
  Kubernetes probes cannot send tokens. Tokens come from a file (one per line) or an
  environment variable (comma-separated); see `load_auth_tokens`.

Send tokens over TLS only: in plaintext anyone on the path can read and replay them.
"""

from __future__ import annotations

import hmac
import logging
import os
import stat
from collections.abc import Callable, Iterable
from pathlib import Path

import grpc

log = logging.getLogger(__name__)

# The variable holding tokens directly (comma-separated), for deployments that inject
# secrets as environment variables (Kubernetes secretKeyRef) rather than as files.
AUTH_TOKENS_ENV = "ENSEMBLE_SERVER_AUTH_TOKENS"

# Methods anyone may call without a token: liveness/readiness probes.
OPEN_METHOD_PREFIXES = ("/grpc.health.v1.Health/",)

_AUTHORIZATION_KEY = "authorization"
_BEARER_SCHEME = "bearer"


class SecurityConfigError(ValueError):
    """A TLS or token setting that cannot work; one line naming the flag and the fix."""


# --------------------------------------------------------------------------- TLS


def server_credentials(
    cert_file: str | os.PathLike,
    key_file: str | os.PathLike,
    client_ca_file: str | os.PathLike | None = None,
) -> grpc.ServerCredentials:
    """TLS credentials for `server.add_secure_port`; with a client CA, mutual TLS.

    The files are PEM. gRPC's own errors for a bad file surface only as "failed to
    bind", so the obvious mistakes (missing file, a key passed as the certificate)
    are caught here with a message that names the flag.
    """
    certificate = _read_pem(cert_file, "--tls-cert", "CERTIFICATE")
    private_key = _read_pem(key_file, "--tls-key", "PRIVATE KEY")
    client_ca = _read_pem(client_ca_file, "--tls-client-ca", "CERTIFICATE") if client_ca_file else None
    return grpc.ssl_server_credentials(
        [(private_key, certificate)],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )


def _read_pem(path: str | os.PathLike, flag: str, kind: str) -> bytes:
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as error:
        raise SecurityConfigError(f"{flag} {path}: cannot read ({error.strerror or error})") from None
    # "PRIVATE KEY" matches PKCS#8 ("BEGIN PRIVATE KEY") and the RSA/EC forms alike.
    if b"-----BEGIN " not in data or kind.encode() not in data:
        raise SecurityConfigError(f"{flag} {path}: not a PEM file holding a {kind} (expected '-----BEGIN ...{kind}-----')")
    return data


# --------------------------------------------------------------------------- tokens


def load_auth_tokens(tokens_file: str | os.PathLike | None = None, tokens_env: str | None = None) -> frozenset[str]:
    """The accepted tokens: lines of `tokens_file` plus the comma-separated `tokens_env`.

    In the file, blank lines and lines starting with '#' are ignored. An empty result
    when a source was given is an error: it would lock every client out.
    Returns an empty set when neither source is given (authentication off).
    """
    tokens: set[str] = set()
    if tokens_file:
        tokens |= _tokens_from_file(Path(tokens_file))
    if tokens_env:
        tokens |= {token.strip() for token in tokens_env.split(",") if token.strip()}
    if (tokens_file or tokens_env) and not tokens:
        raise SecurityConfigError(
            f"no tokens found in --auth-tokens-file / ${AUTH_TOKENS_ENV}: give at least one token (one per line)"
        )
    for token in tokens:
        _check_token_text(token)
    return frozenset(tokens)


def _tokens_from_file(path: Path) -> set[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise SecurityConfigError(f"--auth-tokens-file {path}: cannot read ({error})") from None
    if path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("auth tokens file %s is readable by other users; consider chmod 600", path)
    return {line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")}


def _check_token_text(token: str) -> None:
    # gRPC metadata values must be printable ASCII; a token that cannot be sent is a typo.
    if not token.isascii() or not token.isprintable() or " " in token:
        raise SecurityConfigError("an auth token contains spaces or non-printable/non-ASCII characters")
    if len(token) < 16:
        log.warning("an auth token is shorter than 16 characters; use long random tokens (e.g. `openssl rand -hex 32`)")


def bearer_token(metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
    """The token of an `authorization: Bearer <token>` metadata entry, or None."""
    for key, value in metadata or ():
        if key.lower() != _AUTHORIZATION_KEY:
            continue
        if isinstance(value, bytes):
            value = value.decode("ascii", errors="replace")
        scheme, _, token = value.strip().partition(" ")
        if scheme.lower() == _BEARER_SCHEME and token.strip():
            return token.strip()
    return None


# `--workers`: a call from a sibling worker (its statistics request) carries this key with
# the secret their supervisor gave them, in place of a client's token.
SIBLING_METADATA_KEY = "x-ensemble-sibling"


def from_sibling(metadata: Iterable[tuple[str, str | bytes]] | None, secret: str | None) -> bool:
    """Whether the call carries the sibling workers' secret."""
    if secret is None:
        return False
    for key, value in metadata or ():
        if key == SIBLING_METADATA_KEY:
            return hmac.compare_digest(value if isinstance(value, bytes) else value.encode(), secret.encode())
    return False


class TokenCheck:
    """Which bearer tokens are accepted; shared by the gRPC interceptor and the HTTP endpoint."""

    def __init__(self, tokens: Iterable[str], on_reject: Callable[[str], None] | None = None):
        """`on_reject("missing" | "invalid")` is called for each refused call (a metric)."""
        self._tokens = tuple(token.encode() for token in tokens)
        if not self._tokens:
            raise SecurityConfigError("bearer-token authentication needs at least one token")
        self._on_reject = on_reject

    def is_valid(self, token: str | None) -> bool:
        if token is None:
            return False
        candidate = token.encode("utf-8", errors="replace")
        # Compare against every token, in constant time, so timing reveals nothing.
        matches = [hmac.compare_digest(candidate, known) for known in self._tokens]
        return any(matches)

    def rejection(self, token: str | None, how_to_send: str) -> str | None:
        """None when `token` is accepted; else why not (counted), naming `how_to_send` it."""
        if self.is_valid(token):
            return None
        if self._on_reject is not None:
            self._on_reject("missing" if token is None else "invalid")
        return f"missing bearer token: send {how_to_send}" if token is None else "invalid bearer token"


class BearerTokenInterceptor(grpc.ServerInterceptor):
    """Reject calls without a valid bearer token with UNAUTHENTICATED (health stays open)."""

    def __init__(self, check: TokenCheck, sibling_secret: str | None = None,
                 open_method_prefixes: tuple[str, ...] = OPEN_METHOD_PREFIXES):  # fmt: skip
        self._check = check
        self._sibling_secret = sibling_secret
        self._open_method_prefixes = open_method_prefixes

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(self._open_method_prefixes):
            return handler
        if from_sibling(handler_call_details.invocation_metadata, self._sibling_secret):
            return handler
        reason = self._check.rejection(bearer_token(handler_call_details.invocation_metadata),
                                       "metadata 'authorization: Bearer <token>'")
        if reason is None:
            return handler
        log.debug("rejected %s: %s", method, reason)
        return _rejecting_handler(handler, reason)


def _rejecting_handler(handler: grpc.RpcMethodHandler, reason: str) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` that aborts with UNAUTHENTICATED.

    The request deserializer is dropped: an unauthenticated caller's bytes are never parsed.
    """

    def reject(request_or_iterator, context: grpc.ServicerContext):
        context.abort(grpc.StatusCode.UNAUTHENTICATED, reason)

    serialize = handler.response_serializer
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(reject, response_serializer=serialize)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(reject, response_serializer=serialize)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(reject, response_serializer=serialize)
    return grpc.unary_unary_rpc_method_handler(reject, response_serializer=serialize)
