"""The HTTP/REST endpoint of the real server, over plain http.client and raw sockets:
every endpoint, JSON and binary tensors, each bad input with its status and message,
sharing batches with gRPC, and draining on SIGTERM."""

from __future__ import annotations

import asyncio
import gzip
import json
import signal
import socket
import threading
import time

import numpy as np
import onnxruntime as ort
import pytest

from ensemble_serving.protocol import grpc_service_pb2 as pb
from server.transport.http_app import HttpApp
from tests.support.http import HEADER_LENGTH, binary_infer_body, call, infer, json_infer_body
from tests.support.metrics import metric, scrape
from tests.support.requests import infer_request, probabilities


@pytest.fixture(scope="module")
def port(server) -> int:
    return server.http_port


@pytest.fixture(scope="module")
def reference(tiny_repository):
    member = tiny_repository.members[0]
    session = ort.InferenceSession(str(tiny_repository.path / member / "1" / "model.onnx"),
                                   providers=["CPUExecutionProvider"])
    return lambda images: session.run(None, {"images": images})[0]


# -- endpoints ---------------------------------------------------------------------------------
def test_health_and_server_metadata(port):
    assert call(port, "GET", "/v2/health/live").json() == {"live": True}
    ready = call(port, "GET", "/v2/health/ready")
    assert ready.status == 200 and ready.json() == {"ready": True}
    metadata = call(port, "GET", "/v2").json()
    assert metadata["name"] == "ensemble-serving"
    assert {"classification", "binary_tensor_data", "statistics"} <= set(metadata["extensions"])


def test_model_metadata_ready_config_and_versions(port, tiny_repository):
    member = tiny_repository.members[0]
    for path in (f"/v2/models/{member}", f"/v2/models/{member}/versions/1"):
        metadata = call(port, "GET", path).json()
        assert metadata["name"] == member and metadata["versions"] == ["1"]
        assert metadata["inputs"] == [{"name": "images", "datatype": "UINT8",
                                       "shape": [-1, *tiny_repository.image_shape]}]  # numbers, as Triton
    assert call(port, "GET", f"/v2/models/{member}/ready").json() == {"name": member, "ready": True}
    config = call(port, "GET", f"/v2/models/{member}/config").json()
    assert config["name"] == member and config["max_batch_size"] == tiny_repository.max_batch_size
    assert config["input"][0]["dims"] == list(tiny_repository.image_shape)
    ensemble = call(port, "GET", f"/v2/models/{tiny_repository.ensemble}/config").json()
    assert ensemble["platform"] == "ensemble"


def test_infer_binary_and_json_give_the_same_right_answer(port, tiny_repository, reference):
    images = tiny_repository.images(3, seed=11)
    binary = infer(port, tiny_repository.members[0], images)
    assert binary.status == 200 and binary.headers["content-type"] == "application/octet-stream"
    assert int(binary.headers[HEADER_LENGTH.lower()]) < len(binary.body)
    np.testing.assert_allclose(binary.output(), reference(images), rtol=1e-5, atol=1e-6)
    as_json = infer(port, tiny_repository.members[0], images, binary=False)
    assert as_json.status == 200 and as_json.headers["content-type"] == "application/json"
    np.testing.assert_allclose(as_json.output(), binary.output(), rtol=1e-6)
    nested = call(port, "POST", f"/v2/models/{tiny_repository.members[0]}/infer", json_infer_body(images, nested=True))
    np.testing.assert_allclose(nested.output(), binary.output(), rtol=1e-6)


def test_infer_echoes_id_and_answers_classification(port, tiny_repository):
    images = tiny_repository.images(2, seed=3)
    outputs = [{"name": "probabilities", "parameters": {"classification": 2, "binary_data": False}}]
    body, headers = binary_infer_body(images, request_id="req-42", outputs=outputs)
    answer = call(port, "POST", f"/v2/models/{tiny_repository.ensemble}/versions/1/infer", body, headers)
    header = answer.json()
    assert header["id"] == "req-42" and header["model_version"] == "1"
    (tensor,) = header["outputs"]
    assert tensor["datatype"] == "BYTES" and tensor["shape"] == [2, 2]
    scores = infer(port, tiny_repository.ensemble, images).output()
    for row, text in zip(scores, np.array(tensor["data"]).reshape(2, 2)):
        best = np.argsort(-row)[:2]
        assert list(text) == [f"{row[i]:f}:{i}:{tiny_repository.class_names[i]}" for i in best]


def test_statistics_and_repository_index(port, tiny_repository):
    member = tiny_repository.members[0]
    infer(port, member, tiny_repository.images(1))
    (stats,) = call(port, "GET", f"/v2/models/{member}/stats").json()["model_stats"]
    assert stats["name"] == member and isinstance(stats["inference_count"], int) and stats["inference_count"] >= 1
    everything = call(port, "GET", "/v2/models/stats").json()["model_stats"]
    assert {entry["name"] for entry in everything} >= {member, tiny_repository.ensemble}
    index = call(port, "POST", "/v2/repository/index", b'{"ready": true}').json()
    assert {(entry["name"], entry["state"]) for entry in index} >= {(member, "READY"), (tiny_repository.ensemble, "READY")}


def test_gzip_request_and_response(port, tiny_repository, reference):
    images = tiny_repository.images(16, seed=8)  # an answer large enough to be worth compressing
    body = gzip.compress(json_infer_body(images))
    answer = call(port, "POST", f"/v2/models/{tiny_repository.members[0]}/infer", body,
                  {"Content-Encoding": "gzip", "Accept-Encoding": "gzip"})
    assert answer.status == 200 and answer.headers["content-encoding"] == "gzip"
    data = json.loads(gzip.decompress(answer.body))["outputs"][0]["data"]
    np.testing.assert_allclose(np.reshape(data, (16, -1)), reference(images), rtol=1e-5, atol=1e-6)


def test_requests_are_counted_by_protocol(server, port, tiny_repository):
    member = tiny_repository.members[0]
    labels = {"model": member, "outcome": "success"}
    before = scrape(server)
    infer(port, member, tiny_repository.images(1))
    server.stub().ModelInfer(infer_request(member, tiny_repository.images(1)))
    after = scrape(server)
    for protocol in ("http", "grpc"):
        name = "ensemble_server_requests_total"
        assert metric(after, name, protocol=protocol, **labels) - metric(before, name, protocol=protocol, **labels) == 1


# -- bad input -----------------------------------------------------------------------------------
def _bad_cases(tiny_repository):
    member = tiny_repository.members[0]
    h, w, c = tiny_repository.image_shape
    images = tiny_repository.images(1)
    good, good_headers = binary_infer_body(images)
    header_length = int(good_headers[HEADER_LENGTH])
    infer_path = f"/v2/models/{member}/infer"

    def json_input(**changes) -> bytes:
        tensor = {"name": "images", "datatype": "UINT8", "shape": [1, h, w, c], "data": [0] * (h * w * c)}
        return json.dumps({"inputs": [{**tensor, **changes}]}).encode()

    return [
        # (what, method, path, body, headers, status, message part)
        ("malformed JSON", "POST", infer_path, b'{"inputs": [', {}, 400, "not valid JSON"),
        ("JSON that is not an object", "POST", infer_path, b"[1, 2]", {}, 400, "must be a JSON object"),
        ("no inputs", "POST", infer_path, b"{}", {}, 400, "needs 'inputs'"),
        ("missing body", "POST", infer_path, b"", {}, 400, "not valid JSON"),
        ("data count against shape", "POST", infer_path, json_input(data=[1, 2, 3]), {}, 400,
         f"has 3 values in 'data'; shape [1, {h}, {w}, {c}] needs {h * w * c}"),
        ("strings for UINT8", "POST", infer_path, json_input(data=["x"] * (h * w * c)), {}, 400, "must be numbers"),
        # NaN parses, as in Triton (rapidjson's NaN-and-Inf flag), but is no UINT8 value.
        ("NaN for an integer input", "POST", infer_path,
         json_input(data=[float("nan")] * (h * w * c)), {}, 400, "input 'images' is UINT8: its data must be integers"),
        ("Infinity too large", "POST", infer_path, json_input(data=[1] * (h * w * c - 1) + ["__big__"]).replace(
            b'"__big__"', b"1e999"), {}, 400, "not valid JSON"),
        ("out of range", "POST", infer_path, json_input(data=[300] * (h * w * c)), {}, 400, "outside the UINT8 range"),
        ("wrong datatype", "POST", infer_path, json_input(datatype="FP32"), {}, 400,
         f"datatype FP32; model {member!r} expects UINT8"),
        ("wrong shape", "POST", infer_path, json_input(shape=[h * w * c]), {}, 400,
         f"unexpected shape for input 'images' for model {member!r}. Expected [-1, {h}, {w}, {c}], got [{h * w * c}]"),
        ("binary shorter than declared", "POST", infer_path, good[:-5], good_headers, 400, "runs past"),
        ("binary longer than declared", "POST", infer_path, good + b"xx", good_headers, 400, "add up to"),
        ("header length past the body", "POST", infer_path, good, {HEADER_LENGTH: str(len(good) + 1)}, 400,
         f"{HEADER_LENGTH.lower()} is {len(good) + 1}"),
        ("header length not a number", "POST", infer_path, good, {HEADER_LENGTH: "ten"}, 400, "must be a byte count"),
        ("header length cutting the JSON", "POST", infer_path, good, {HEADER_LENGTH: str(header_length - 3)}, 400,
         "not valid JSON"),
        ("unknown model", "POST", "/v2/models/no-such-model/infer", good, good_headers, 404,
         "Request for unknown model: 'no-such-model' is not found (models served: "),
        ("unknown version", "POST", f"/v2/models/{member}/versions/7/infer", good, good_headers, 404,
         f"Request for unknown model: {member!r} version 7 is not found (versions served: 1)"),
        ("unknown model metadata", "GET", "/v2/models/no-such-model", None, {}, 404,
         "Request for unknown model: 'no-such-model' is not found"),
        ("body over --max-message-size", "POST", infer_path, b"{}", {"Content-Length": str(1 << 40)}, 413,
         "larger than --max-message-size"),
        ("unsupported Content-Encoding", "POST", infer_path, good, {**good_headers, "Content-Encoding": "br"}, 415,
         "Content-Encoding 'br' is not supported"),
        ("corrupt gzip", "POST", infer_path, b"not gzip", {"Content-Encoding": "gzip"}, 400, "not valid gzip data"),
        ("unknown endpoint", "GET", "/v2/nothing", None, {}, 404, "no endpoint /v2/nothing"),
        ("wrong method", "GET", infer_path, None, {}, 405, "GET is not allowed"),
    ]


def test_every_bad_input_gets_its_status_and_message(port, tiny_repository, reference):
    failures = []
    for what, method, path, body, headers, status, message in _bad_cases(tiny_repository):
        answer = call(port, method, path, body, headers)
        error = answer.json().get("error", "") if answer.body else ""
        if answer.status != status or message not in error:
            failures.append(f"{what}: {answer.status} {error!r}; expected {status} with {message!r}")
    assert not failures, "\n".join(failures)
    images = tiny_repository.images(2, seed=1)  # and it still serves, correctly
    np.testing.assert_allclose(infer(port, tiny_repository.members[0], images).output(), reference(images),
                               rtol=1e-5, atol=1e-6)


def _raw_request(port: int, path: str, body: bytes, declared_length: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {declared_length}\r\n\r\n".encode() + body)
    return sock


def test_slow_and_half_closed_clients_do_not_block_others(port, tiny_repository, reference):
    path = f"/v2/models/{tiny_repository.members[0]}/infer"
    body, _ = binary_infer_body(tiny_repository.images(1))
    # A client that sends half its body and then waits...
    slow = _raw_request(port, path, body[:10], declared_length=len(body))
    # ...one that sends half and closes its side (a wrong, too-large Content-Length)...
    half_closed = _raw_request(port, path, body[:10], declared_length=len(body))
    half_closed.shutdown(socket.SHUT_WR)
    # ...and the others are served meanwhile.
    images = tiny_repository.images(2, seed=4)
    np.testing.assert_allclose(infer(port, tiny_repository.members[0], images).output(), reference(images),
                               rtol=1e-5, atol=1e-6)
    assert half_closed.recv(1024) == b""  # closed by the server, without an answer or a traceback
    slow.close()
    half_closed.close()
    assert call(port, "GET", "/v2/health/ready").status == 200


def _send_part_then_stall(app: HttpApp, first_chunk: bytes, wait_s: float = 10.0) -> dict:
    """Run one infer request through `app` whose body stops after `first_chunk`; the answer
    it sent ({"status": ..., "body": ...}). TimeoutError if it sent none within `wait_s`."""
    scope = {"type": "http", "method": "POST", "path": "/v2/models/m/infer", "headers": [(b"content-length", b"100")]}
    answer: dict = {}
    chunks = [{"type": "http.request", "body": first_chunk, "more_body": True}]

    async def receive():
        if chunks:
            return chunks.pop()
        await asyncio.Event().wait()  # the rest never comes

    async def send(message):
        answer.update({key: message[key] for key in ("status", "body") if key in message})

    async def run():
        await asyncio.wait_for(app(scope, receive, send), wait_s)

    asyncio.run(run())
    return answer


def test_a_body_that_stops_arriving_gets_408_and_no_other_cancellation_does():
    app = HttpApp(service=None, tokens=None, max_body_bytes=1 << 20, body_timeout_s=0.2)
    answer = _send_part_then_stall(app, b"{")
    assert answer["status"] == 408 and "did not arrive within 0.2 s" in json.loads(answer["body"])["error"]
    # A cancellation from elsewhere (a client that went away, shutdown) is not a 408.
    patient = HttpApp(service=None, tokens=None, max_body_bytes=1 << 20, body_timeout_s=60)
    with pytest.raises(asyncio.TimeoutError):
        _send_part_then_stall(patient, b"{", wait_s=0.2)


# -- sharing batches with gRPC, draining -----------------------------------------------------------
def test_http_and_grpc_requests_share_one_execution(start_server, tiny_repository):
    # A long queue delay, so that both requests surely wait for each other.
    server = start_server(tiny_repository, "--max-queue-delay-us", "1500000")
    member = tiny_repository.members[0]
    stats_request = pb.ModelStatisticsRequest(name=member)
    before = server.stub().ModelStatistics(stats_request).model_stats[0]
    answers = {}
    http_thread = threading.Thread(target=lambda: answers.update(http=infer(server.http_port, member,
                                                                            tiny_repository.images(1, seed=1))))
    http_thread.start()
    answers["grpc"] = server.stub().ModelInfer(infer_request(member, tiny_repository.images(2, seed=2)), timeout=30)
    http_thread.join(30)
    after = server.stub().ModelStatistics(stats_request).model_stats[0]
    assert after.inference_count - before.inference_count == 3
    assert after.execution_count - before.execution_count == 1
    assert answers["http"].output().shape == (1, len(tiny_repository.class_names))
    assert probabilities(answers["grpc"]).shape == (2, len(tiny_repository.class_names))


def test_sigterm_drains_http_requests_then_exits_zero(start_server, tiny_repository):
    server = start_server(tiny_repository, "--max-queue-delay-us", "1500000", "--log-level", "debug",
                          env={"ENSEMBLE_SERVER_GRACE_PERIOD": "20"})
    member = tiny_repository.members[0]
    answers: list = []
    in_flight = [threading.Thread(target=lambda s=s: answers.append(infer(server.http_port, member,
                                                                          tiny_repository.images(1, seed=s))))
                 for s in range(3)]
    for thread in in_flight:
        thread.start()
    time.sleep(0.3)
    server.send_signal(signal.SIGTERM)

    deadline = time.monotonic() + 5
    while call(server.http_port, "GET", "/v2/health/ready").status == 200:
        assert time.monotonic() < deadline, "still ready 5 s after SIGTERM"
        time.sleep(0.02)
    refused = infer(server.http_port, member, tiny_repository.images(1))
    assert refused.status == 503 and "shutting down" in refused.error

    for thread in in_flight:
        thread.join(30)
    assert [answer.status for answer in answers] == [200, 200, 200]
    assert server.process.wait(timeout=30) == 0
    log = server.log()
    assert "all in-flight requests finished" in log
    # the access log, at debug level: client, method, path, status
    assert f"POST /v2/models/{member}/infer -> 200" in log and f"POST /v2/models/{member}/infer -> 503" in log
