"""Container health check: exit 0 when the server is ready to take requests.

Docker's HEALTHCHECK (and `docker compose`) runs this inside the container. It asks what
a load balancer asks, so the container is "healthy" exactly when traffic should reach it
(models loaded, not draining):

  healthcheck.py               GET /v2/health/ready on the HTTP port must answer 200, as
                               Kubernetes' `httpGet` probes ask; if HTTP is turned off
                               (ENSEMBLE_SERVER_HTTP_PORT=0), the gRPC check below instead
  healthcheck.py --grpc [SVC]  grpc.health.v1.Health/Check must say SERVING, as Kubernetes'
                               native `grpc:` probes ask (SVC: a model; "" = the server)

The ports come from the same environment variables the server reads, and so does TLS: when
ENSEMBLE_SERVER_TLS_CERT is set (the server's --tls-cert), the check speaks HTTPS (or gRPC
over TLS) and verifies the server's certificate against

  ENSEMBLE_HEALTHCHECK_CA            a CA file (PEM), when given; otherwise
  ENSEMBLE_SERVER_TLS_CERT           the server's own certificate (and chain): the check trusts
                                     exactly what the server presents

The check connects to 127.0.0.1, a name the certificate seldom carries, so the name is not
checked unless ENSEMBLE_HEALTHCHECK_SERVER_NAME says which one to expect (gRPC always checks
one: without that variable, the name the server's certificate gives itself is expected).
With mutual TLS (ENSEMBLE_SERVER_TLS_CLIENT_CA) the check presents
ENSEMBLE_HEALTHCHECK_CLIENT_CERT / _KEY (a client certificate signed by that CA); without
them it says so. Each variable can also be given as a flag (`--ca`, `--server-name`,
`--client-cert`, `--client-key`; `--tls-cert` for the server's certificate), for a server
configured with flags rather than variables.

No server code is imported (the HTTP check needs only the standard library), so it stays
fast and cannot break because of a server-side import.
"""

import argparse
import os
import socket
import ssl
import sys
import urllib.error
import urllib.request

HTTP_PORT_VARIABLE, DEFAULT_HTTP_PORT = "ENSEMBLE_SERVER_HTTP_PORT", "8000"  # server/config.py: --http-port
GRPC_PORT_VARIABLE, DEFAULT_GRPC_PORT = "ENSEMBLE_SERVER_GRPC_PORT", "8001"  # server/config.py: --grpc-port
TLS_CERT_VARIABLE = "ENSEMBLE_SERVER_TLS_CERT"  # server/config.py: --tls-cert
TLS_CLIENT_CA_VARIABLE = "ENSEMBLE_SERVER_TLS_CLIENT_CA"  # server/config.py: --tls-client-ca
HOST = "127.0.0.1"
TIMEOUT_S = 3.0


class TlsSettings:
    """What the check needs to speak TLS to the server; `None` from `from_args` when TLS is off."""

    def __init__(self, trust: str, server_name: str | None, client_cert: str | None, client_key: str | None,
                 mutual: bool):  # fmt: skip
        self.trust, self.server_name = trust, server_name
        self.client_cert, self.client_key, self.mutual = client_cert, client_key, mutual

    @staticmethod
    def from_args(args) -> "TlsSettings | None":
        server_cert = args.tls_cert or os.environ.get(TLS_CERT_VARIABLE)
        if not server_cert:
            return None
        return TlsSettings(
            trust=args.ca or os.environ.get("ENSEMBLE_HEALTHCHECK_CA") or server_cert,
            server_name=args.server_name or os.environ.get("ENSEMBLE_HEALTHCHECK_SERVER_NAME"),
            client_cert=args.client_cert or os.environ.get("ENSEMBLE_HEALTHCHECK_CLIENT_CERT"),
            client_key=args.client_key or os.environ.get("ENSEMBLE_HEALTHCHECK_CLIENT_KEY"),
            mutual=bool(args.tls_client_ca or os.environ.get(TLS_CLIENT_CA_VARIABLE)))  # fmt: skip

    def problem(self) -> str | None:
        """Why the check cannot be made, before trying."""
        if self.mutual and not (self.client_cert and self.client_key):
            return ("the server requires client certificates (mutual TLS): set ENSEMBLE_HEALTHCHECK_CLIENT_CERT "
                    "and ENSEMBLE_HEALTHCHECK_CLIENT_KEY (or --client-cert / --client-key)")
        for path in (self.trust, self.client_cert, self.client_key):
            if path and not os.path.isfile(path):
                return f"cannot read {path}"
        return None

    def context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=self.trust)
        # The server's own certificate is a trust anchor here even when a CA signed it.
        context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
        context.check_hostname = self.server_name is not None
        if self.client_cert:
            context.load_cert_chain(self.client_cert, self.client_key)
        return context


def check_http(port: str, tls: TlsSettings | None = None) -> int:
    url = f"{'https' if tls else 'http'}://{HOST}:{port}/v2/health/ready"
    try:
        if tls is None:
            response = urllib.request.urlopen(url, timeout=TIMEOUT_S)
        else:
            response = _https_get(port, "/v2/health/ready", tls)
        with response:
            status = response.status
    except urllib.error.HTTPError as error:  # 4xx / 5xx: answered, not ready
        status = error.code
    except (OSError, ssl.SSLError) as error:
        print(f"unhealthy: GET {url} failed: {error}")
        return 1
    print(f"GET {url}: {status} ({'ready' if status == 200 else 'not ready'})")
    return 0 if status == 200 else 1


def _https_get(port: str, path: str, tls: TlsSettings):
    """GET over TLS to 127.0.0.1, checking the name `tls.server_name` when given (SNI too)."""
    import http.client

    class Connection(http.client.HTTPSConnection):
        def connect(self):
            sock = socket.create_connection((HOST, int(port)), TIMEOUT_S)
            self.sock = tls.context().wrap_socket(sock, server_hostname=tls.server_name)

    connection = Connection(HOST, int(port), timeout=TIMEOUT_S)
    connection.request("GET", path)
    return connection.getresponse()


def check_grpc(port: str, service: str = "", tls: TlsSettings | None = None) -> int:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    address = f"{HOST}:{port}"
    try:
        with _grpc_channel(address, tls) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=TIMEOUT_S)
    except grpc.RpcError as error:
        print(f"unhealthy: {address} health check failed: {error.code().name}: {error.details()}")
        return 1
    except (OSError, ssl.SSLError) as error:
        print(f"unhealthy: {address} TLS failed: {error}")
        return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(f"{address} health{' (TLS)' if tls else ''}: {status}")
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


def _grpc_channel(address: str, tls: TlsSettings | None):
    import grpc

    if tls is None:
        return grpc.insecure_channel(address)
    read = lambda path: open(path, "rb").read() if path else None  # noqa: E731
    credentials = grpc.ssl_channel_credentials(read(tls.trust), read(tls.client_key), read(tls.client_cert))
    # gRPC always checks the certificate's name: the one asked for, else the one it carries.
    name = tls.server_name or _name_in_certificate(address, tls)
    return grpc.secure_channel(address, credentials, options=[("grpc.ssl_target_name_override", name)])


def _name_in_certificate(address: str, tls: TlsSettings) -> str:
    """The first DNS name (else the common name) of the certificate the server presents,
    read over a verified TLS connection."""
    host, port = address.rsplit(":", 1)
    context = tls.context()
    context.set_alpn_protocols(["h2"])
    with socket.create_connection((host, int(port)), TIMEOUT_S) as sock:
        with context.wrap_socket(sock, server_hostname=None) as wrapped:
            certificate = wrapped.getpeercert()
    names = [value for kind, value in certificate.get("subjectAltName", ()) if kind in ("DNS", "IP Address")]
    if names:
        return names[0]
    subject = dict(item for rdn in certificate.get("subject", ()) for item in rdn)
    return subject.get("commonName", HOST)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description="Exit 0 when the server is ready (see the module docstring).")
    parser.add_argument("--grpc", nargs="?", const="", default=None, metavar="SERVICE",
                        help="ask grpc.health.v1 (SERVICE: a model; empty: the server)")
    for flag, what in (("--tls-cert", f"the server's certificate (${TLS_CERT_VARIABLE})"),
                       ("--tls-client-ca", f"the server requires client certificates (${TLS_CLIENT_CA_VARIABLE})"),
                       ("--ca", "CA to verify the server with ($ENSEMBLE_HEALTHCHECK_CA)"),
                       ("--server-name", "name the certificate must carry ($ENSEMBLE_HEALTHCHECK_SERVER_NAME)"),
                       ("--client-cert", "client certificate for mutual TLS ($ENSEMBLE_HEALTHCHECK_CLIENT_CERT)"),
                       ("--client-key", "its key ($ENSEMBLE_HEALTHCHECK_CLIENT_KEY)")):  # fmt: skip
        parser.add_argument(flag, help=what)
    args = parser.parse_args(argv)
    tls = TlsSettings.from_args(args)
    if tls is not None and (problem := tls.problem()):
        print(f"unhealthy: cannot check over TLS: {problem}")
        return 1
    grpc_port = os.environ.get(GRPC_PORT_VARIABLE, DEFAULT_GRPC_PORT)
    if args.grpc is not None:
        return check_grpc(grpc_port, args.grpc, tls)
    http_port = os.environ.get(HTTP_PORT_VARIABLE, DEFAULT_HTTP_PORT)
    return check_grpc(grpc_port, "", tls) if http_port == "0" else check_http(http_port, tls)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
