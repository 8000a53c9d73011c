"""The real server subprocess, driven through our own generated protocol stubs.

Answers are checked against onnxruntime run in this process on the same model files:
a member's probabilities, and an ensemble's as the mean of its members'.
"""

from __future__ import annotations

import dataclasses

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from ensemble_serving.protocol import grpc_service_pb2 as pb
from tests.support.requests import infer_request, probabilities


def local_probabilities(repository, model: str, images: np.ndarray) -> np.ndarray:
    path = repository.path / model / "1" / "model.onnx"
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["probabilities"], {"images": images})[0]


# --- server and model metadata --------------------------------------------------------------
def test_server_live_ready_and_metadata(inference_stub):
    assert inference_stub.ServerLive(pb.ServerLiveRequest()).live
    assert inference_stub.ServerReady(pb.ServerReadyRequest()).ready
    metadata = inference_stub.ServerMetadata(pb.ServerMetadataRequest())
    assert metadata.name == "ensemble-serving"
    assert {"classification", "model_configuration", "statistics"} <= set(metadata.extensions)


def test_model_metadata_and_config(inference_stub, tiny_repository):
    for model in (*tiny_repository.members, tiny_repository.ensemble):
        assert inference_stub.ModelReady(pb.ModelReadyRequest(name=model)).ready
        metadata = inference_stub.ModelMetadata(pb.ModelMetadataRequest(name=model))
        assert list(metadata.versions) == ["1"]
        assert [(t.name, t.datatype, list(t.shape)) for t in metadata.inputs] == [
            ("images", "UINT8", [-1, *tiny_repository.image_shape])]
        assert [(t.name, t.datatype, list(t.shape)) for t in metadata.outputs] == [
            ("probabilities", "FP32", [-1, len(tiny_repository.class_names)])]
        config = inference_stub.ModelConfig(pb.ModelConfigRequest(name=model)).config
        assert config.name == model and config.max_batch_size == tiny_repository.max_batch_size
        # The execution provider actually used is visible to clients (CPU here).
        assert config.parameters["execution_provider"].string_value == "CPUExecutionProvider"
    member = inference_stub.ModelMetadata(pb.ModelMetadataRequest(name=tiny_repository.members[0]))
    assert member.platform == "onnxruntime_onnx"
    ensemble = inference_stub.ModelConfig(pb.ModelConfigRequest(name=tiny_repository.ensemble)).config
    assert ensemble.platform == "ensemble"
    assert [step.model_name for step in ensemble.ensemble_scheduling.step] == [*tiny_repository.members,
                                                                               tiny_repository.average]
    assert not inference_stub.ModelReady(pb.ModelReadyRequest(name="no-such-model")).ready


def test_repository_index_lists_every_model_ready(inference_stub, tiny_repository):
    index = inference_stub.RepositoryIndex(pb.RepositoryIndexRequest())
    states = {(model.name, model.version): model.state for model in index.models}
    expected = [*tiny_repository.members, tiny_repository.average, tiny_repository.ensemble]
    assert states == {(name, "1"): "READY" for name in expected}


def test_health_service_and_reflection(server, tiny_repository):
    health = health_pb2_grpc.HealthStub(server.channel())
    for service in ("", "inference.GRPCInferenceService", tiny_repository.ensemble, tiny_repository.members[0]):
        status = health.Check(health_pb2.HealthCheckRequest(service=service)).status
        assert status == health_pb2.HealthCheckResponse.SERVING, service
    with pytest.raises(grpc.RpcError) as error:
        health.Check(health_pb2.HealthCheckRequest(service="no-such-model"))
    assert error.value.code() == grpc.StatusCode.NOT_FOUND

    reflection = reflection_pb2_grpc.ServerReflectionStub(server.channel())
    answers = reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    services = {service.name for answer in answers for service in answer.list_services_response.service}
    assert {"inference.GRPCInferenceService", "grpc.health.v1.Health"} <= services


# --- inference --------------------------------------------------------------------------------
@pytest.mark.parametrize("typed", [False, True], ids=["raw", "typed"])
def test_member_inference_matches_onnxruntime(inference_stub, tiny_repository, typed):
    member = tiny_repository.members[0]
    images = tiny_repository.images(5, seed=1)
    response = inference_stub.ModelInfer(infer_request(member, images, typed=typed))
    assert (response.model_name, response.model_version, response.id) == (member, "1", "request-7")
    np.testing.assert_allclose(probabilities(response), local_probabilities(tiny_repository, member, images),
                               rtol=1e-5, atol=1e-6)


def test_ensemble_is_the_mean_of_its_members(inference_stub, tiny_repository):
    images = tiny_repository.images(4, seed=2)
    response = inference_stub.ModelInfer(infer_request(tiny_repository.ensemble, images))
    expected = np.mean([local_probabilities(tiny_repository, m, images) for m in tiny_repository.members], axis=0)
    result = probabilities(response)
    np.testing.assert_allclose(result, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(result.sum(axis=1), 1.0, rtol=1e-5)


def test_classification_extension_returns_top_k_with_labels(inference_stub, tiny_repository):
    images = tiny_repository.images(2, seed=3)
    output = pb.ModelInferRequest.InferRequestedOutputTensor(name="probabilities")
    output.parameters["classification"].int64_param = 3
    response = inference_stub.ModelInfer(infer_request(tiny_repository.ensemble, images, outputs=[output]))
    assert response.outputs[0].datatype == "BYTES" and list(response.outputs[0].shape) == [2, 3]
    raw = response.raw_output_contents[0]
    items, offset = [], 0
    while offset < len(raw):
        length = int.from_bytes(raw[offset:offset + 4], "little")
        items.append(raw[offset + 4:offset + 4 + length].decode())
        offset += 4 + length
    full = probabilities(inference_stub.ModelInfer(infer_request(tiny_repository.ensemble, images)))
    for row, scores in zip(np.array(items).reshape(2, 3), full):
        best = np.argsort(-scores)[:3]
        assert [int(item.split(":")[1]) for item in row] == list(best)
        assert [item.split(":")[2] for item in row] == [tiny_repository.class_names[i] for i in best]
        assert float(row[0].split(":")[0]) == pytest.approx(scores[best[0]], abs=1e-6)


def test_nan_and_inf_inputs_do_not_crash_anything(inference_stub, tiny_repository):
    average = tiny_repository.average
    classes = len(tiny_repository.class_names)
    request = pb.ModelInferRequest(model_name=average)
    values = np.array([[np.nan] * classes, [np.inf] * classes, [-np.inf] + [0.0] * (classes - 1)], np.float32)
    for i in range(len(tiny_repository.members)):
        request.inputs.add(name=f"probabilities_{i}", datatype="FP32", shape=values.shape)
        request.raw_input_contents.append(values.tobytes())
    output = request.outputs.add(name="probabilities")
    response = inference_stub.ModelInfer(request)
    result = np.frombuffer(response.raw_output_contents[0], np.float32).reshape(values.shape)
    assert np.isnan(result[0]).all() and np.isinf(result[1]).all()
    output.parameters["classification"].int64_param = 2  # top-k over NaN and Inf rows
    assert inference_stub.ModelInfer(request).outputs[0].datatype == "BYTES"
    assert inference_stub.ServerLive(pb.ServerLiveRequest()).live


def test_statistics_count_inferences_and_executions(inference_stub, tiny_repository):
    member = tiny_repository.members[1]

    def stats():
        return inference_stub.ModelStatistics(pb.ModelStatisticsRequest(name=member)).model_stats[0]

    before = stats()
    for count in (1, 3):
        inference_stub.ModelInfer(infer_request(member, tiny_repository.images(count)))
    after = stats()
    assert (after.name, after.version) == (member, "1")
    assert after.inference_count - before.inference_count == 4
    assert after.execution_count - before.execution_count == 2
    assert after.inference_stats.success.count - before.inference_stats.success.count == 2
    assert {entry.batch_size for entry in after.batch_stats} >= {1, 3}
    everything = inference_stub.ModelStatistics(pb.ModelStatisticsRequest())
    assert {entry.name for entry in everything.model_stats} >= {*tiny_repository.members, tiny_repository.ensemble}
    with pytest.raises(grpc.RpcError) as error:
        inference_stub.ModelStatistics(pb.ModelStatisticsRequest(name="no-such-model"))
    assert error.value.code() == grpc.StatusCode.NOT_FOUND


# --- bad input: one row per mistake, each with its status and what the message names ------------
@dataclasses.dataclass
class BadInput:
    id: str
    build: callable  # (repository) -> ModelInferRequest
    status: grpc.StatusCode
    fragments: callable  # (repository) -> what the message must name: what was received, what was expected


def _with(request: pb.ModelInferRequest, change) -> pb.ModelInferRequest:
    change(request)
    return request


def _average_request(repository, batch_sizes: list[int]) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=repository.average)
    for i, size in enumerate(batch_sizes):
        values = np.zeros((size, len(repository.class_names)), np.float32)
        request.inputs.add(name=f"probabilities_{i}", datatype="FP32", shape=values.shape)
        request.raw_input_contents.append(values.tobytes())
    return request


def _images_shape(r) -> str:
    return f"[-1, {r.height}, {r.width}, {r.channels}]"


def _pixels(r) -> int:
    return r.height * r.width * r.channels


INVALID = grpc.StatusCode.INVALID_ARGUMENT
BAD_INPUTS = [
    BadInput("wrong-input-name", lambda r: infer_request(r.members[0], r.images(1), name="pixels"), INVALID,
             lambda r: (f"unexpected inference input 'pixels' for model {r.members[0]!r}; "
                        f"it expects 'images' UINT8 {_images_shape(r)}",)),
    BadInput("wrong-datatype", lambda r: infer_request(r.members[0], r.images(1).astype(np.float32), datatype="FP32"),
             INVALID, lambda r: ("datatype FP32", "expects UINT8")),
    BadInput("wrong-shape", lambda r: infer_request(r.members[0], r.images(1)[:, :, :4]), INVALID,
             lambda r: (f"unexpected shape for input 'images' for model {r.members[0]!r}. "
                        f"Expected {_images_shape(r)}, got [1, {r.height}, 4, {r.channels}]",)),
    BadInput("missing-batch-dimension", lambda r: infer_request(r.members[0], r.images(1)[0]), INVALID,
             lambda r: (f"unexpected shape for input 'images' for model {r.members[0]!r}. "
                        f"Expected {_images_shape(r)}, got [{r.height}, {r.width}, {r.channels}] (batch dimension first)",)),
    BadInput("raw-wrong-byte-length",
             lambda r: _with(infer_request(r.members[0], r.images(2)),
                             lambda q: q.raw_input_contents.__setitem__(0, q.raw_input_contents[0][:-1])),
             INVALID, lambda r: (f"has {2 * _pixels(r) - 1} bytes",
                                 f"shape [2, {r.height}, {r.width}, {r.channels}] UINT8 needs {2 * _pixels(r)} bytes")),
    BadInput("typed-wrong-count",
             lambda r: _with(infer_request(r.members[0], r.images(1), typed=True),
                             lambda q: q.inputs[0].contents.uint_contents.pop()),
             INVALID, lambda r: (f"{_pixels(r) - 1} values in contents.uint_contents", f"needs {_pixels(r)}")),
    BadInput("typed-wrong-field",
             lambda r: _with(infer_request(r.members[0], r.images(1), typed=True),
                             lambda q: q.inputs[0].contents.fp32_contents.append(1.0)),
             INVALID, lambda r: ("contents.uint_contents, fp32_contents", "expected contents.uint_contents")),
    BadInput("raw-and-typed-together",
             lambda r: _with(infer_request(r.members[0], r.images(1)),
                             lambda q: q.inputs[0].contents.uint_contents.extend([0] * _pixels(r))),
             INVALID, lambda r: ("both typed contents and raw_input_contents",)),
    BadInput("raw-count-mismatch",
             lambda r: _with(infer_request(r.members[0], r.images(1)), lambda q: q.raw_input_contents.append(b"")),
             INVALID, lambda r: ("2 raw_input_contents for 1 inputs", "one per input")),
    BadInput("batch-above-max", lambda r: infer_request(r.members[0], r.images(r.max_batch_size + 1)), INVALID,
             lambda r: (f"inference request batch-size must be <= {r.max_batch_size} for {r.members[0]!r} "
                        f"(input 'images' has batch size {r.max_batch_size + 1}; max_batch_size {r.max_batch_size})",)),
    BadInput("batch-of-zero", lambda r: infer_request(r.members[0], r.images(0)), INVALID,
             lambda r: ("batch size 0", "at least 1")),
    BadInput("ensemble-batch-above-max", lambda r: infer_request(r.ensemble, r.images(r.max_batch_size + 1)),
             INVALID, lambda r: (f"inference request batch-size must be <= {r.max_batch_size} for {r.ensemble!r}",
                                 f"batch size {r.max_batch_size + 1}")),
    BadInput("unknown-model", lambda r: infer_request("no-such-model", r.images(1)), grpc.StatusCode.NOT_FOUND,
             lambda r: ("Request for unknown model: 'no-such-model' is not found",
                        "models served: " + ", ".join(sorted([*r.members, r.average, r.ensemble])))),
    BadInput("unknown-version", lambda r: infer_request(r.members[0], r.images(1), version="7"),
             grpc.StatusCode.NOT_FOUND,
             lambda r: (f"Request for unknown model: {r.members[0]!r} version 7 is not found", "versions served: 1")),
    BadInput("empty-request", lambda r: pb.ModelInferRequest(model_name=r.ensemble), INVALID,
             lambda r: ("request has no inputs", f"expects 'images' UINT8 {_images_shape(r)}")),
    BadInput("unknown-output",
             lambda r: infer_request(r.members[0], r.images(1),
                                     outputs=[pb.ModelInferRequest.InferRequestedOutputTensor(name="logits")]),
             INVALID, lambda r: (f"unexpected inference output 'logits' for model {r.members[0]!r}; "
                                 f"it has 'probabilities'",)),
    BadInput("missing-input", lambda r: _average_request(r, [1]), INVALID,
             lambda r: (f"expected 2 inputs but got 1 inputs for model {r.average!r}. Got input(s) "
                        f"['probabilities_0'], but missing required input(s) ['probabilities_1']",
                        f"'probabilities_0' FP32 [-1, {len(r.class_names)}]")),
    BadInput("inputs-disagree-on-batch", lambda r: _average_request(r, [1, 2]), INVALID,
             lambda r: ("different batch sizes [1, 2]",)),
]


@pytest.mark.parametrize("case", BAD_INPUTS, ids=[case.id for case in BAD_INPUTS])
def test_bad_input_gets_a_clear_status_and_message(inference_stub, tiny_repository, case):
    with pytest.raises(grpc.RpcError) as error:
        inference_stub.ModelInfer(case.build(tiny_repository), timeout=30)
    assert error.value.code() == case.status, error.value.details()
    for fragment in case.fragments(tiny_repository):
        assert fragment in error.value.details()
    assert "\n" not in error.value.details()


def test_server_keeps_serving_after_bad_input(inference_stub, tiny_repository):
    for case in BAD_INPUTS:
        with pytest.raises(grpc.RpcError):
            inference_stub.ModelInfer(case.build(tiny_repository), timeout=30)
    response = inference_stub.ModelInfer(infer_request(tiny_repository.ensemble, tiny_repository.images(2)))
    assert probabilities(response).shape == (2, len(tiny_repository.class_names))
    assert inference_stub.ServerReady(pb.ServerReadyRequest()).ready
