"""Triton's wording at the start of our errors, where clients match on it: an unknown
model or version ("Request for unknown model: ..."), a model that fails to load
("failed to load '...'"), and a load whose files cannot be laid out ("failed to poll
from model repository", INTERNAL as in Triton). Our own detail follows Triton's words.

Checked over raw gRPC and HTTP, and through tritonclient (grpc and http), the way
Triton's own client examples check them: `message().startswith(...)` or `in message()`.
"""

from __future__ import annotations

import base64
import importlib.util

import grpc
import pytest
from onnx import TensorProto

from ensemble_serving.protocol import grpc_service_pb2 as pb
from tests.support.graphs import add_graph, triton_calls, write_model
from tests.support.http import call

UNKNOWN = "Request for unknown model: 'wrong_model_name' is not found"
SIMPLE_INPUTS = [{"name": name, "datatype": "INT32", "shape": [1, 16], "data": list(range(16))}
                 for name in ("INPUT0", "INPUT1")]  # fmt: skip
INTERNAL = {"grpc": "StatusCode.INTERNAL", "http": "500"}


@pytest.fixture(scope="module")
def message_server(start_server, tmp_path_factory):
    root = tmp_path_factory.mktemp("messages_repository")
    write_model(root, "simple", add_graph(["batch", 16], TensorProto.INT32))
    write_model(root, "spare", add_graph(["batch", 16], TensorProto.INT32))
    write_model(root, "wrong-type", add_graph(["batch", 16]), """
        platform: "onnxruntime_onnx" max_batch_size: 8
        input [ { name: "INPUT0" data_type: TYPE_INT8 dims: [ 16 ] }, { name: "INPUT1" data_type: TYPE_FP32 dims: [ 16 ] } ]
        output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 16 ] } ]""")
    return start_server(root, "--model-control-mode", "explicit", "--load-model", "simple")


def test_unknown_model_and_version_over_grpc(message_server):
    stub = message_server.stub()
    calls = [lambda: stub.ModelMetadata(pb.ModelMetadataRequest(name="wrong_model_name"), timeout=10),
             lambda: stub.ModelConfig(pb.ModelConfigRequest(name="wrong_model_name"), timeout=10),
             lambda: stub.ModelInfer(pb.ModelInferRequest(model_name="wrong_model_name"), timeout=10)]
    for make_call in calls:
        with pytest.raises(grpc.RpcError) as error:
            make_call()
        assert error.value.code() == grpc.StatusCode.NOT_FOUND  # ours: more exact than Triton's INVALID_ARGUMENT
        assert error.value.details().startswith(f"{UNKNOWN} (models served: simple")
    with pytest.raises(grpc.RpcError) as error:
        stub.ModelMetadata(pb.ModelMetadataRequest(name="simple", version="3"), timeout=10)
    assert error.value.details() == "Request for unknown model: 'simple' version 3 is not found (versions served: 1)"


def test_unknown_model_and_version_over_http(message_server):
    port = message_server.http_port
    for method, path in (("GET", "/v2/models/wrong_model_name"), ("GET", "/v2/models/wrong_model_name/config"),
                         ("POST", "/v2/models/wrong_model_name/infer")):
        body = b'{"inputs": [{"name": "INPUT0", "datatype": "INT32", "shape": [1], "data": [1]}]}'
        answer = call(port, method, path, body if method == "POST" else None)
        assert answer.status == 404 and answer.error.startswith(f"{UNKNOWN} (models served: simple"), answer.body
    answer = call(port, "GET", "/v2/models/simple/versions/3")
    assert answer.status == 404 and answer.error.startswith("Request for unknown model: 'simple' version 3 is not found")


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_tritonclient_sees_triton_wording(message_server, protocol, tmp_path):
    if importlib.util.find_spec("tritonclient") is None:
        pytest.skip("tritonclient is not installed (the 'test' extra)")
    url = message_server.grpc_address if protocol == "grpc" else f"127.0.0.1:{message_server.http_port}"
    outputs = [{"name": "OUTPUT0"}]
    answers = triton_calls(protocol, url, [
        {"call": "infer", "model": "wrong_model_name", "inputs": SIMPLE_INPUTS, "outputs": outputs},
        {"call": "get_model_metadata", "model": "wrong_model_name"},
        {"call": "infer", "model": "simple", "version": "7", "inputs": SIMPLE_INPUTS, "outputs": outputs},
        {"call": "load_model", "model": "wrong_model_name"},
        {"call": "load_model", "model": "simple", "config": '"parameters": {"config": {{"max_batch_size": "16"}}}'},
        {"call": "load_model", "model": "simple", "config": "{}",
         "files": {"file:" + "A" * 256: base64.b64encode(b"a").decode()}},
        {"call": "load_model", "model": "wrong-type"},
        {"call": "infer", "model": "wrong-type", "inputs": SIMPLE_INPUTS, "outputs": outputs},
        {"call": "is_server_live"},
        {"call": "infer", "model": "simple", "inputs": SIMPLE_INPUTS, "outputs": outputs},
    ], tmp_path)  # fmt: skip
    messages = [answer.get("error", {}).get("message", "") for answer in answers]
    assert messages[0].startswith(UNKNOWN) and "(models served: simple" in messages[0]
    assert messages[1].startswith(UNKNOWN)
    assert messages[2].startswith("Request for unknown model: 'simple' version 7 is not found")
    assert messages[3].startswith("failed to load 'wrong_model_name'") and "no such model" in messages[3]
    assert messages[4].startswith("failed to load 'simple'") and "not a ModelConfig in JSON" in messages[4]
    assert answers[5]["error"]["status"] == INTERNAL[protocol]
    assert messages[5].startswith("failed to load 'simple', failed to poll from model repository")
    assert "File name too long" in messages[5]
    assert messages[6].startswith("failed to load 'wrong-type'")
    assert "input 'INPUT0' is INT8 in config.pbtxt but FP32 in the ONNX graph" in messages[6]
    # Triton's words for a model it knows but cannot serve; the load's reason after them.
    assert messages[7].startswith("Request for unknown model: 'wrong-type' has no available versions (")
    assert "input 'INPUT0' is INT8 in config.pbtxt" in messages[7]
    assert answers[8] == {"value": True}
    assert answers[9]["value"]["OUTPUT0"] == [[2 * value for value in range(16)]]  # still serving


def test_an_unloaded_model_has_no_available_versions(message_server):
    stub = message_server.stub()
    stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="spare"), timeout=60)
    assert stub.ModelReady(pb.ModelReadyRequest(name="spare"), timeout=10).ready
    stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name="spare"), timeout=60)
    with pytest.raises(grpc.RpcError) as error:
        stub.ModelMetadata(pb.ModelMetadataRequest(name="spare"), timeout=10)
    assert error.value.code() == grpc.StatusCode.NOT_FOUND
    assert error.value.details() == "Request for unknown model: 'spare' has no available versions (unloaded)"
    stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="spare"), timeout=60)  # and back
    assert stub.ModelMetadata(pb.ModelMetadataRequest(name="spare"), timeout=10).name == "spare"
