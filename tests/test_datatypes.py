"""Every tensor datatype the server serves, over every way a tensor travels: one identity
model and one two-step ensemble per datatype (tests/support/datatype_models.py), on one
server, with dynamic batching on.

  gRPC   raw_input_contents, and typed contents (InferTensorContents) where the datatype
         has a field; FP16 and BF16 travel raw only, as in Triton
  HTTP   JSON `data` and Triton's binary extension, in and out
  both   concurrent requests concatenated into one execution, for every datatype
  tritonclient.grpc and .http, unmodified, in a subprocess (tests/tritonclient_scripts/datatypes.py)

BYTES elements carry NULs and non-ASCII UTF-8 (onnxruntime's string tensors keep them);
elements that are not UTF-8 are refused with a message naming the element.
"""

from __future__ import annotations

import base64
import importlib.util
import json
import subprocess
import sys
import threading
from pathlib import Path

import grpc
import numpy as np
import pytest

from ensemble_serving.protocol import grpc_service_pb2 as pb
from ensemble_serving.tensors import CONTENTS_FIELD, bf16_to_float32, deserialize_bytes, serialize_bytes
from tests.support import datatype_models as models
from tests.support.http import HEADER_LENGTH, call

SCRIPTS = Path(__file__).parent / "tritonclient_scripts"
DATATYPES = models.DATATYPES
MODELS = [(datatype, name) for datatype in DATATYPES
          for name in (models.identity_name(datatype), models.ensemble_name(datatype))]  # fmt: skip


@pytest.fixture(scope="module")
def repository(tmp_path_factory):
    return models.write_repository(tmp_path_factory.mktemp("datatypes"))


@pytest.fixture(scope="module")
def datatype_server(start_server, repository):
    return start_server(repository)


@pytest.fixture(scope="module")
def batching_stub(start_server, repository):
    """The same models with Triton's queue-delay rule and a long delay: a batch waits for 8
    elements or 200 ms, however few requests came before (the adaptive rule would stop
    waiting once it has as many as it recently held, which depends on the earlier tests)."""
    return start_server(repository, "--queue-delay", "triton", "--max-queue-delay-us", "200000").stub()


@pytest.fixture(scope="module")
def stub(datatype_server):
    return datatype_server.stub()


def raw_bytes(datatype: str, array: np.ndarray) -> bytes:
    return serialize_bytes(list(array.flat)) if datatype == "BYTES" else np.ascontiguousarray(array).tobytes()


def grpc_request(model: str, datatype: str, array: np.ndarray, typed: bool = False) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model)
    tensor = request.inputs.add(name="INPUT0", datatype=datatype, shape=list(array.shape))
    if typed:
        getattr(tensor.contents, CONTENTS_FIELD[datatype]).extend(array.reshape(-1).tolist())
    else:
        request.raw_input_contents.append(raw_bytes(datatype, array))
    return request


def assert_same(datatype: str, raw: bytes, expected: np.ndarray) -> None:
    if datatype == "BYTES":
        assert deserialize_bytes(raw) == list(expected.flat)
    else:
        assert raw == np.ascontiguousarray(expected).tobytes()


@pytest.mark.parametrize(("datatype", "model"), MODELS)
def test_grpc_raw_contents_come_back_unchanged(stub, datatype, model):
    array = models.samples(datatype, seed=len(model))
    response = stub.ModelInfer(grpc_request(model, datatype, array))
    (output,) = response.outputs
    assert (output.name, output.datatype, list(output.shape)) == ("OUTPUT0", datatype, [3, 2])
    assert_same(datatype, response.raw_output_contents[0], array)


@pytest.mark.parametrize("datatype", [datatype for datatype in DATATYPES if datatype in CONTENTS_FIELD])
def test_grpc_typed_contents_every_field(stub, datatype):
    array = models.samples(datatype, seed=1)
    response = stub.ModelInfer(grpc_request(models.identity_name(datatype), datatype, array, typed=True))
    assert_same(datatype, response.raw_output_contents[0], array)


@pytest.mark.parametrize("datatype", ["FP16", "BF16"])
def test_half_floats_travel_raw_only(stub, datatype):
    request = grpc_request(models.identity_name(datatype), datatype, models.samples(datatype))
    request.raw_input_contents.pop()
    request.inputs[0].contents.fp32_contents.extend([1.0] * 6)
    with pytest.raises(grpc.RpcError) as error:
        stub.ModelInfer(request)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"is {datatype}, which travels only in raw_input_contents" in error.value.details()


def _json_values(datatype: str, array: np.ndarray) -> list:
    if datatype == "BYTES":
        return [item.decode("utf-8") for item in array.flat]
    if datatype == "BF16":
        return bf16_to_float32(array).reshape(-1).tolist()
    return array.reshape(-1).tolist()


def http_infer(server, model: str, datatype: str, array: np.ndarray, binary_in: bool, binary_out: bool):
    tensor = {"name": "INPUT0", "datatype": datatype, "shape": list(array.shape)}
    blob = b""
    if binary_in:
        blob = raw_bytes(datatype, array)
        tensor["parameters"] = {"binary_data_size": len(blob)}
    else:
        tensor["data"] = _json_values(datatype, array)
    header = json.dumps({"inputs": [tensor], "parameters": {"binary_data_output": binary_out}}).encode()
    headers = {HEADER_LENGTH: str(len(header))} if binary_in else {}
    return call(server.http_port, "POST", f"/v2/models/{model}/infer", header + blob, headers)


@pytest.mark.parametrize(("datatype", "model"), MODELS)
@pytest.mark.parametrize(("binary_in", "binary_out"), [(True, True), (False, False), (True, False)],
                         ids=["binary", "json", "binary-in-json-out"])  # fmt: skip
def test_http_json_and_binary(datatype_server, datatype, model, binary_in, binary_out):
    array = models.samples(datatype, seed=2)
    answer = http_infer(datatype_server, model, datatype, array, binary_in, binary_out)
    assert answer.status == 200, answer.body[:500]
    (output,) = answer.json()["outputs"]
    assert (output["datatype"], output["shape"]) == (datatype, [3, 2])
    if binary_out:
        offset = int(answer.headers[HEADER_LENGTH.lower()])
        assert_same(datatype, answer.body[offset:offset + output["parameters"]["binary_data_size"]], array)
    else:
        assert output["data"] == _json_values(datatype, array)


@pytest.mark.parametrize("datatype", DATATYPES)
def test_concurrent_requests_are_batched_for_every_datatype(batching_stub, datatype):
    """Six concurrent requests (9 elements) within the 200 ms queue delay: fewer executions
    than requests, and every request gets its own rows back."""
    stub = batching_stub
    model = models.identity_name(datatype)
    before = stub.ModelStatistics(pb.ModelStatisticsRequest(name=model)).model_stats[0]
    arrays = [models.samples(datatype, batch=1 + index % 2, seed=index) for index in range(6)]
    answers: dict[int, bytes] = {}
    start = threading.Barrier(len(arrays))

    def send(index: int) -> None:
        start.wait()
        answers[index] = stub.ModelInfer(grpc_request(model, datatype, arrays[index])).raw_output_contents[0]

    threads = [threading.Thread(target=send, args=(index,)) for index in range(len(arrays))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    for index, array in enumerate(arrays):
        assert_same(datatype, answers[index], array)
    after = stub.ModelStatistics(pb.ModelStatisticsRequest(name=model)).model_stats[0]
    assert after.inference_count - before.inference_count == sum(len(array) for array in arrays)
    assert after.execution_count - before.execution_count < len(arrays)


def test_bytes_that_are_not_utf8_are_refused_by_element(stub):
    array = np.array([[b"ok", b"\x00fine"], [b"bad \xff", b""]], dtype=object)
    with pytest.raises(grpc.RpcError) as error:
        stub.ModelInfer(grpc_request(models.identity_name("BYTES"), "BYTES", array))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "input 'INPUT0': BYTES element 2 is not UTF-8" in error.value.details()
    assert "at byte 4" in error.value.details()
    array = models.samples("BYTES")
    assert_same("BYTES", stub.ModelInfer(grpc_request(models.identity_name("BYTES"), "BYTES", array))
                .raw_output_contents[0], array)  # fmt: skip


def test_a_model_that_parses_its_strings_loads_without_a_warmup_entry(stub):
    array = np.array([[b"7", b"-12"], [b"0", b"40000"]], dtype=object)
    response = stub.ModelInfer(grpc_request(models.PARSE_NUMBERS, "BYTES", array))
    assert response.outputs[0].datatype == "INT32"
    assert np.frombuffer(response.raw_output_contents[0], "<i4").tolist() == [7, -12, 0, 40000]


@pytest.mark.parametrize(("raw", "message"), [
    (b"\x05\x00\x00\x00abc", "claims 5 bytes; only 3 remain"),
    (serialize_bytes([b"a"] * 5), "has 5 BYTES elements; shape [3, 2] needs 6"),
])  # fmt: skip
def test_bytes_raw_contents_must_add_up(stub, raw, message):
    request = pb.ModelInferRequest(model_name=models.identity_name("BYTES"))
    request.inputs.add(name="INPUT0", datatype="BYTES", shape=[3, 2])
    request.raw_input_contents.append(raw)
    with pytest.raises(grpc.RpcError) as error:
        stub.ModelInfer(request)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in error.value.details()


def test_model_metadata_names_every_datatype(stub):
    for datatype in DATATYPES:
        metadata = stub.ModelMetadata(pb.ModelMetadataRequest(name=models.identity_name(datatype)))
        assert [(t.datatype, list(t.shape)) for t in metadata.inputs] == [(datatype, [-1, 2])]


# -- tritonclient ------------------------------------------------------------------------------
def _encoded(datatype: str, array: np.ndarray) -> dict:
    """A sample as the tritonclient script reads it (it must not import our modules)."""
    if datatype == "BYTES":
        return {"bytes": [base64.b64encode(item).decode() for item in array.flat], "shape": list(array.shape)}
    values = bf16_to_float32(array) if datatype == "BF16" else array
    return {"raw": base64.b64encode(values.tobytes()).decode(), "dtype": values.dtype.str, "shape": list(array.shape)}


@pytest.fixture(scope="module")
def tritonclient_report(datatype_server, tmp_path_factory):
    if importlib.util.find_spec("tritonclient") is None:
        pytest.skip("tritonclient is not installed (the 'test' extra)")
    cases = {datatype: _encoded(datatype, models.samples(datatype, seed=3)) for datatype in DATATYPES}
    path = tmp_path_factory.mktemp("tritonclient_datatypes") / "cases.json"
    path.write_text(json.dumps({"cases": cases, "models": {d: models.identity_name(d) for d in DATATYPES}}))
    result = subprocess.run([sys.executable, str(SCRIPTS / "datatypes.py"), "--grpc", datatype_server.grpc_address,
                             "--http", f"127.0.0.1:{datatype_server.http_port}", "--cases", str(path)],
                            capture_output=True, text=True, timeout=180)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return cases, json.loads(result.stdout)


@pytest.mark.parametrize("way", ["grpc", "http-binary", "http-json"])
@pytest.mark.parametrize("datatype", DATATYPES)
def test_tritonclient_round_trips_every_datatype(tritonclient_report, datatype, way):
    cases, report = tritonclient_report
    answer = report[way][datatype]
    if way == "http-json" and datatype == "BF16":
        # tritonclient.http refuses to put BF16 in JSON itself: the case is not sendable
        assert "binary" in answer["error"].lower(), answer
        return
    assert "error" not in answer, answer
    assert answer["datatype"] == datatype and answer["shape"] == [3, 2]
    assert answer["value"] == cases[datatype], f"{way} {datatype}"


@pytest.mark.parametrize("datatype", ["FP16", "BF16", "FP64", "INT32"])
def test_classification_ranks_the_values_of_every_numeric_datatype(stub, datatype):
    values = np.array([[1.5, -2.0], [0.25, 3.0]], np.float32)
    array = models.samples(datatype)[:2].copy()
    array[:] = (values.view(np.uint32) >> 16).astype("<u2") if datatype == "BF16" else values.astype(array.dtype)
    request = grpc_request(models.identity_name(datatype), datatype, array)
    request.outputs.add(name="OUTPUT0").parameters["classification"].int64_param = 1
    response = stub.ModelInfer(request)
    best = [item.decode().split(":")[1] for item in deserialize_bytes(response.raw_output_contents[0])]
    assert best == ["0", "1"]  # row 0: 1.5 beats -2; row 1: 3 beats 0.25
