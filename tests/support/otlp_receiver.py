"""An OTLP/HTTP trace receiver for the tests: a real HTTP server on a real port that takes
what an OpenTelemetry exporter POSTs to /v1/traces, decodes each ExportTraceServiceRequest
with opentelemetry-proto (the protocol's own generated classes), and keeps the spans.

No OpenTelemetry collector installs from the registries here (PyPI has only the SDK's
packages and one third-party wheel wrapping an unverified collector binary; Debian has
the Go SDK's sources, not a collector; npm has exporters only), so this stands in for one.
"""

from __future__ import annotations

import gzip
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.trace.v1.trace_pb2 import Span as SpanProto
from opentelemetry.proto.trace.v1.trace_pb2 import Status

TRACES_PATH = "/v1/traces"


@dataclass(frozen=True)
class ReceivedSpan:
    name: str
    trace_id: str  # hex, as in a traceparent
    span_id: str
    parent_span_id: str  # "" for a root span
    kind: str  # "SERVER", "INTERNAL", ...
    attributes: dict
    links: tuple[tuple[str, str], ...]  # (trace_id, span_id) of each link
    status: str  # "UNSET", "OK", "ERROR"
    status_message: str
    start_ns: int
    end_ns: int
    service: str  # the resource's service.name

    @property
    def duration_ms(self) -> float:
        return (self.end_ns - self.start_ns) / 1e6


def _value(any_value):
    kind = any_value.WhichOneof("value")
    if kind == "array_value":
        return [_value(item) for item in any_value.array_value.values]
    return getattr(any_value, kind) if kind else None


def _attributes(key_values) -> dict:
    return {item.key: _value(item.value) for item in key_values}


def decode(body: bytes) -> list[ReceivedSpan]:
    """The spans of one ExportTraceServiceRequest."""
    request = ExportTraceServiceRequest.FromString(body)
    spans = []
    for resource_spans in request.resource_spans:
        service = _attributes(resource_spans.resource.attributes).get("service.name", "")
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                spans.append(ReceivedSpan(
                    name=span.name, trace_id=span.trace_id.hex(), span_id=span.span_id.hex(),
                    parent_span_id=span.parent_span_id.hex(),
                    kind=SpanProto.SpanKind.Name(span.kind).removeprefix("SPAN_KIND_"),
                    attributes=_attributes(span.attributes),
                    links=tuple((link.trace_id.hex(), link.span_id.hex()) for link in span.links),
                    status=Status.StatusCode.Name(span.status.code).removeprefix("STATUS_CODE_"),
                    status_message=span.status.message, start_ns=span.start_time_unix_nano,
                    end_ns=span.end_time_unix_nano, service=service))  # fmt: skip
    return spans


@dataclass
class OtlpReceiver:
    """`with OtlpReceiver() as receiver:` listens on 127.0.0.1:`receiver.port`."""

    spans: list[ReceivedSpan] = field(default_factory=list)
    posts: int = 0  # export requests received, whatever they held
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _server: ThreadingHTTPServer | None = None

    @property
    def endpoint(self) -> str:
        """For OTEL_EXPORTER_OTLP_ENDPOINT (the exporter appends /v1/traces)."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    def __enter__(self) -> OtlpReceiver:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                encoding = self.headers.get("content-encoding", "")
                if encoding == "gzip":
                    body = gzip.decompress(body)
                elif encoding == "deflate":
                    body = zlib.decompress(body)
                if self.path != TRACES_PATH:
                    self.send_error(404, f"only {TRACES_PATH} here")
                    return
                receiver._received(decode(body))
                answer = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args) -> None:  # quiet
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _received(self, spans: list[ReceivedSpan]) -> None:
        with self._lock:
            self.posts += 1
            self.spans.extend(spans)

    def trace(self, trace_id: str) -> list[ReceivedSpan]:
        with self._lock:
            return [span for span in self.spans if span.trace_id == trace_id]

    def wait_for(self, ready: Callable[[OtlpReceiver], bool], timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while not ready(self):
            if time.monotonic() > deadline:
                raise AssertionError(f"the receiver did not get the expected spans in {timeout} s; it has:\n"
                                     + span_tree(list(self.spans)))
            time.sleep(0.05)


def span_tree(spans: list[ReceivedSpan], show: tuple[str, ...] = ()) -> str:
    """The spans as an indented tree (children under their parent, by start time); a span
    whose parent is not among them is a root, shown with its parent's id."""
    ids = {span.span_id for span in spans}
    children: dict[str, list[ReceivedSpan]] = {}
    for span in spans:
        children.setdefault(span.parent_span_id if span.parent_span_id in ids else "", []).append(span)
    lines: list[str] = []

    def add(span: ReceivedSpan, depth: int) -> None:
        shown = {key: value for key, value in span.attributes.items() if not show or key in show}
        extra = [f"{span.kind.lower()}", f"{span.duration_ms:.2f} ms", f"span {span.span_id}"]
        if depth == 0:
            extra.append(f"trace {span.trace_id}, parent {span.parent_span_id or '-'}")
        if span.links:
            extra.append("links " + ", ".join(span_id for _, span_id in span.links))
        if span.status != "UNSET":
            extra.append(f"status {span.status}" + (f" ({span.status_message})" if span.status_message else ""))
        lines.append("  " * depth + f"{span.name}  [{'; '.join(extra)}]  {shown}")
        for child in sorted(children.get(span.span_id, []), key=lambda s: (s.start_ns, s.name)):
            add(child, depth + 1)

    for root in sorted(children.get("", []), key=lambda s: s.start_ns):
        add(root, 0)
    return "\n".join(lines)
