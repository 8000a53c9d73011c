"""The client's HTTP/REST transport without a real server: the wire encoding, the URL rules,
and the failures a real server does not produce on demand (a stdlib http.server stub).

The transport against real servers: test_client_http_server.py (ours) and
test_client_triton.py (NVIDIA Triton, -m slow).
"""

from __future__ import annotations

import json
import struct
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from client.connect import connect
from client.http_connection import HttpConnection
from client.http_inference import HEADER_LENGTH, infer_request, output_array
from client.predict import predict_images
from client.security import ClientSecurity
from client.transport import ClientError, ServerError
from tests.support.client_models import MNIST_MODEL
from tests.support.servers import free_port

# --------------------------------------------------------------------------- wire encoding


def test_request_is_a_json_header_then_the_raw_pixels():
    images = np.arange(2 * 28 * 28, dtype=np.uint64).astype(np.uint8).reshape(2, 28, 28, 1)
    header, pixels = infer_request(MNIST_MODEL, images, class_count=3)
    assert json.loads(header) == {
        "inputs": [{"name": "images", "datatype": "UINT8", "shape": [2, 28, 28, 1],
                    "parameters": {"binary_data_size": 2 * 784}}],
        "outputs": [{"name": "probabilities", "parameters": {"binary_data": True, "classification": 3}}],
    }  # fmt: skip
    assert bytes(pixels) == images.tobytes()


def _binary_response(outputs: list[tuple[dict, bytes]]) -> tuple[bytes, int]:
    """A response body as Triton writes it: JSON header, then each binary output's bytes in order."""
    for output, raw in outputs:
        output.setdefault("parameters", {})["binary_data_size"] = len(raw)
    header = json.dumps({"model_name": "m", "outputs": [output for output, _ in outputs]}).encode()
    return header + b"".join(raw for _, raw in outputs), len(header)


def test_binary_output_is_found_after_the_outputs_before_it():
    scores = np.array([[0.25, 0.75], [1.0, 0.0]], dtype=np.float32)
    labels = [b"0.9:7:seven", b"0.1:1"]
    body, header_length = _binary_response([
        ({"name": "other", "datatype": "INT64", "shape": [3]}, np.arange(3, dtype="<i8").tobytes()),
        ({"name": "probabilities", "datatype": "FP32", "shape": [2, 2]}, scores.tobytes()),
        ({"name": "classes", "datatype": "BYTES", "shape": [1, 2]},
         b"".join(struct.pack("<I", len(e)) + e for e in labels)),
    ])  # fmt: skip
    np.testing.assert_array_equal(output_array(body, header_length, "probabilities"), scores)
    classes = output_array(body, header_length, "classes")
    assert classes.shape == (1, 2) and list(classes.ravel()) == labels


def test_json_output_flat_or_nested_and_bytes_as_strings():
    body = json.dumps({"outputs": [
        {"name": "flat", "datatype": "FP32", "shape": [2, 2], "data": [0.25, 0.75, 1.0, 0.0]},
        {"name": "nested", "datatype": "FP32", "shape": [2, 2], "data": [[0.25, 0.75], [1.0, 0.0]]},
        {"name": "classes", "datatype": "BYTES", "shape": [1], "data": ["0.9:7:seven"]},
    ]}).encode()  # fmt: skip
    for name in ("flat", "nested"):
        np.testing.assert_array_equal(output_array(body, None, name), [[0.25, 0.75], [1.0, 0.0]])
    assert output_array(body, None, "classes").tolist() == [b"0.9:7:seven"]


def test_unreadable_responses_are_explained():
    body, header_length = _binary_response([({"name": "probabilities", "datatype": "FP32", "shape": [2]}, b"\0" * 8)])
    with pytest.raises(ClientError, match="no output 'other' \\(returned: probabilities\\)"):
        output_array(body, header_length, "other")
    with pytest.raises(ClientError, match="binary_data_size 8 but only 4 bytes follow"):
        output_array(body[:-4], header_length, "probabilities")
    with pytest.raises(ClientError, match="shape \\[3\\] but 2 values"):
        output_array(body.replace(b'"shape": [2]', b'"shape": [3]'), header_length, "probabilities")
    with pytest.raises(ClientError, match="not v2 JSON"):
        output_array(b"<html>", None, "probabilities")


# --------------------------------------------------------------------------- URLs pick the transport


def test_the_url_scheme_picks_the_protocol():
    with connect("localhost:8001") as grpc_connection, connect("grpc://localhost:8001") as also_grpc:
        assert grpc_connection.protocol == also_grpc.protocol == "grpc"
    with connect("http://localhost:8000/") as http_connection:
        assert http_connection.protocol == "http" and http_connection.url == "http://localhost:8000"
    with connect("https://example.com/serving") as https_connection:  # default port 443, a path prefix kept
        assert https_connection.url == "https://example.com/serving" and https_connection._port == 443


@pytest.mark.parametrize("url, security, message", [
    ("http://localhost:port", ClientSecurity(), "the port is not a number"),
    ("http://:8000", ClientSecurity(), "has no host"),
    ("http://localhost:8000", ClientSecurity(tls=True), "plaintext HTTP but TLS flags were given; write https://"),
])  # fmt: skip
def test_bad_urls_are_one_line_errors(url, security, message):
    with pytest.raises(ClientError, match=message):
        connect(url, security=security)


def test_connection_refused_is_server_unreachable():
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    with connect(url) as connection, pytest.raises(ClientError) as caught:
        connection.check_live()
    assert str(caught.value) == (f"server unreachable at {url}: connection refused "
                                 "(is the server running, and is --url its HTTP port, 8000 by default?)")  # fmt: skip


# --------------------------------------------------------------------------- failures, from a stub


class _Stub(BaseHTTPRequestHandler):
    """Answers from `routes`: "METHOD path" -> callable(handler) that writes the whole answer."""

    routes: dict = {}
    protocol_version = "HTTP/1.1"  # keep-alive, as real servers do

    def do_GET(self):
        self._answer()

    def do_POST(self):
        self._answer()

    def _answer(self):
        self.body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        route = self.routes.get(f"{self.command} {self.path}")
        if route is None:
            return reply(self, 404, {"error": f"no route {self.path}"})
        route(self)

    def log_message(self, *args):  # quiet
        pass


def reply(handler, status: int, body, headers: dict | None = None) -> None:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    handler.send_response(status)
    for key, value in {"Content-Length": str(len(data)), **(headers or {})}.items():
        handler.send_header(key, value)
    handler.end_headers()
    handler.wfile.write(data)


@pytest.fixture
def stub():
    """A stub server; set its routes with stub.routes.update(...); stub.url to connect."""
    handler = type("Handler", (_Stub,), {"routes": {}, "seen": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
    handler.url = f"http://127.0.0.1:{server.server_address[1]}"
    yield handler
    server.shutdown()
    server.server_close()


def _probabilities_answer(handler, scores=np.full((1, 10), 0.1, np.float32)):
    body, header_length = _binary_response([({"name": "probabilities", "datatype": "FP32", "shape": list(scores.shape)},
                                             scores.tobytes())])  # fmt: skip
    reply(handler, 200, body, {HEADER_LENGTH: str(header_length)})


def test_an_error_body_becomes_the_one_line_message(stub):
    message = {"error": "unexpected shape for input 'images'\nmore"}
    stub.routes["POST /v2/models/mnist/infer"] = lambda h: reply(h, 400, message)
    with connect(stub.url) as connection, pytest.raises(ServerError) as caught:
        connection.infer(MNIST_MODEL, np.zeros((1, 28, 28, 1), np.uint8))
    assert str(caught.value) == (f"inference on model 'mnist' failed on {stub.url}: "
                                 "HTTP 400: unexpected shape for input 'images'")  # fmt: skip
    assert caught.value.refused


def test_an_error_answer_that_is_not_json_still_reads_as_one_line(stub):
    stub.routes["GET /v2/models/mnist"] = lambda h: reply(h, 502, b"Bad Gateway\n<html>proxy page</html>")
    with connect(stub.url) as connection, pytest.raises(ServerError) as caught:
        connection.model_metadata("mnist")
    assert str(caught.value) == f"ModelMetadata(mnist) failed on {stub.url}: HTTP 502: Bad Gateway"


def test_a_request_slower_than_the_timeout(stub):
    stub.routes["POST /v2/models/mnist/infer"] = lambda h: (time.sleep(1.0), _probabilities_answer(h))
    with connect(stub.url, timeout_s=0.2) as connection, pytest.raises(ClientError) as caught:
        connection.infer(MNIST_MODEL, np.zeros((1, 28, 28, 1), np.uint8))
    assert str(caught.value) == (f"inference on model 'mnist' failed on {stub.url}: no answer within 0.2 s "
                                 "(raise --timeout, or lower --batch-size)")  # fmt: skip


def test_a_keep_alive_connection_the_server_closed_is_reopened(stub):
    def answer_then_close(handler):
        _probabilities_answer(handler)
        handler.close_connection = True  # without "Connection: close": the client learns on its next request

    stub.routes["POST /v2/models/mnist/infer"] = answer_then_close
    with connect(stub.url) as connection:
        for _ in range(3):
            assert connection.infer(MNIST_MODEL, np.zeros((1, 28, 28, 1), np.uint8)).shape == (1, 10)


def test_a_server_that_hangs_up_without_answering(stub):
    stub.routes["GET /v2/health/live"] = lambda h: setattr(h, "close_connection", True)
    with connect(stub.url) as connection, pytest.raises(ClientError, match="unreachable at .*closed the connection"):
        connection.check_live()


def test_the_token_travels_as_a_bearer_header(stub):
    seen = []
    stub.routes["GET /v2/health/live"] = lambda h: (seen.append(h.headers.get("Authorization")), reply(h, 200, b""))
    stub.routes["GET /v2"] = lambda h: reply(h, 200, {"name": "stub", "version": "0", "extensions": []})
    with HttpConnection(stub.url, security=ClientSecurity(token="s3cret")) as connection:
        assert connection.check_live().name == "stub"
    assert seen == ["Bearer s3cret"]


def test_predict_falls_back_when_the_server_refuses_classification(stub, tmp_path):
    """A v2 server without the classification extension answers 400; predict then ranks itself."""
    from PIL import Image

    scores = np.linspace(0.0, 0.9, 10, dtype=np.float32)[np.newaxis]
    asked = []

    def infer(handler):
        header = json.loads(handler.body[: int(handler.headers[HEADER_LENGTH])])
        asked.append(header["outputs"][0]["parameters"])
        if "classification" in header["outputs"][0]["parameters"]:
            return reply(handler, 400, {"error": "unknown parameter 'classification'"})
        _probabilities_answer(handler, scores)

    stub.routes["POST /v2/models/mnist/infer"] = infer
    Image.new("L", (28, 28)).save(tmp_path / "digit.png")
    with connect(stub.url) as connection:
        [result] = predict_images(connection, MNIST_MODEL, [str(tmp_path / "digit.png")], top_k=2)
    assert [(p.class_index, p.label) for p in result.top] == [(9, "9"), (8, "8")]
    assert asked == [{"binary_data": True, "classification": 2}, {"binary_data": True}]
