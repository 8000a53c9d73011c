"""Property-based fuzzing of the HTTP/REST infer endpoint against the real server subprocess.

The requests are those of the gRPC fuzz test (tests/test_fuzz.py: random ones, valid ones
mutated, BYTES ones and ones in system shared memory), written as KServe v2 REST bodies (raw contents as Triton's binary
extension, typed contents as JSON `data`), and then damaged the way only HTTP can be: a
cut body, a flipped byte in the JSON header, a wrong Inference-Header-Content-Length, an
unknown Content-Encoding. Properties:

- every answer is 200 or one of 400, 404, 413, 415 with a JSON {"error": message}; never a
  500, a traceback or a dropped connection;
- an undamaged request answered 200 gets the right numbers (onnxruntime in this process);
- after each fuzzed request a valid one still gets the right answer; the server survives.

FUZZ_EXAMPLES (default 100) sets the number of requests: three times that many here.
"""

from __future__ import annotations

import collections
import json
import time
import urllib.parse

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ensemble_serving.protocol import grpc_service_pb2 as pb
from ensemble_serving.tensors import serialize_bytes
from tests.support.http import HEADER_LENGTH, call, infer
from tests.test_fuzz import (  # noqa: F401 (fuzz_server and fuzz_region are fixtures)
    BYTES_MODEL,
    DERANDOMIZE,
    EXAMPLES,
    REGION_SIZE,
    Reference,
    check_outputs,
    fuzz_region,
    fuzz_server,
    mutated_requests,
    random_requests,
    shm_requests,
)

ALLOWED = {200, 400, 404, 413, 415}
DAMAGE = ("none", "none", "cut_body", "flip_header_byte", "wrong_header_length", "no_header_length",
          "content_encoding")  # fmt: skip


def _parameter(value: pb.InferParameter):
    choice = value.WhichOneof("parameter_choice")
    return None if choice is None else getattr(value, choice)


def _contents(tensor) -> list:
    fields = tensor.contents.ListFields()
    if not fields:
        return []
    values = list(fields[0][1])
    if fields[0][0].name == "bytes_contents":
        # JSON carries text: what is not UTF-8 goes as latin-1, and the request is made to
        # say what was sent (its UTF-8), so that the answer is checked against that.
        text = [_text(v) for v in values]
        tensor.contents.bytes_contents[:] = [item.encode("utf-8") for item in text]
        return text
    return [v.decode("latin-1") if isinstance(v, bytes) else v for v in values]


def _text(value: bytes) -> str:
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        return value.decode("latin-1")


def http_body(request: pb.ModelInferRequest) -> tuple[str, bytes, dict]:
    """(path, body, headers) of the REST request that says what `request` says."""
    header: dict = {"id": request.id} if request.id else {}
    header["parameters"] = {key: _parameter(value) for key, value in request.parameters.items()}
    header["inputs"], blobs = [], []
    raw = iter(request.raw_input_contents)  # they pair with the inputs not in shared memory, as on gRPC
    for tensor in request.inputs:
        entry = {"name": tensor.name, "datatype": tensor.datatype, "shape": list(tensor.shape)}
        parameters = {key: _parameter(value) for key, value in tensor.parameters.items()}
        data = None if "shared_memory_region" in parameters else next(raw, None)
        if data is not None:
            parameters["binary_data_size"] = len(data)
            blobs.append(data)
        elif "shared_memory_region" not in parameters:
            entry["data"] = _contents(tensor)
        if parameters:
            entry["parameters"] = parameters
        header["inputs"].append(entry)
    header["outputs"] = [{"name": output.name,
                          "parameters": {key: _parameter(value) for key, value in output.parameters.items()}}
                         for output in request.outputs]  # fmt: skip
    text = json.dumps(header).encode()
    path = f"/v2/models/{urllib.parse.quote(request.model_name, safe='')}"
    if request.model_version:
        path += f"/versions/{urllib.parse.quote(request.model_version, safe='')}"
    headers = {HEADER_LENGTH: str(len(text))} if blobs else {}
    return path + "/infer", b"".join([text, *blobs]), headers


def damage(draw, body: bytes, headers: dict, kind: str) -> tuple[bytes, dict]:
    length = int(headers.get(HEADER_LENGTH, len(body)))
    if kind == "cut_body" and body:
        body = body[: draw(st.integers(0, len(body) - 1))]
    elif kind == "flip_header_byte" and length:
        at = draw(st.integers(0, length - 1))
        body = body[:at] + bytes([body[at] ^ draw(st.integers(1, 255))]) + body[at + 1:]
    elif kind == "wrong_header_length":
        headers = {**headers, HEADER_LENGTH: str(draw(st.integers(-5, len(body) + 5)))}
    elif kind == "no_header_length":
        headers = {key: value for key, value in headers.items() if key != HEADER_LENGTH}
    elif kind == "content_encoding":
        headers = {**headers, "Content-Encoding": draw(st.sampled_from(["gzip", "deflate", "br", "zstd", "x"]))}
    return body, headers


def check_answer(request: pb.ModelInferRequest, answer, reference: Reference, region) -> None:
    """The outputs as (name, datatype, shape, raw), raw None for one in shared memory, checked
    as the gRPC test checks them."""
    outputs, offset = [], int(answer.headers.get(HEADER_LENGTH.lower(), len(answer.body)))
    for tensor in answer.json()["outputs"]:
        parameters = tensor.get("parameters", {})
        raw = None
        if "binary_data_size" in parameters:
            raw = answer.body[offset:offset + parameters["binary_data_size"]]
            offset += parameters["binary_data_size"]
        elif tensor["datatype"] == "BYTES" and "data" in tensor:
            raw = serialize_bytes([item.encode("utf-8") for item in tensor["data"]])
        elif "data" in tensor:
            raw = np.array(tensor["data"], dtype="<f4").tobytes()
        outputs.append((tensor["name"], tensor["datatype"], tensor["shape"], raw))
    check_outputs(request, outputs, reference, region)


def test_fuzz_http_infer(fuzz_server, fuzz_region, tiny_repository, capsys):
    reference = Reference(tiny_repository)
    port = fuzz_server.http_port
    models = [tiny_repository.ensemble, *tiny_repository.members, tiny_repository.average]
    statuses: collections.Counter = collections.Counter()
    crashes: list[str] = []
    probe_rng = np.random.default_rng(2)
    started = time.perf_counter()

    # Three times the gRPC test's count: an HTTP request costs this test a few milliseconds.
    @settings(max_examples=3 * EXAMPLES, deadline=None, database=None, derandomize=DERANDOMIZE,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])
    @given(request=st.one_of(random_requests([*models, BYTES_MODEL]), mutated_requests(tiny_repository),
                             mutated_requests(tiny_repository), shm_requests(tiny_repository)),
           kind=st.sampled_from(DAMAGE), data=st.data())
    def one_request(request, kind, data):
        path, body, headers = http_body(request)
        body, headers = damage(data.draw, body, headers, kind)
        reference.region = bytes(fuzz_region.buf[:REGION_SIZE])
        try:
            answer = call(port, "POST", path, body, headers, timeout=20)
        except OSError as error:
            crashes.append(f"{type(error).__name__}: {error} for {path}")
            raise
        statuses[answer.status] += 1
        message = answer.json().get("error", "") if answer.status != 200 else ""
        if answer.status not in ALLOWED or (answer.status != 200 and not message.strip()):
            crashes.append(f"{answer.status}: {answer.body[:200]!r} for {path} ({kind})")
        assert answer.status in ALLOWED, f"{answer.status}: {answer.body[:300]!r}"
        if answer.status == 200 and kind == "none" and request.inputs:
            check_answer(request, answer, reference, fuzz_region.buf)
        model = models[sum(statuses.values()) % 3]
        images = probe_rng.integers(0, 256, (int(probe_rng.integers(1, 5)), *tiny_repository.image_shape), dtype=np.uint8)
        valid = infer(port, model, images)
        assert valid.status == 200, f"valid request after a fuzzed one: {valid.status}: {valid.body[:300]!r}"
        np.testing.assert_allclose(valid.output(), reference.images_model(model, images), rtol=1e-5, atol=1e-6)

    one_request()
    elapsed = time.perf_counter() - started
    assert fuzz_server.process.poll() is None, "the server exited during fuzzing"
    with capsys.disabled():
        print(f"\nHTTP fuzz: {sum(statuses.values())} requests in {elapsed:.1f} s; statuses "
              + ", ".join(f"{status} {count}" for status, count in statuses.most_common())
              + f"; crashes {len(crashes)}; server alive")
    assert not crashes
    assert statuses[200] > 0 and statuses[400] > 0
