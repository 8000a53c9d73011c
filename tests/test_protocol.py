"""The protocol definitions: generated code is current, configs round-trip, and the
messages stay wire-compatible with the field numbers Triton's clients use."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ensemble_serving import model_config
from ensemble_serving.protocol import grpc_service_pb2, model_config_pb2

ROOT = Path(__file__).resolve().parents[1]

EXAMPLE = """
name: "cifar10-m0"
platform: "onnxruntime_onnx"
max_batch_size: 64
input { name: "images" data_type: TYPE_UINT8 format: FORMAT_NHWC dims: [32, 32, 3] }
output { name: "probabilities" data_type: TYPE_FP32 dims: [10] label_filename: "labels.txt" }
dynamic_batching { max_queue_delay_microseconds: 2000 }
instance_group { kind: KIND_CPU count: 1 }
"""


def test_generated_code_is_current(tmp_path):
    pytest.importorskip("grpc_tools")
    for item in ("protos",):
        shutil.copytree(ROOT / item, tmp_path / item)
    (tmp_path / "ensemble_serving" / "protocol").mkdir(parents=True)
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", "-I", str(tmp_path / "protos"),
         f"--python_out={tmp_path}", f"--grpc_python_out={tmp_path}",
         "ensemble_serving/protocol/model_config.proto", "ensemble_serving/protocol/grpc_service.proto"],
        check=True, cwd=tmp_path,
    )
    for name in ("model_config_pb2.py", "grpc_service_pb2.py", "grpc_service_pb2_grpc.py"):
        fresh = (tmp_path / "ensemble_serving" / "protocol" / name).read_text()
        committed = (ROOT / "ensemble_serving" / "protocol" / name).read_text()
        assert fresh == committed, f"{name} is stale: run protos/generate.sh"


def test_config_round_trip(tmp_path):
    config = model_config.parse_model_config(EXAMPLE)
    assert config.input[0].dims == [32, 32, 3]
    assert config.WhichOneof("scheduling_choice") == "dynamic_batching"
    path = model_config.save_model_config(config, tmp_path / "config.pbtxt")
    assert model_config.load_model_config(tmp_path) == config
    assert path.read_text().startswith('name: "cifar10-m0"')


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("name: 3", "not a valid Triton ModelConfig"),
        ('name: "x" sequence_batching {}', "sequence_batching"),
        ("input { data_type: TYPE_NOPE }", "TYPE_NOPE"),
    ],
)
def test_invalid_config_names_the_problem(text, fragment):
    with pytest.raises(model_config.ModelConfigError, match=fragment):
        model_config.parse_model_config(text, source="m/config.pbtxt")


def test_missing_config_file(tmp_path):
    with pytest.raises(model_config.ModelConfigError, match="no such file"):
        model_config.load_model_config(tmp_path)


def test_datatype_names():
    assert model_config.datatype_name(model_config_pb2.TYPE_FP32) == "FP32"
    assert model_config.datatype_enum("UINT8") == model_config_pb2.TYPE_UINT8
    with pytest.raises(model_config.ModelConfigError, match="expected one of"):
        model_config.datatype_enum("FLOAT")


def test_field_numbers_match_triton():
    # tritonclient and perf_analyzer decode our responses with Triton's own protos:
    # these numbers are the wire contract (spot checks of the ones they read).
    fields = model_config_pb2.ModelConfig.DESCRIPTOR.fields_by_name
    assert {n: fields[n].number for n in ("name", "platform", "max_batch_size", "input", "output",
                                          "dynamic_batching", "ensemble_scheduling", "instance_group")} == {
        "name": 1, "platform": 2, "max_batch_size": 4, "input": 5, "output": 6,
        "dynamic_batching": 11, "ensemble_scheduling": 15, "instance_group": 7}
    request = grpc_service_pb2.ModelInferRequest.DESCRIPTOR.fields_by_name
    assert request["raw_input_contents"].number == 7 and request["inputs"].number == 5
    stats = grpc_service_pb2.ModelStatistics.DESCRIPTOR.fields_by_name
    assert stats["execution_count"].number == 5 and stats["batch_stats"].number == 7
    service = grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert service.full_name == "inference.GRPCInferenceService"
