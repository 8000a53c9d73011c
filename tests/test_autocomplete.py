"""Config auto-complete (server/models/autocomplete.py): what a model folder's config
leaves out is filled from its ONNX graph, as Triton's onnxruntime backend does.

Unit tests read real model folders with `read_model` (and load real onnxruntime sessions
where the graph must be checked); the server tests serve a repository of config-less,
partial and contradicting models and read the completed configs back over gRPC, HTTP
and tritonclient.
"""

from __future__ import annotations

import importlib.util

import grpc
import numpy as np
import pytest
from click.testing import CliRunner
from google.protobuf import json_format
from onnx import TensorProto

from ensemble_serving.model_config import datatype_name
from ensemble_serving.protocol import grpc_service_pb2 as pb
from server.config import ServerSettings, parse_backend_config
from server.models.autocomplete import AutoComplete
from server.models.repository import RepositoryError, read_model
from server.models.runtime import OnnxModel, SessionSettings
from tests.support.graphs import add_graph, identity_graph, model_file_b64, triton_calls, write_model
from tests.support.http import call
from tests.support.requests import infer_request

BACKEND_ONLY = 'backend: "onnxruntime"\n'
FULL_CONFIG = """
name: "{name}"
platform: "onnxruntime_onnx"
max_batch_size: 8
input [ {{ name: "{first}" data_type: {datatype} dims: [ {dims} ] }},
        {{ name: "INPUT1" data_type: TYPE_FP32 dims: [ 16 ] }} ]
output [ {{ name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 16 ] }} ]
"""


def full_config(name: str, first: str = "INPUT0", datatype: str = "TYPE_FP32", dims: str = "16") -> str:
    return FULL_CONFIG.format(name=name, first=first, datatype=datatype, dims=dims)


def tensors(specs) -> list[tuple[str, str, tuple[int, ...]]]:
    return [(spec.name, spec.datatype, spec.dims) for spec in specs]


# -- read_model: what is filled in ---------------------------------------------------------
def test_no_config_with_a_dynamic_first_dimension_batches_with_triton_defaults(tmp_path):
    spec = read_model(write_model(tmp_path, "simple", add_graph(["batch", 16])))
    config = spec.config
    assert (config.name, config.platform, config.backend) == ("simple", "onnxruntime_onnx", "onnxruntime")
    assert config.default_model_filename == "model.onnx"
    assert config.max_batch_size == 4  # Triton's default-max-batch-size
    assert config.HasField("dynamic_batching")  # turned on because max_batch_size > 1
    assert tensors(spec.inputs) == [("INPUT0", "FP32", (16,)), ("INPUT1", "FP32", (16,))]
    assert tensors(spec.outputs) == [("OUTPUT0", "FP32", (16,))]


def test_no_config_with_a_fixed_first_dimension_does_not_batch(tmp_path):
    spec = read_model(write_model(tmp_path, "fixed", add_graph([1, 16], TensorProto.INT32)))
    assert spec.config.max_batch_size == 0 and not spec.config.HasField("dynamic_batching")
    assert tensors(spec.inputs) == [("INPUT0", "INT32", (1, 16)), ("INPUT1", "INT32", (1, 16))]


def test_other_dynamic_dimensions_become_minus_one(tmp_path):
    spec = read_model(write_model(tmp_path, "ragged", identity_graph(["batch", "length", 3], TensorProto.FLOAT16)))
    assert spec.config.max_batch_size == 4
    assert tensors(spec.outputs) == [("OUTPUT0", "FP16", (-1, 3))]


def test_a_batching_scalar_gets_dims_one_and_an_empty_reshape_as_triton_writes_it(tmp_path):
    spec = read_model(write_model(tmp_path, "scalar", identity_graph(["batch"])))
    assert list(spec.config.input[0].dims) == [1] and spec.config.input[0].HasField("reshape")
    assert list(spec.config.input[0].reshape.shape) == []


def test_partial_config_keeps_its_max_batch_size_and_gets_the_tensors(tmp_path):
    folder = write_model(tmp_path, "partial", add_graph(["batch", 16]),
                         'name: "partial"\n' + BACKEND_ONLY + "max_batch_size: 8\n")
    spec = read_model(folder)
    assert spec.config.max_batch_size == 8 and spec.config.HasField("dynamic_batching")
    assert spec.config.platform == "onnxruntime_onnx"
    assert [tensor.name for tensor in spec.inputs] == ["INPUT0", "INPUT1"]


def test_a_config_that_chose_its_batching_keeps_it(tmp_path):
    folder = write_model(tmp_path, "tuned", add_graph(["batch", 16]),
                         BACKEND_ONLY + "max_batch_size: 8\ndynamic_batching { max_queue_delay_microseconds: 250 }\n")
    assert read_model(folder).config.dynamic_batching.max_queue_delay_microseconds == 250


def test_only_the_missing_side_is_filled(tmp_path):
    config = BACKEND_ONLY + 'max_batch_size: 2\ninput [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ 16 ] },' \
                            ' { name: "INPUT1" data_type: TYPE_FP32 dims: [ 16 ] } ]\n'
    spec = read_model(write_model(tmp_path, "inputs-only", add_graph(["batch", 16]), config))
    assert tensors(spec.outputs) == [("OUTPUT0", "FP32", (16,))]
    assert len(spec.config.input) == 2


def test_a_full_config_is_left_as_it_is(tmp_path):
    """Triton skips auto-complete when inputs and outputs are given: no dynamic batching added."""
    spec = read_model(write_model(tmp_path, "full", add_graph(["batch", 16]), full_config("full")))
    assert spec.config.max_batch_size == 8 and not spec.config.HasField("dynamic_batching")
    # Triton's server side still names the backend of an onnxruntime_onnx platform.
    assert (spec.config.backend, spec.config.default_model_filename) == ("onnxruntime", "model.onnx")


def test_default_max_batch_size_comes_from_backend_config(tmp_path):
    folder = write_model(tmp_path, "simple", add_graph(["batch", 16]))
    settings = ServerSettings(tmp_path, backend_config=("onnxruntime,default-max-batch-size=16",))
    assert read_model(folder, completion=AutoComplete.from_settings(settings)).config.max_batch_size == 16
    one = read_model(folder, completion=AutoComplete(True, 1)).config
    assert one.max_batch_size == 1 and not one.HasField("dynamic_batching")  # Triton: only above 1
    zero = read_model(folder, completion=AutoComplete(True, 0))
    assert zero.config.max_batch_size == 0 and tensors(zero.inputs)[0] == ("INPUT0", "FP32", (-1, 16))


def test_backend_config_is_parsed_as_triton_spells_it():
    assert parse_backend_config("onnxruntime,default-max-batch-size=8") == ("onnxruntime", "default-max-batch-size", "8")
    assert parse_backend_config("default-max-batch-size=2")[2] == "2"
    assert ServerSettings("repo").default_max_batch_size == 4
    for bad, words in [("tensorflow,default-max-batch-size=8", "onnxruntime backend only"),
                       ("onnxruntime,enable-global-threadpool=1", "'enable-global-threadpool' is not understood"),
                       ("default-max-batch-size=many", "whole number"), ("default-max-batch-size", "expected")]:
        with pytest.raises(ValueError, match=words):
            parse_backend_config(bad)


def test_flags_are_on_the_command_line(tmp_path):
    from server.process.cli import main

    runner = CliRunner()
    help_text = runner.invoke(main, ["--help"]).output
    assert "--disable-auto-complete-config" in help_text and "--backend-config" in help_text
    bad = runner.invoke(main, ["--model-repository", str(tmp_path), "--backend-config", "onnxruntime,x=1"])
    assert bad.exit_code == 2 and "setting 'x' is not understood" in bad.output


# -- read_model and the session: what fails, naming the tensor -----------------------------
def test_max_batch_size_on_a_graph_that_cannot_batch_fails_naming_the_tensor(tmp_path):
    folder = write_model(tmp_path, "fixed", add_graph([1, 16]), BACKEND_ONLY + "max_batch_size: 8\n")
    with pytest.raises(RepositoryError, match=r"model 'fixed': autofill failed: model does not support batching "
                                              r"while non-zero max_batch_size is specified .*'INPUT0' has a first "
                                              r"dimension of 1"):
        read_model(folder)


@pytest.mark.parametrize("name, config, words", [
    ("wrong-type", full_config("wrong-type", datatype="TYPE_INT32"), "input 'INPUT0' is INT32 in config.pbtxt but FP32"),
    ("wrong-rank", full_config("wrong-rank", dims="4, 4"), "input 'INPUT0' has shape [-1, 4, 4] in config.pbtxt"),
    ("wrong-name", full_config("wrong-name", first="IN0"), "inputs ['IN0', 'INPUT1'] differ from the ONNX graph's"),
])  # fmt: skip
def test_a_config_contradicting_the_graph_fails_the_load_naming_the_tensor(tmp_path, name, config, words):
    spec = read_model(write_model(tmp_path, name, add_graph(["batch", 16]), config))
    with pytest.raises(RepositoryError) as error:
        OnnxModel(spec, "1", SessionSettings("cpu", 1, 1))
    assert words in str(error.value)


def test_a_partial_config_contradicting_the_graph_fails_too(tmp_path):
    config = BACKEND_ONLY + 'max_batch_size: 4\ninput [ { name: "INPUT0" data_type: TYPE_FP64 dims: [ 16 ] },' \
                            ' { name: "INPUT1" data_type: TYPE_FP32 dims: [ 16 ] } ]\n'
    spec = read_model(write_model(tmp_path, "half-wrong", add_graph(["batch", 16]), config))
    with pytest.raises(RepositoryError, match="input 'INPUT0' is FP64 in config.pbtxt but FP32 in the ONNX graph"):
        OnnxModel(spec, "1", SessionSettings("cpu", 1, 1))


def test_a_file_onnxruntime_cannot_read_fails_naming_it(tmp_path):
    (tmp_path / "broken" / "1").mkdir(parents=True)
    (tmp_path / "broken" / "1" / "model.onnx").write_bytes(b"not onnx")
    with pytest.raises(RepositoryError, match=r"model 'broken': onnxruntime cannot read .*model.onnx to auto-complete"):
        read_model(tmp_path / "broken")


def test_disabled_auto_complete_refuses_incomplete_configs(tmp_path):
    off = AutoComplete(enabled=False)
    with pytest.raises(RepositoryError, match=r"no such file .*\(auto-complete is off: --disable-auto-complete-config\)"):
        read_model(write_model(tmp_path, "bare", add_graph(["batch", 16])), completion=off)
    partial = write_model(tmp_path, "partial", add_graph(["batch", 16]), BACKEND_ONLY + "max_batch_size: 8\n")
    with pytest.raises(RepositoryError, match=r"must declare at least one input and one output \(auto-complete is off"):
        read_model(partial, completion=off)
    full = read_model(write_model(tmp_path, "full", add_graph(["batch", 16]), full_config("full")), completion=off)
    assert full.config.max_batch_size == 8


# -- served --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def auto_repository(tmp_path_factory):
    root = tmp_path_factory.mktemp("auto_repository")
    write_model(root, "simple", add_graph(["batch", 16]))
    write_model(root, "fixed", add_graph([1, 16], TensorProto.INT32))
    write_model(root, "partial", add_graph(["batch", 16]), 'name: "partial"\n' + BACKEND_ONLY + "max_batch_size: 8\n")
    write_model(root, "full", add_graph(["batch", 16]), full_config("full"))
    write_model(root, "wrong-type", add_graph(["batch", 16]), full_config("wrong-type", datatype="TYPE_INT32"))
    write_model(root, "cannot-batch", add_graph([1, 16]), BACKEND_ONLY + "max_batch_size: 8\n")
    return root


@pytest.fixture(scope="module")
def auto_server(start_server, auto_repository):
    return start_server(auto_repository, "--model-control-mode", "explicit", "--load-model", "*")


def config_over_grpc(server, name: str) -> dict:
    answer = server.stub().ModelConfig(pb.ModelConfigRequest(name=name), timeout=10)
    return json_format.MessageToDict(answer.config, preserving_proto_field_name=True)


def test_served_configs_are_the_completed_ones_over_grpc_and_http(auto_server):
    for name, max_batch_size in (("simple", 4), ("partial", 8), ("fixed", 0)):
        over_grpc = config_over_grpc(auto_server, name)
        over_http = call(auto_server.http_port, "GET", f"/v2/models/{name}/config").json()
        for config in (over_grpc, over_http):
            assert config.get("max_batch_size", 0) == max_batch_size
            assert config["platform"] == "onnxruntime_onnx" and config["backend"] == "onnxruntime"
            assert [tensor["name"] for tensor in config["input"]] == ["INPUT0", "INPUT1"]
            assert [tensor["name"] for tensor in config["output"]] == ["OUTPUT0"]
            assert ("dynamic_batching" in config) == (max_batch_size > 1)
    fixed = call(auto_server.http_port, "GET", "/v2/models/fixed/config").json()
    assert fixed["input"][0]["data_type"] == "TYPE_INT32" and fixed["input"][0]["dims"] == [1, 16]


def test_a_config_less_model_serves_batches(auto_server):
    first = np.arange(3 * 16, dtype=np.float32).reshape(3, 16)
    request = pb.ModelInferRequest(model_name="simple", inputs=[
        pb.ModelInferRequest.InferInputTensor(name=name, datatype="FP32", shape=[3, 16]) for name in ("INPUT0", "INPUT1")
    ], raw_input_contents=[first.tobytes(), (2 * first).tobytes()])  # fmt: skip
    answer = auto_server.stub().ModelInfer(request, timeout=10)
    assert np.array_equal(np.frombuffer(answer.raw_output_contents[0], np.float32).reshape(3, 16), 3 * first)
    metadata = auto_server.stub().ModelMetadata(pb.ModelMetadataRequest(name="simple"), timeout=10)
    assert list(metadata.inputs[0].shape) == [-1, 16]


def test_contradicting_models_fail_alone_naming_the_tensor(auto_server, tiny_repository):
    rows = {row.name: row for row in auto_server.stub().RepositoryIndex(pb.RepositoryIndexRequest(), timeout=10).models}
    assert rows["wrong-type"].state == "UNAVAILABLE"
    assert "input 'INPUT0' is INT32 in config.pbtxt but FP32 in the ONNX graph" in rows["wrong-type"].reason
    assert rows["cannot-batch"].state == "UNAVAILABLE" and "'INPUT0' has a first dimension of 1" in rows["cannot-batch"].reason
    assert {rows[name].state for name in ("simple", "fixed", "partial", "full")} == {"READY"}
    with pytest.raises(grpc.RpcError) as error:
        auto_server.stub().ModelInfer(infer_request("wrong-type", tiny_repository.images(1)), timeout=10)
    assert error.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_load_model_override_without_platform_is_completed(auto_server, protocol, tmp_path):
    """tritonclient's load_model(name, config='{"max_batch_size":"16"}'), as Triton's model control example does."""
    if importlib.util.find_spec("tritonclient") is None:
        pytest.skip("tritonclient is not installed (the 'test' extra)")
    url = auto_server.grpc_address if protocol == "grpc" else f"127.0.0.1:{auto_server.http_port}"
    answers = triton_calls(protocol, url, [
        {"call": "load_model", "model": "partial", "config": '{"max_batch_size":"16"}'},
        {"call": "get_model_config", "model": "partial"},
        {"call": "load_model", "model": "uploaded", "config": "{}",
         "files": {"file:1/model.onnx": model_file_b64(add_graph(["n", 2], TensorProto.INT64))}},
        {"call": "get_model_config", "model": "uploaded"},
        {"call": "load_model", "model": "partial"},  # back to its config.pbtxt for the other protocol
        {"call": "get_model_config", "model": "partial"},
    ], tmp_path)  # fmt: skip
    assert all("error" not in answer for answer in answers), answers
    override, uploaded, restored = answers[1]["value"], answers[3]["value"], answers[5]["value"]
    assert int(override["max_batch_size"]) == 16 and "dynamic_batching" in override
    assert [tensor["name"] for tensor in override["input"]] == ["INPUT0", "INPUT1"]
    assert override["platform"] == "onnxruntime_onnx"
    assert int(uploaded["max_batch_size"]) == 4 and uploaded["input"][0]["data_type"] == "TYPE_INT64"
    assert int(restored["max_batch_size"]) == 8


def test_disable_auto_complete_config_serves_only_complete_configs(start_server, auto_repository):
    server = start_server(auto_repository, "--disable-auto-complete-config")
    rows = {row.name: row for row in server.stub().RepositoryIndex(pb.RepositoryIndexRequest(), timeout=10).models}
    assert rows["full"].state == "READY"
    for name in ("simple", "fixed", "partial"):
        assert rows[name].state == "UNAVAILABLE" and "--disable-auto-complete-config" in rows[name].reason, rows[name]
    assert datatype_name(server.stub().ModelConfig(pb.ModelConfigRequest(name="full"), timeout=10)
                         .config.input[0].data_type) == "FP32"  # fmt: skip
