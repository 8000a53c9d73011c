"""An OTLP/HTTP trace sink for measuring the cost of tracing: takes what the server's
exporter POSTs to /v1/traces, decodes each ExportTraceServiceRequest (opentelemetry-proto,
as a collector would) to count its spans, answers 200, and throws the spans away.

    python benchmarks/otlp_sink.py --port 4318 &
    OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:4318 python benchmarks/vs_triton.py ... \\
        --server-flag=--trace-rate=1.0

Every --every seconds it prints the export requests and spans received in that interval
(spans/s), and the totals when stopped (SIGINT / SIGTERM), also to --json. It runs on the
same machine as the server, as a collector's agent would: its own CPU (one thread, a
protobuf parse per export) is part of what is measured, so keep it light.
"""

from __future__ import annotations

import argparse
import gzip
import json
import signal
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

ANSWER = ExportTraceServiceResponse().SerializeToString()


class Counts:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.posts = self.spans = self.bytes = self.bad = 0

    def add(self, spans: int, size: int) -> None:
        with self.lock:
            self.posts += 1
            self.spans += spans
            self.bytes += size

    def snapshot(self) -> dict:
        with self.lock:
            return {"posts": self.posts, "spans": self.spans, "bytes": self.bytes, "bad": self.bad}


def handler(counts: Counts):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as a collector answers

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length", 0)))
            try:
                if self.headers.get("content-encoding") == "gzip":
                    body = gzip.decompress(body)
                request = ExportTraceServiceRequest.FromString(body)
            except Exception as error:  # a malformed export: answered 400 and counted
                with counts.lock:
                    counts.bad += 1
                self._answer(400, str(error).encode())
                return
            spans = sum(len(scope.spans) for resource in request.resource_spans for scope in resource.scope_spans)
            counts.add(spans, len(body))
            self._answer(200, ANSWER)

        def _answer(self, status: int, body: bytes) -> None:
            self.send_response(status)
            self.send_header("content-type", "application/x-protobuf")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    return Handler


def report(counts: Counts, every_s: float, stop: threading.Event) -> None:
    last, last_time = counts.snapshot(), time.monotonic()
    while not stop.wait(every_s):
        now, now_time = counts.snapshot(), time.monotonic()
        spans = now["spans"] - last["spans"]
        if spans or now["posts"] != last["posts"]:
            print(f"otlp_sink: {now['posts'] - last['posts']} exports, {spans} spans "
                  f"({spans / (now_time - last_time):,.0f}/s); total {now['spans']:,} spans", flush=True)
        last, last_time = now, now_time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=4318, help="OTLP/HTTP's standard port")
    parser.add_argument("--every", type=float, default=5.0, help="seconds between progress lines")
    parser.add_argument("--json", type=Path, help="write the totals here when stopped")
    args = parser.parse_args()

    counts, stop = Counts(), threading.Event()
    server = ThreadingHTTPServer((args.host, args.port), handler(counts))
    started = time.monotonic()
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
    threading.Thread(target=report, args=(counts, args.every, stop), daemon=True).start()
    print(f"otlp_sink: listening on http://{args.host}:{args.port}/v1/traces", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    stop.set()
    totals = {**counts.snapshot(), "seconds": round(time.monotonic() - started, 1)}
    print(f"otlp_sink: totals {totals}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(totals, indent=2))
    sys.exit(0)


if __name__ == "__main__":
    main()
