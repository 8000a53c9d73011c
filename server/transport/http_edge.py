"""The HTTP edge's limits: what a slow, idle or too numerous client may hold.

uvicorn's httptools protocol has a keep-alive timeout but none for the request headers, and
no bound on connections (limit_concurrency answers 503 to requests, but every connection
stays open). A client that sends a request line and then trickles one header line a second
holds its connection, a file descriptor and a parser, for as long as it likes. This module
subclasses that protocol with three limits, each counted when it closes a connection
(ensemble_server_http_connections_closed_total{reason}):

  header_timeout      complete headers must arrive within --http-header-timeout of the
                      connection's start, or of the first byte of its next request on a
                      kept-alive connection; else 408, then close (after LINGER_S of reading
                      what still arrives; nginx's client_header_timeout and lingering_close)
  keep_alive_timeout  an idle kept-alive connection is closed after --http-keep-alive-timeout
                      (uvicorn's own timer, counted here)
  max_connections     beyond --http-max-connections open at once, a new connection is closed
                      as soon as it is accepted, before it costs a parser or a timer

The request body is not timed: a client that has sent its headers is in the application's
hands, which reads the body as it arrives and is bounded by --max-message-size.
"""

from __future__ import annotations

from asyncio import TimerHandle, Transport
from collections.abc import Callable
from dataclasses import dataclass

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

# After the 408, how long the connection keeps reading (and dropping) what the client still
# sends before it closes: a close with the client's bytes still arriving makes the kernel
# answer them with a reset, which discards the 408 from the client's buffer before it reads
# it (nginx's lingering_close, for the same reason).
LINGER_S = 2.0
# Sent before closing a connection whose headers did not arrive in time.
_TIMEOUT_BODY = b"request headers not received in time"
_REQUEST_TIMEOUT_RESPONSE = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\n"
                             b"content-length: %d\r\nconnection: close\r\n\r\n%s") % (len(_TIMEOUT_BODY), _TIMEOUT_BODY)


@dataclass(frozen=True)
class EdgeLimits:
    header_timeout_s: float
    keep_alive_timeout_s: float
    max_connections: int | None  # None: unbounded
    on_close: Callable[[str], None]  # called with the reason of each connection the limits close
    on_open_change: Callable[[int], None]  # called with +1 / -1 as connections open and close


def edge_protocol(limits: EdgeLimits) -> type[HttpToolsProtocol]:
    """uvicorn's httptools protocol class with `limits` (passed to uvicorn.Config(http=...))."""

    class EdgeProtocol(_EdgeProtocol):
        _limits = limits

    return EdgeProtocol


class _EdgeProtocol(HttpToolsProtocol):
    _limits: EdgeLimits

    def connection_made(self, transport: Transport) -> None:  # type: ignore[override]
        self._header_timer: TimerHandle | None = None
        self._lingering = False  # answered 408, write side shut: the client's bytes are dropped
        self._in_headers = False  # a request has begun and its headers are not complete yet
        self._counted_open = False
        limit = self._limits.max_connections
        if limit is not None and len(self.connections) >= limit:
            # Refused before uvicorn knows of it: no parser state, no timer, no entry in
            # the server's connections (connection_lost copes: it discards from a set).
            self.transport = transport
            self._limits.on_close("max_connections")
            transport.abort()
            return
        super().connection_made(transport)
        self._counted_open = True
        self._limits.on_open_change(1)
        self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        if self._counted_open:
            self._counted_open = False
            self._limits.on_open_change(-1)
        if self.flow is None:  # refused in connection_made: uvicorn never saw it
            return
        super().connection_lost(exc)

    # -- the header timeout -------------------------------------------------------------------
    # One timer per connection, armed when it opens. A later request on a kept-alive
    # connection gets a timer only if its headers did not all come in one read (the usual
    # case is that they do), so the hot path pays for no timer per request.
    def data_received(self, data: bytes) -> None:
        if self._lingering:
            return
        super().data_received(data)
        if self._in_headers and not self.transport.is_closing():
            self._arm_header_timer()  # the next request's headers are incomplete: its own deadline

    def on_message_begin(self) -> None:
        self._in_headers = True
        super().on_message_begin()

    def on_headers_complete(self) -> None:
        self._in_headers = False
        self._cancel_header_timer()
        super().on_headers_complete()

    def _arm_header_timer(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(self._limits.header_timeout_s, self._headers_too_late)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_too_late(self) -> None:
        self._header_timer = None
        if self.transport.is_closing():
            return
        self._limits.on_close("header_timeout")
        self.transport.write(_REQUEST_TIMEOUT_RESPONSE)
        if not self.transport.can_write_eof():  # TLS: no half-close, so close at once
            self.transport.close()
            return
        self._lingering = True
        self.transport.write_eof()  # the 408 and a FIN; reading goes on for LINGER_S
        self.loop.call_later(LINGER_S, self.transport.close)

    # -- the keep-alive timeout (uvicorn's timer; counted) ------------------------------------
    def timeout_keep_alive_handler(self) -> None:
        if not self.transport.is_closing():
            self._limits.on_close("keep_alive_timeout")
        super().timeout_keep_alive_handler()
