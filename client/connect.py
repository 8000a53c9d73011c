"""`connect(url)`: the transport a URL asks for (client/transport.py says what one does)."""

from __future__ import annotations

from client.connection import GrpcConnection
from client.http_connection import HttpConnection
from client.security import PLAINTEXT, ClientSecurity
from client.transport import DEFAULT_PROBE_TIMEOUT_S, HTTP_SCHEMES, Transport


def connect(url: str, timeout_s: float = DEFAULT_PROBE_TIMEOUT_S, security: ClientSecurity = PLAINTEXT) -> Transport:
    """HTTP/REST for http:// and https:// URLs, gRPC for anything else (HOST:PORT, grpc://HOST:PORT)."""
    if url.startswith(HTTP_SCHEMES):
        return HttpConnection(url, timeout_s=timeout_s, security=security)
    return GrpcConnection(url, timeout_s=timeout_s, security=security)
