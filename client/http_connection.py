"""The HTTP/REST transport (client/transport.py): KServe v2 REST, as Triton serves it on port 8000.

The standard library only (http.client, ssl, json), so the client needs nothing new:

  GET  /v2/health/live   /v2/health/ready   /v2
  POST /v2/repository/index                                 (Triton's extension)
  GET  /v2/models/{m}[/versions/{v}]   .../ready   .../config
  POST /v2/models/{m}[/versions/{v}]/infer                  (binary tensors: client/http_inference.py)

An https:// URL turns TLS on (--tls-ca, --tls-cert / --tls-key and --tls-server-name
apply as on gRPC); a token goes in `Authorization: Bearer`. A server's error answer,
`{"error": "..."}` with a status code, becomes `<what> failed on URL: HTTP <code>:
<message>`, the shape of the gRPC transport's messages.

http.client connections are not thread-safe, so each thread keeps its own keep-alive
connection: evaluate's requests in flight each run on a pool thread of their own.
"""

from __future__ import annotations

import concurrent.futures
import http.client
import json
import socket
import ssl
import threading
import urllib.parse
from dataclasses import dataclass

import numpy as np

from client.http_inference import HEADER_LENGTH, infer_request, output_array
from client.security import PLAINTEXT, ClientSecurity, SecurityError, warn_token_in_plaintext
from client.transport import (
    DEFAULT_PROBE_TIMEOUT_S,
    ClientError,
    ImageModel,
    ModelMetadata,
    ServerError,
    ServerMetadata,
    TensorSpec,
    Transport,
    first_line,
    unreachable,
)

# How servers say "not (yet) ready" or "no such model" on the health and ready endpoints:
# Triton answers 400, the KServe spec and our server 503 / 404.
_NOT_READY = (400, 404, 503)
_REFUSED = (400, 501)  # the request itself was judged wrong or unsupported (ServerError.refused)
_STALE_CONNECTION = (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError)
UNREACHABLE_HINT = "is the server running, and is --url its HTTP port, 8000 by default?"
TLS_HINT = ("does the server serve TLS on this port (else write http://), does --tls-ca hold the CA that signed its "
            "certificate, and for mutual TLS --tls-cert / --tls-key a certificate it trusts?")  # fmt: skip
TIMEOUT_HINT = " (raise --timeout, or lower --batch-size)"
MAX_POOL_THREADS = 256  # an upper bound only: threads start as --concurrency needs them


@dataclass(frozen=True)
class _Reply:
    status: int
    reason: str
    header_length: int | None  # Inference-Header-Content-Length: the body is JSON + binary tensors
    body: bytes


class HttpConnection(Transport):
    protocol = "http"

    def __init__(self, url: str, timeout_s: float = DEFAULT_PROBE_TIMEOUT_S, security: ClientSecurity = PLAINTEXT):
        parts = _split_url(url)
        self.url = f"{parts.scheme}://{parts.netloc}{parts.path}"
        self.timeout_s = timeout_s
        self._host, self._base_path = parts.hostname, parts.path
        self._port = parts.port or (443 if parts.scheme == "https" else 80)
        self._server_name = security.server_name
        self._ssl_context = self._tls_context(parts.scheme, security)
        self._headers = security.http_headers()
        self._local = threading.local()  # this thread's http.client connection
        self._opened: list[http.client.HTTPConnection] = []
        self._lock = threading.Lock()
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None

    def _tls_context(self, scheme: str, security: ClientSecurity):
        if scheme == "http":
            if security.uses_tls:
                raise ClientError(f"--url {self.url} is plaintext HTTP but TLS flags were given; "
                                  f"write https://{self.url[len('http://'):]}")  # fmt: skip
            warn_token_in_plaintext(security)
            return None
        try:
            return security.ssl_context()
        except SecurityError as error:
            raise ClientError(str(error)) from None

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            for connection in self._opened:
                connection.close()
            self._opened.clear()

    # ------------------------------------------------------------------ server

    def check_live(self) -> ServerMetadata:
        try:
            reply = self._exchange("GET", "/v2/health/live")
        except ssl.SSLError as error:  # the server is there; TLS is what failed
            raise ClientError(f"TLS with {self.url} failed: {first_line(str(error))} ({TLS_HINT})") from None
        except (OSError, http.client.HTTPException) as error:
            if self._ssl_context is not None and isinstance(error, _STALE_CONNECTION):
                # TLS 1.3 checks a client's certificate after the handshake: a refused one reads as a hang-up.
                raise ClientError(f"TLS with {self.url} failed: the server closed the connection without "
                                  f"answering ({TLS_HINT})") from None  # fmt: skip
            raise unreachable(self.url, _describe(error), UNREACHABLE_HINT) from None
        if reply.status in (400, 503):  # (a 404 here means this is not a v2 server: an error below)
            raise ClientError(f"server at {self.url} answers but reports it is not live")
        if reply.status != 200:
            raise self._error(reply, "ServerLive", hint=f" ({UNREACHABLE_HINT})")
        metadata = self._json("GET", "/v2", "ServerMetadata")
        return ServerMetadata(name=str(metadata.get("name", "")), version=str(metadata.get("version", "")),
                              extensions=tuple(metadata.get("extensions", ())))  # fmt: skip

    def server_ready(self) -> bool:
        return self._ready("/v2/health/ready", "ServerReady")

    def repository_index(self) -> list[dict] | None:
        reply = self._call("POST", "/v2/repository/index", "RepositoryIndex", body=b"{}",
                           headers={"Content-Type": "application/json"})  # fmt: skip
        if reply.status != 200:
            return None  # the index is Triton's extension, not core v2
        keys = ("name", "version", "state", "reason")
        index = self._parse_json(reply, "RepositoryIndex")
        entries = [{key: str(entry.get(key, "")) for key in keys} for entry in index]
        return sorted(entries, key=lambda entry: entry["name"])

    # ------------------------------------------------------------------ models

    def model_ready(self, name: str, version: str = "") -> bool:
        return self._ready(_model_path(name, version) + "/ready", f"ModelReady({name})")

    def model_metadata(self, name: str, version: str = "") -> ModelMetadata:
        metadata = self._json("GET", _model_path(name, version), f"ModelMetadata({name})")
        try:
            return ModelMetadata(
                name=str(metadata["name"]),
                platform=str(metadata.get("platform", "")),
                versions=tuple(str(v) for v in metadata.get("versions", ())),
                inputs=tuple(_tensor_spec(t) for t in metadata.get("inputs", ())),
                outputs=tuple(_tensor_spec(t) for t in metadata.get("outputs", ())),
            )
        except (KeyError, TypeError, ValueError) as error:
            raise ClientError(f"ModelMetadata({name}) on {self.url}: not v2 model metadata ({error!r})") from None

    def max_batch_size(self, name: str, version: str = "") -> int:
        reply = self._call("GET", _model_path(name, version) + "/config", f"ModelConfig({name})")
        if reply.status != 200:
            return 0  # no model_configuration extension here
        config = self._parse_json(reply, f"ModelConfig({name})")
        config = config.get("config", config)  # some servers wrap it, as gRPC's ModelConfigResponse does
        # Triton writes protobuf field names (max_batch_size); a JSON mapping may write maxBatchSize.
        return max(0, int(config.get("max_batch_size", config.get("maxBatchSize", 0)) or 0))

    # ------------------------------------------------------------------ inference

    def infer(self, model: ImageModel, images: np.ndarray, class_count: int = 0) -> np.ndarray:
        what = f"inference on model {model.name!r}"
        header, pixels = infer_request(model, images, class_count)
        headers = {
            "Content-Type": "application/octet-stream",
            "Content-Length": str(len(header) + len(pixels)),
            HEADER_LENGTH: str(len(header)),
        }
        # One buffer, so that http.client sends headers and body in one write: sent as pieces,
        # each small write waits on the peer's delayed ACK (measured: 8.8 ms against 2.5 ms
        # for 64 MNIST images).
        reply = self._call("POST", _model_path(model.name, model.version) + "/infer", what,
                           body=b"".join((header, pixels)), headers=headers)  # fmt: skip
        if reply.status != 200:
            raise self._error(reply, what)
        return output_array(reply.body, reply.header_length, model.probabilities_output.name)

    def submit_infer(self, model: ImageModel, images: np.ndarray) -> concurrent.futures.Future:
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(MAX_POOL_THREADS, thread_name_prefix="http-infer")
        return self._pool.submit(self.infer, model, images)

    # ------------------------------------------------------------------ requests

    def _ready(self, path: str, what: str) -> bool:
        reply = self._call("GET", path, what)
        if reply.status == 200:
            return True
        if reply.status in _NOT_READY:
            return False
        raise self._error(reply, what)

    def _json(self, method: str, path: str, what: str):
        reply = self._call(method, path, what)
        if reply.status != 200:
            raise self._error(reply, what)
        return self._parse_json(reply, what)

    def _parse_json(self, reply: _Reply, what: str):
        try:
            return json.loads(reply.body)
        except ValueError:
            text = first_line(reply.body[:200].decode("utf-8", errors="replace")) if reply.body else "an empty body"
            raise ClientError(f"{what} failed on {self.url}: the answer is not JSON ({text}); "
                              "is --url the server's HTTP port, 8000 by default?") from None  # fmt: skip

    def _call(self, method: str, path: str, what: str, body=b"", headers: dict | None = None) -> _Reply:
        """One request; a network failure or a timeout becomes a ClientError (an HTTP error status does not)."""
        try:
            return self._exchange(method, path, body, headers)
        except TimeoutError:
            late = f"no answer within {self.timeout_s:g} s{TIMEOUT_HINT}"
            raise ClientError(f"{what} failed on {self.url}: {late}") from None
        except (OSError, http.client.HTTPException) as error:
            raise ClientError(f"{what} failed on {self.url}: {_describe(error)}") from None

    def _exchange(self, method: str, path: str, body=b"", headers: dict | None = None) -> _Reply:
        """Send and read one request on this thread's connection.

        A keep-alive connection the server has since closed fails on first use; that
        one case is retried, once, on a fresh connection (inference has no side effects).
        """
        connection = self._connection()
        reused = connection.sock is not None
        try:
            connection.request(method, self._base_path + path, body=body, headers={**self._headers, **(headers or {})})
            response = connection.getresponse()
            data = response.read()
        except _STALE_CONNECTION:
            connection.close()
            if not reused:
                raise
            return self._exchange(method, path, body, headers)
        except BaseException:
            connection.close()  # half-done exchanges leave http.client in a state it cannot reuse
            raise
        length = response.getheader(HEADER_LENGTH)
        return _Reply(response.status, response.reason, int(length) if length else None, data)

    def _connection(self) -> http.client.HTTPConnection:
        connection = getattr(self._local, "connection", None)
        if connection is None:
            if self._ssl_context is None:
                connection = http.client.HTTPConnection(self._host, self._port, timeout=self.timeout_s)
            else:
                connection = _HTTPSConnection(self._host, self._port, self.timeout_s, self._ssl_context,
                                              self._server_name)  # fmt: skip
            self._local.connection = connection
            with self._lock:
                self._opened.append(connection)
        return connection

    def _error(self, reply: _Reply, what: str, hint: str = "") -> ServerError:
        if reply.status == 408 or reply.status == 504:
            hint = hint or TIMEOUT_HINT
        return ServerError(what, self.url, f"HTTP {reply.status}: {_error_message(reply)}",
                           refused=reply.status in _REFUSED, hint=hint)  # fmt: skip


class _HTTPSConnection(http.client.HTTPSConnection):
    """HTTPS that can expect another name in the server's certificate than the host it dials
    (--tls-server-name), as gRPC's ssl_target_name_override does."""

    def __init__(self, host: str, port: int, timeout: float, context, server_name: str | None):
        super().__init__(host, port, timeout=timeout, context=context)
        self._tls_context, self._server_name = context, server_name or host

    def connect(self) -> None:
        http.client.HTTPConnection.connect(self)  # TCP (with TCP_NODELAY), then TLS on top
        self.sock = self._tls_context.wrap_socket(self.sock, server_hostname=self._server_name)


def _split_url(url: str) -> urllib.parse.SplitResult:
    parts = urllib.parse.urlsplit(url.rstrip("/"))
    try:
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number
    except ValueError:
        raise ClientError(f"--url {url!r}: the port is not a number (for example http://localhost:8000)") from None
    if not parts.hostname:
        raise ClientError(f"--url {url!r} has no host (for example http://localhost:8000)")
    return parts


def _model_path(name: str, version: str = "") -> str:
    path = f"/v2/models/{urllib.parse.quote(name, safe='')}"
    return path + (f"/versions/{urllib.parse.quote(version, safe='')}" if version else "")


def _tensor_spec(tensor: dict) -> TensorSpec:
    return TensorSpec(name=str(tensor["name"]), datatype=str(tensor["datatype"]),
                      shape=tuple(int(d) for d in tensor["shape"]))  # fmt: skip


def _error_message(reply: _Reply) -> str:
    """The server's `{"error": "..."}`, else the body's first line, else the status's reason."""
    text = reply.body[:2000].decode("utf-8", errors="replace")
    try:
        message = json.loads(text).get("error")
    except (ValueError, AttributeError):
        message = None
    return first_line(str(message) if message else (text or reply.reason))


def _describe(error: BaseException) -> str:
    """A network failure in a few words: 'connection refused', not a class name."""
    if isinstance(error, ConnectionRefusedError):
        return "connection refused"
    if isinstance(error, socket.gaierror):
        return f"cannot resolve the host name ({error.strerror})"
    if isinstance(error, TimeoutError):
        return "timed out"
    if isinstance(error, http.client.RemoteDisconnected):
        return "the server closed the connection without answering (not an HTTP server?)"
    if isinstance(error, http.client.HTTPException):  # e.g. BadStatusLine: binary HTTP/2 frames, a gRPC port
        return f"the answer is not HTTP/1.1 ({type(error).__name__})"
    return str(error) or type(error).__name__
