"""Bare HTTP servers speaking just enough KServe v2 REST for perf_analyzer (`-i http -m bare`):
the ceiling of each candidate library with none of our code, to choose the one our
server's HTTP endpoint is built on.

    python benchmarks/bare_http_server.py uvicorn 28740 &
    perf_analyzer -i http -u 127.0.0.1:28740 -m bare --concurrency-range 16 --shape images:28,28,1

Every infer answers a fixed FP32 [batch, 10] tensor in Triton's binary extension,
after reading the request body and its JSON header, as a real endpoint must. Backends:

  uvicorn   uvicorn + httptools + uvloop, a bare ASGI callable (no framework)
  aiohttp   aiohttp.web on uvloop
"""

from __future__ import annotations

import json
import sys

import numpy as np

CLASSES = 10
HEADER_LENGTH = "inference-header-content-length"
METADATA = {"name": "bare", "versions": ["1"], "platform": "onnxruntime_onnx",
            "inputs": [{"name": "images", "datatype": "UINT8", "shape": [-1, -1, -1, -1]}],
            "outputs": [{"name": "probabilities", "datatype": "FP32", "shape": [-1, CLASSES]}]}
CONFIG = {"name": "bare", "platform": "onnxruntime_onnx", "max_batch_size": 64,
          "input": [{"name": "images", "data_type": "TYPE_UINT8", "dims": [-1, -1, -1]}],
          "output": [{"name": "probabilities", "data_type": "TYPE_FP32", "dims": [CLASSES]}]}


def answer(body: bytes, header_length: int | None) -> tuple[bytes, int]:
    """(response body, its JSON header's length) for an infer request body."""
    header = json.loads(body[:header_length] if header_length else body)
    batch = header["inputs"][0]["shape"][0]
    data = np.full((batch, CLASSES), 0.1, dtype=np.float32).tobytes()
    response = json.dumps({"model_name": "bare", "model_version": "1", "outputs": [
        {"name": "probabilities", "datatype": "FP32", "shape": [batch, CLASSES],
         "parameters": {"binary_data_size": len(data)}}]}).encode()
    return response + data, len(response)


def json_body(path: str) -> bytes | None:
    if path in ("/v2/models/bare", "/v2/models/bare/versions/1"):
        return json.dumps(METADATA).encode()
    if path.endswith("/config"):
        return json.dumps(CONFIG).encode()
    if path in ("/v2/health/ready", "/v2/health/live", "/v2/models/bare/ready"):
        return b""
    if path == "/v2":
        return json.dumps({"name": "bare", "version": "0", "extensions": []}).encode()
    return None


async def asgi_app(scope, receive, send):
    if scope["type"] != "http":
        return
    chunks = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            break
    body = b"".join(chunks)
    path = scope["path"]
    headers = [(b"content-type", b"application/json")]
    if path.endswith("/infer"):
        length = next((int(v) for k, v in scope["headers"] if k == HEADER_LENGTH.encode()), None)
        payload, header_length = answer(body, length)
        headers = [(b"content-type", b"application/octet-stream"),
                   (HEADER_LENGTH.encode(), str(header_length).encode())]
        status = 200
    else:
        payload = json_body(path)
        status = 404 if payload is None else 200
        payload = payload or b'{"error": "not found"}'
    headers.append((b"content-length", str(len(payload)).encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})


def run_uvicorn(port: int) -> None:
    import uvicorn

    uvicorn.run(asgi_app, host="127.0.0.1", port=port, http="httptools", loop="uvloop",
                log_level="warning", access_log=False)


def run_aiohttp(port: int) -> None:
    import uvloop
    from aiohttp import web

    async def handle(request: web.Request) -> web.Response:
        body = await request.read()
        if request.path.endswith("/infer"):
            length = request.headers.get(HEADER_LENGTH)
            payload, header_length = answer(body, int(length) if length else None)
            return web.Response(body=payload, content_type="application/octet-stream",
                                headers={HEADER_LENGTH: str(header_length)})
        payload = json_body(request.path)
        if payload is None:
            return web.Response(status=404, body=b'{"error": "not found"}', content_type="application/json")
        return web.Response(body=payload, content_type="application/json")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    uvloop.install()
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)


if __name__ == "__main__":
    backend, port = sys.argv[1], int(sys.argv[2])
    {"uvicorn": run_uvicorn, "aiohttp": run_aiohttp}[backend](port)
