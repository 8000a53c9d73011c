"""Serve the HTTP/REST endpoint (server.transport.http_app) with uvicorn, on the server's event loop.

uvicorn with httptools and uvloop was chosen by measurement (benchmarks/bare_http_server.py:
the bare libraries answering perf_analyzer on this project's 2-core machine, MNIST-size
binary requests): 8,800 req/s at concurrency 1 and 19,200 at 16, against aiohttp's 6,500
and 16,000. Only uvicorn's HTTP protocol and server loop are used: no framework, no
lifespan, no signal handling of its own (the server's lifecycle owns SIGTERM).

The socket is bound here, before any model loads, so that a port in use fails the
start-up with one line (uvicorn itself would exit the process).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl

import uvicorn

from server.config import ServerSettings
from server.observability.metrics import ServerMetrics
from server.transport.http_app import HttpApp
from server.transport.http_edge import EdgeLimits, edge_protocol

log = logging.getLogger(__name__)


class _EmbeddedServer(uvicorn.Server):
    """uvicorn's server without its signal handlers: SIGTERM is the lifecycle's to handle."""

    def capture_signals(self):
        return contextlib.nullcontext()


class HttpEndpoint:
    def __init__(self, app: HttpApp, settings: ServerSettings, metrics: ServerMetrics, shared_port: bool = False):
        """`shared_port`: one of --workers' processes, listening with SO_REUSEPORT beside its siblings."""
        self._socket = _bind(settings.host, settings.http_port, shared_port)
        # httptools, with the edge's header timeout and connection bound (server/transport/http_edge.py).
        protocol = edge_protocol(EdgeLimits(
            settings.http_header_timeout_s, settings.http_keep_alive_timeout_s, settings.http_max_connections,
            on_close=lambda reason: metrics.http_connections_closed.labels(reason=reason).inc(),
            on_open_change=metrics.http_connections_open.inc))
        # proxy_headers off: the client's address is only logged (at debug level), and the
        # middleware that would rewrite it from X-Forwarded-For is one more layer per request.
        config = uvicorn.Config(
            app, http=protocol, loop="none", lifespan="off", log_config=None, access_log=False,
            timeout_keep_alive=settings.http_keep_alive_timeout_s, limit_concurrency=settings.max_concurrent_rpcs,
            timeout_graceful_shutdown=1, server_header=False, proxy_headers=False, **_tls(settings))  # fmt: skip
        self._server = _EmbeddedServer(config)
        self._task: asyncio.Task | None = None
        # uvicorn's own INFO lines ("Uvicorn running on ...") would repeat ours.
        logging.getLogger("uvicorn.error").setLevel(logging.WARNING)

    @property
    def port(self) -> int:
        return self._socket.getsockname()[1]

    async def start(self) -> None:
        self._task = asyncio.create_task(self._server.serve(sockets=[self._socket]))
        while not self._server.started:
            if self._task.done():
                self._task.result()  # raises what stopped it
                raise RuntimeError("the HTTP server stopped while starting")
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        """Stop accepting, finish the responses under way (1 s at most), close."""
        if self._task is None:
            self._socket.close()
            return
        self._server.should_exit = True
        await self._task


def _bind(host: str, port: int, shared: bool) -> socket.socket:
    """A listening socket on host:port; OSError (port in use, bad address) for the caller."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # restart without TIME_WAIT trouble
        if shared:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        sock.listen(1024)
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


def _tls(settings: ServerSettings) -> dict:
    """uvicorn's TLS options from the same flags as gRPC's (already checked by then)."""
    if not settings.tls_cert:
        return {}
    options = {"ssl_certfile": str(settings.tls_cert), "ssl_keyfile": str(settings.tls_key)}
    if settings.tls_client_ca:
        options.update(ssl_ca_certs=str(settings.tls_client_ca), ssl_cert_reqs=ssl.CERT_REQUIRED)
    return options
