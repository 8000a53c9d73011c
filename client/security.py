"""The client's side of server/transport/security.py: TLS, mutual TLS and a bearer token.

`ClientSecurity` holds what the user asked for; `open_channel(target, security)`
turns it into a gRPC channel (secure or not) that sends the token on every call;
`ssl_context()` and `http_headers()` are the same settings for the HTTP transport
(client/http_connection.py, where an https:// URL turns TLS on).
`security_options` adds the matching command-line flags to a click command and
hands the command one `security` argument:

    @click.command()
    @security_options
    def status(url, security): ...
        channel = open_channel(url, security)

Flags (each with an environment variable; over HTTP, an https:// URL is what turns TLS on):
  --tls                  use TLS, trusting the system's CA certificates
  --tls-ca PEM           use TLS, trusting this CA (a private PKI)           ENSEMBLE_SERVING_TLS_CA
  --tls-cert / --tls-key this client's certificate and key (mutual TLS)      ENSEMBLE_SERVING_TLS_CERT / _KEY
  --tls-server-name      the name to expect in the server's certificate, when
                         it differs from the host in --url
  --token                bearer token ($ENSEMBLE_SERVING_TOKEN is better:
                         command lines are visible to other users in `ps`)
"""

from __future__ import annotations

import collections
import functools
import logging
import ssl
from dataclasses import dataclass
from pathlib import Path

import click
import grpc

log = logging.getLogger(__name__)

TOKEN_ENV = "ENSEMBLE_SERVING_TOKEN"
TLS_CA_ENV = "ENSEMBLE_SERVING_TLS_CA"
TLS_CERT_ENV = "ENSEMBLE_SERVING_TLS_CERT"
TLS_KEY_ENV = "ENSEMBLE_SERVING_TLS_KEY"


class SecurityError(ValueError):
    """A TLS or token setting that cannot work; one line naming the flag."""


@dataclass(frozen=True)
class ClientSecurity:
    """How to reach the server: plaintext (the default), TLS, mutual TLS; with or without a token."""

    tls: bool = False
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    server_name: str | None = None
    token: str | None = None

    def __post_init__(self) -> None:
        if (self.cert_file is None) != (self.key_file is None):
            raise SecurityError("--tls-cert and --tls-key go together (mutual TLS needs both)")

    @property
    def uses_tls(self) -> bool:
        return self.tls or self.ca_file is not None or self.cert_file is not None

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """SSL credentials; without a CA file gRPC trusts the system's roots."""
        return grpc.ssl_channel_credentials(
            root_certificates=_read(self.ca_file, "--tls-ca"),
            private_key=_read(self.key_file, "--tls-key"),
            certificate_chain=_read(self.cert_file, "--tls-cert"),
        )

    def metadata(self) -> tuple[tuple[str, str], ...]:
        """The metadata to send on every call (empty without a token)."""
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()

    def http_headers(self) -> dict[str, str]:
        """The headers to send on every HTTP request (empty without a token)."""
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def ssl_context(self) -> ssl.SSLContext:
        """For HTTPS: verify the server against --tls-ca (else the system's roots), present --tls-cert."""
        try:
            context = ssl.create_default_context(cafile=str(self.ca_file) if self.ca_file else None)
        except (ssl.SSLError, OSError) as error:
            raise SecurityError(f"--tls-ca {self.ca_file}: not a PEM CA certificate ({error})") from None
        if self.cert_file is not None:
            try:
                context.load_cert_chain(str(self.cert_file), str(self.key_file))
            except (ssl.SSLError, OSError) as error:
                raise SecurityError(f"--tls-cert {self.cert_file} / --tls-key {self.key_file}: "
                                    f"not a PEM certificate and its key ({error})") from None  # fmt: skip
        return context

    def channel_options(self) -> list[tuple[str, str]]:
        if self.uses_tls and self.server_name:
            return [("grpc.ssl_target_name_override", self.server_name)]
        return []


PLAINTEXT = ClientSecurity()


def _read(path: Path | None, flag: str) -> bytes | None:
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as error:
        raise SecurityError(f"{flag} {path}: cannot read ({error.strerror or error})") from None


def open_channel(target: str, security: ClientSecurity = PLAINTEXT, options=()) -> grpc.Channel:
    """A blocking-API channel to `target` (HOST:PORT) honouring `security`."""
    options = list(options) + security.channel_options()
    if security.uses_tls:
        channel = grpc.secure_channel(target, security.channel_credentials(), options=options)
    else:
        warn_token_in_plaintext(security)
        channel = grpc.insecure_channel(target, options=options)
    if security.token:
        channel = grpc.intercept_channel(channel, _TokenInterceptor(security.metadata()))
    return channel


def warn_token_in_plaintext(security: ClientSecurity) -> None:
    if security.token:
        log.warning("sending a bearer token without TLS: anyone on the network path can read it")


# --------------------------------------------------------------------------- token interceptors


class _CallDetails(
    collections.namedtuple(
        "_CallDetails", ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression")
    ),
    grpc.ClientCallDetails,
):
    pass


class _TokenInterceptor(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    """Adds the authorization metadata to every call of a blocking channel."""

    def __init__(self, metadata: tuple[tuple[str, str], ...]):
        self._metadata = metadata

    def _with_token(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        return _CallDetails(
            details.method,
            details.timeout,
            tuple(details.metadata or ()) + self._metadata,
            details.credentials,
            getattr(details, "wait_for_ready", None),
            getattr(details, "compression", None),
        )

    def intercept_unary_unary(self, continuation, client_call_details, request):
        return continuation(self._with_token(client_call_details), request)

    def intercept_unary_stream(self, continuation, client_call_details, request):
        return continuation(self._with_token(client_call_details), request)


# --------------------------------------------------------------------------- click flags

_EXISTING_FILE = click.Path(exists=True, dir_okay=False, path_type=Path)

_OPTIONS = (
    click.option("--tls", is_flag=True, default=False,
                 help="Connect with TLS, trusting the system's CA certificates."),
    click.option("--tls-ca", type=_EXISTING_FILE, envvar=TLS_CA_ENV, show_envvar=True,
                 help="Connect with TLS, trusting this CA certificate (PEM) instead of the system's."),
    click.option("--tls-cert", type=_EXISTING_FILE, envvar=TLS_CERT_ENV, show_envvar=True,
                 help="This client's certificate (PEM), for servers that require mutual TLS."),
    click.option("--tls-key", type=_EXISTING_FILE, envvar=TLS_KEY_ENV, show_envvar=True,
                 help="The private key (PEM) of --tls-cert."),
    click.option("--tls-server-name", metavar="NAME",
                 help="Host name to expect in the server's certificate, if not the host in --url."),
    click.option("--token", envvar=TOKEN_ENV, show_envvar=True, metavar="TOKEN",
                 help=f"Bearer token for servers started with --auth-tokens-file. Prefer ${TOKEN_ENV}: "
                      "command lines are visible to other users."),
)  # fmt: skip


def security_options(command):
    """Add the TLS and token flags to a click command; it receives them as `security`."""

    @functools.wraps(command)
    def with_security(*args, tls, tls_ca, tls_cert, tls_key, tls_server_name, token, **kwargs):
        try:
            kwargs["security"] = ClientSecurity(
                tls=tls, ca_file=tls_ca, cert_file=tls_cert, key_file=tls_key,
                server_name=tls_server_name, token=token or None,
            )  # fmt: skip
        except SecurityError as error:
            raise click.UsageError(str(error)) from None
        return command(*args, **kwargs)

    for option in reversed(_OPTIONS):
        with_security = option(with_security)
    return with_security
