"""The KServe v2 REST endpoint (Triton's HTTP/REST protocol) as a bare ASGI application.

    GET  /v2/health/live | /v2/health/ready                   200, or 503 when not ready
    GET  /v2                                                  server metadata
    GET  /v2/models/{m}[/versions/{v}]                        model metadata
    GET  /v2/models/{m}[/versions/{v}]/ready | /config | /stats
    GET  /v2/models/stats                                     every model's statistics
    POST /v2/models/{m}[/versions/{v}]/infer                  JSON or binary tensors
    POST /v2/repository/index
    POST /v2/repository/models/{m}/load | /unload             model control (--model-control-mode explicit)
    GET  /v2/systemsharedmemory[/region/{r}]/status           system shared memory (Triton's extension)
    POST /v2/systemsharedmemory/region/{r}/register           {"key": "/name", "offset": 0, "byte_size": N}
    POST /v2/systemsharedmemory[/region/{r}]/unregister
    POST /v2/cudasharedmemory/region/{r}/register             501: not supported on this server

Every answer comes from the same `InferenceService` as gRPC's, on the event loop:
inference waits for its batch without a thread of its own (server.scheduling.steps.run_async),
in the same batchers as gRPC requests. An `InferenceError` becomes JSON
`{"error": "..."}` with Triton's status for its code (`STATUS`); a body that is too large
(413), in an unsupported Content-Encoding (415) or too slow to arrive (408) is refused
before it is parsed. Bearer tokens, when configured, guard everything but /v2/health.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import json
import logging
import re
import time
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import grpc
import orjson
from google.protobuf.message import Message

from server.errors import InferenceError, invalid
from server.inference.service import InferenceService
from server.models.control import FILE_PARAMETER_PREFIX
from server.scheduling.batcher import CallScope
from server.transport.http_codec import (
    BINARY_CONTENT_TYPE,
    HEADER_LENGTH,
    JSON_CONTENT_TYPE,
    error_body,
    infer_request,
    infer_response,
    json_object,
    message_dict,
    message_json,
    parse_json_object,
)
from server.transport.security import TokenCheck
from server.transport.slow_bodies import SlowBodies

log = logging.getLogger(__name__)

# Triton's HTTP status for each error code (its HttpCodeFromError), plus the two codes
# Triton does not have: an overloaded queue and an expired timeout.
STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}
# A request body has this long to arrive in full, once its headers are in.
BODY_TIMEOUT_S = 30.0
DECOMPRESSORS = {"gzip": lambda: zlib.decompressobj(16 + zlib.MAX_WBITS), "deflate": zlib.decompressobj}
COMPRESSORS = {"gzip": gzip.compress, "deflate": zlib.compress}
HEALTH_PREFIX = "/v2/health/"


class HttpError(Exception):
    """A refusal with its own HTTP status (one InferenceError cannot express)."""

    def __init__(self, status: int, message: str, headers: tuple[tuple[bytes, bytes], ...] = ()):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]
    params: dict[str, str]
    read_body: Callable[[], Awaitable[bytes]]


@dataclass
class Response:
    status: int = 200
    body: bytes = b""
    content_type: str = JSON_CONTENT_TYPE
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)


def json_response(content: Message | dict | list, status: int = 200) -> Response:
    body = message_json(content) if isinstance(content, Message) else orjson.dumps(content)
    return Response(status, body)


_MODEL = r"/v2/models/(?P<name>[^/]+)(?:/versions/(?P<version>[^/]+))?"
_SHM = r"/v2/systemsharedmemory(?:/region/(?P<region>[^/]+))?"
_CUDA_SHM = r"/v2/cudasharedmemory(?:/region/(?P<region>[^/]+))?"


class HttpApp:
    """The ASGI callable uvicorn serves."""

    def __init__(self, service: InferenceService, tokens: TokenCheck | None, max_body_bytes: int,
                 body_timeout_s: float = BODY_TIMEOUT_S):  # fmt: skip
        self.service = service
        self.tokens = tokens
        self.max_body_bytes = max_body_bytes
        self._slow_bodies = SlowBodies(body_timeout_s)
        # Tried in order; inference first, as nearly every request is one.
        self.routes: list[tuple[str, re.Pattern, Callable[[Request], Awaitable[Response]]]] = [
            ("POST", re.compile(_MODEL + "/infer"), self.infer),
            ("GET", re.compile(r"/v2/health/live"), self.live),
            ("GET", re.compile(r"/v2/health/ready"), self.ready),
            ("GET", re.compile(r"/v2"), self.server_metadata),
            ("GET", re.compile(r"/v2/models(?:/(?P<name>[^/]+)(?:/versions/(?P<version>[^/]+))?)?/stats"),
             self.model_statistics),
            ("GET", re.compile(_MODEL + "/ready"), self.model_ready),
            ("GET", re.compile(_MODEL + "/config"), self.model_config),
            ("GET", re.compile(_MODEL), self.model_metadata),
            ("POST", re.compile(r"/v2/repository/index"), self.repository_index),
            ("POST", re.compile(r"/v2/repository/models/(?P<name>[^/]+)/load"), self.load_model),
            ("POST", re.compile(r"/v2/repository/models/(?P<name>[^/]+)/unload"), self.unload_model),
            ("GET", re.compile(_SHM + "/status"), self.shm_status),
            ("POST", re.compile(r"/v2/systemsharedmemory/region/(?P<region>[^/]+)/register"), self.shm_register),
            ("POST", re.compile(_SHM + "/unregister"), self.shm_unregister),
            ("GET", re.compile(_CUDA_SHM + "/status"), self.cuda_shm_status),
            ("POST", re.compile(r"/v2/cudasharedmemory/region/(?P<region>[^/]+)/register"), self.cuda_shm_register),
            ("POST", re.compile(_CUDA_SHM + "/unregister"), self.cuda_shm_unregister),
        ]

    # -- ASGI ----------------------------------------------------------------------------------
    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":  # lifespan is off; websockets are not ours
            return
        start = time.perf_counter()
        headers = {key.decode("latin-1"): value.decode("latin-1") for key, value in scope["headers"]}
        request = Request(scope["method"], scope["path"], headers, {}, lambda: self._read_body(headers, receive))
        try:
            response = await self._handle(request)
        except _Disconnected:
            return
        await self._send(response, headers, send)
        if log.isEnabledFor(logging.DEBUG):
            client = scope.get("client") or ("?", 0)
            log.debug("%s:%s %s %s -> %d, %d bytes, %.2f ms", client[0], client[1], request.method, request.path,
                      response.status, len(response.body), (time.perf_counter() - start) * 1e3)

    async def _handle(self, request: Request) -> Response:
        try:
            handler = self._route(request)
            self._authenticate(request)
            return await handler(request)
        except InferenceError as error:
            return Response(STATUS.get(error.code, 400), error_body(error.message))
        except HttpError as error:
            return Response(error.status, error_body(error.message), headers=list(error.headers))
        except _Disconnected:
            raise
        except Exception as error:  # a bug must cost one request, never the server
            log.exception("HTTP %s %s failed", request.method, request.path)
            return Response(500, error_body(f"internal error: {type(error).__name__}: {error}"))

    def _route(self, request: Request) -> Callable[[Request], Awaitable[Response]]:
        allowed = []
        for method, pattern, handler in self.routes:
            match = pattern.fullmatch(request.path)
            if match is None:
                continue
            if method == request.method:
                request.params = {key: value or "" for key, value in match.groupdict().items()}
                return handler
            allowed.append(method)
        if allowed:
            raise HttpError(405, f"{request.method} is not allowed on {request.path}; use {', '.join(allowed)}",
                            ((b"allow", ", ".join(allowed).encode()),))
        raise HttpError(404, f"no endpoint {request.path}; see /v2, /v2/models/NAME, /v2/models/NAME/infer")

    def _authenticate(self, request: Request) -> None:
        if self.tokens is None or request.path.startswith(HEALTH_PREFIX):
            return
        scheme, _, token = request.headers.get("authorization", "").strip().partition(" ")
        token = token.strip() if scheme.lower() == "bearer" and token.strip() else None
        reason = self.tokens.rejection(token, "the header 'Authorization: Bearer <token>'")
        if reason is not None:
            raise HttpError(401, reason, ((b"www-authenticate", b"Bearer"),))

    async def _read_body(self, headers: dict[str, str], receive) -> bytes:
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            raise self._too_large(int(length))
        encoding = headers.get("content-encoding", "identity").strip().lower()
        if encoding not in ("identity", *DECOMPRESSORS):
            raise HttpError(415, f"Content-Encoding {encoding!r} is not supported; use gzip, deflate or none")
        task = asyncio.current_task()
        self._slow_bodies.watch(task)
        try:
            body = await self._receive_body(receive)
        except asyncio.CancelledError:
            if self._slow_bodies.unwatch(task):
                raise HttpError(408, f"the request body did not arrive within "
                                     f"{self._slow_bodies.timeout_s:g} s") from None
            raise
        finally:
            self._slow_bodies.unwatch(task)
        return body if encoding == "identity" else self._decompress(body, encoding)

    async def _receive_body(self, receive) -> bytes:
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _Disconnected
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                raise self._too_large(size)
            chunks.append(chunk)
            if not message.get("more_body"):
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def _decompress(self, body: bytes, encoding: str) -> bytes:
        decompressor = DECOMPRESSORS[encoding]()
        try:
            # One byte past the limit tells a too-large body without inflating all of it.
            data = decompressor.decompress(body, self.max_body_bytes + 1)
        except zlib.error as error:
            raise invalid(f"request body is not valid {encoding} data: {error}") from None
        if len(data) > self.max_body_bytes:
            raise self._too_large(len(data), "decompressed ")
        return data

    def _too_large(self, size: int, what: str = "") -> HttpError:
        return HttpError(413, f"request body ({what}{size} bytes) is larger than --max-message-size "
                              f"{self.max_body_bytes} bytes")

    @staticmethod
    async def _send(response: Response, request_headers: dict[str, str], send) -> None:
        headers = [(b"content-type", response.content_type.encode()), *response.headers]
        body = response.body
        encoding = _accepted_encoding(request_headers.get("accept-encoding", "")) if len(body) > 1024 else None
        if encoding is not None:
            body = COMPRESSORS[encoding](body)
            headers.append((b"content-encoding", encoding.encode()))
        headers.append((b"content-length", str(len(body)).encode()))
        await send({"type": "http.response.start", "status": response.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    # -- endpoints -----------------------------------------------------------------------------
    async def live(self, request: Request) -> Response:
        return json_response({"live": True})

    async def ready(self, request: Request) -> Response:
        ready = self.service.state.serving
        return json_response({"ready": ready}, 200 if ready else 503)

    async def server_metadata(self, request: Request) -> Response:
        return json_response(self.service.server_metadata())

    async def model_metadata(self, request: Request) -> Response:
        return json_response(self.service.model_metadata(request.params["name"], request.params["version"]))

    async def model_ready(self, request: Request) -> Response:
        name, version = request.params["name"], request.params["version"]
        ready = self.service.model_ready(name, version)
        return json_response({"name": name, "ready": ready}, 200 if ready else 503)

    async def model_config(self, request: Request) -> Response:
        # Triton answers the ModelConfig itself, not ModelConfigResponse's {"config": ...}.
        return json_response(self.service.model_config(request.params["name"], request.params["version"]).config)

    async def model_statistics(self, request: Request) -> Response:
        # With --workers this asks the sibling workers too: off the event loop.
        statistics = await asyncio.to_thread(self.service.model_statistics, request.params["name"],
                                             request.params["version"])
        return json_response(statistics)

    async def repository_index(self, request: Request) -> Response:
        options = await _json_options(request)
        index = self.service.repository_index(bool(options.get("ready", False)))
        # Triton answers a bare list of models.
        return json_response([message_dict(model) for model in index.models])

    async def load_model(self, request: Request) -> Response:
        parameters = await _control_parameters(request)
        config = parameters.get("config")
        if config is not None and not isinstance(config, str):
            config = json.dumps(config)  # a ModelConfig given as an object rather than as a JSON string
        files = {key[len(FILE_PARAMETER_PREFIX):]: _base64(key, value) for key, value in parameters.items()
                 if key.startswith(FILE_PARAMETER_PREFIX)}  # fmt: skip
        # Loading builds sessions and waits for the old version's last request: off the event loop.
        await asyncio.to_thread(self.service.load_model, request.params["name"], config, files)
        return json_response({})

    async def unload_model(self, request: Request) -> Response:
        parameters = await _control_parameters(request)
        dependents = parameters.get("unload_dependents", False) is True
        await asyncio.to_thread(self.service.unload_model, request.params["name"], dependents)
        return json_response({})

    # -- system shared memory ----------------------------------------------------------------
    async def shm_status(self, request: Request) -> Response:
        regions = self.service.shm_status(request.params["region"]).regions
        # Triton answers a bare list of regions.
        return json_response([message_dict(regions[name]) for name in sorted(regions)])

    async def shm_register(self, request: Request) -> Response:
        options = await _json_options(request)
        key = options.get("key")
        if not isinstance(key, str):
            raise invalid(f"register body needs 'key': the shared memory object's name, got {json.dumps(key)}")
        sizes = [options.get(field, 0) for field in ("offset", "byte_size")]
        for field, value in zip(("offset", "byte_size"), sizes):
            if type(value) is not int:
                raise invalid(f"register body: {field!r} must be a byte count, got {json.dumps(value)}")
        # With --workers the siblings are asked too: off the event loop.
        await asyncio.to_thread(self.service.shm_register, request.params["region"], key, *sizes)
        return json_response({})

    async def shm_unregister(self, request: Request) -> Response:
        await asyncio.to_thread(self.service.shm_unregister, request.params["region"])
        return json_response({})

    # No CUDA region can exist here (see the gRPC servicer): register refused, none listed, unregister a no-op.
    async def cuda_shm_status(self, request: Request) -> Response:
        if request.params["region"]:
            self.service.cuda_shm_unknown(request.params["region"])
        return json_response([])

    async def cuda_shm_register(self, request: Request) -> Response:
        self.service.cuda_shm_unsupported()

    async def cuda_shm_unregister(self, request: Request) -> Response:
        return json_response({})

    async def infer(self, request: Request) -> Response:
        body = await request.read_body()
        try:
            inference, response_format, timeout_s = infer_request(
                body, _header_length(request.headers), request.params["name"], request.params["version"])
        except InferenceError:
            self.service.metrics.count_unknown_model_request("http", "invalid_argument")
            raise
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        scope = CallScope()
        try:
            # The headers carry a client's traceparent; only read with tracing on.
            answer = await self.service.infer_async(inference, deadline, scope, "http", request.headers)
        finally:
            scope.cancel()  # whatever is still queued for this request (an ensemble's other steps)
        body, header_length = infer_response(answer, response_format)
        if header_length is None:
            return Response(body=body)
        return Response(body=body, content_type=BINARY_CONTENT_TYPE,
                        headers=[(HEADER_LENGTH.encode(), str(header_length).encode())])


class _Disconnected(Exception):
    """The client went away before its request arrived: nobody to answer."""


def _header_length(headers: dict[str, str]) -> int | None:
    value = headers.get(HEADER_LENGTH)
    if value is None:
        return None
    if not value.strip().isdigit():
        raise invalid(f"{HEADER_LENGTH} must be a byte count, got {value!r}")
    return int(value)


async def _json_options(request: Request) -> dict:
    """A small optional JSON object body (repository requests)."""
    body = await request.read_body()
    return parse_json_object(body, "request body") if body.strip() else {}


async def _control_parameters(request: Request) -> dict:
    """The `parameters` of a load or unload body (Triton's), {} without a body."""
    return json_object((await _json_options(request)).get("parameters", {}), "'parameters'")


def _base64(key: str, value) -> bytes:
    """A model file of a load request: base64 text, as tritonclient.http sends it."""
    try:
        return base64.b64decode(value, validate=True)
    except (TypeError, ValueError):
        raise invalid(f"load parameter {key!r} must be the file's content in base64") from None


def _accepted_encoding(accept_encoding: str) -> str | None:
    offered = {part.split(";")[0].strip().lower() for part in accept_encoding.split(",")}
    return next((encoding for encoding in ("gzip", "deflate") if encoding in offered), None)
