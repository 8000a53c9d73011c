"""The server's parts in process: repository validation, request decoding, the batcher.

End-to-end behaviour (a real server subprocess on a real port) is in the other
tests/test_server_*.py files; these pin down the rules that are easier to see alone.
"""

from __future__ import annotations

import re
import shutil
import threading
import time

import grpc
import numpy as np
import pytest

from ensemble_serving.protocol import grpc_service_pb2 as pb
from ensemble_serving.tensors import serialize_bytes
from server.config import ServerSettings
from server.inference.request_codec import InferenceError, classify, decode_request, encode_response, from_grpc, to_grpc
from server.models.loading import batching_policy
from server.models.repository import RepositoryError, load_order, scan_repository
from server.models.runtime import DeviceError, choose_providers, cuda_available
from server.observability.metrics import ServerMetrics
from server.observability.statistics import ModelStats
from server.scheduling.batcher import BatchingPolicy, CallScope, DynamicBatcher
from server.scheduling.steps import run_blocking


@pytest.fixture
def repository_copy(tiny_repository, tmp_path):
    """A private copy of the tiny repository that a test may break."""
    return shutil.copytree(tiny_repository.path, tmp_path / "repository")


# --- repository ---------------------------------------------------------------------------
def test_load_order_puts_members_before_the_ensemble(tiny_repository):
    order = [spec.name for spec in load_order(scan_repository(tiny_repository.path))]
    assert order.index(tiny_repository.ensemble) > max(order.index(name) for name in tiny_repository.members)
    assert order.index(tiny_repository.ensemble) > order.index(tiny_repository.average)


def test_selecting_an_ensemble_brings_its_steps(tiny_repository):
    order = [spec.name for spec in load_order(scan_repository(tiny_repository.path), [tiny_repository.ensemble])]
    assert sorted(order) == sorted([*tiny_repository.members, tiny_repository.average, tiny_repository.ensemble])
    only = load_order(scan_repository(tiny_repository.path), [tiny_repository.members[0]])
    assert [spec.name for spec in only] == [tiny_repository.members[0]]


def test_spec_reads_signature_and_labels(tiny_repository):
    spec = scan_repository(tiny_repository.path).specs[tiny_repository.members[0]]
    assert spec.inputs[0].shape(spec.batching) == [-1, *tiny_repository.image_shape]
    assert spec.outputs[0].labels == tiny_repository.class_names
    assert spec.versions == ("1",)


def _edit_config(path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new))


@pytest.mark.parametrize(
    "breakage, expected, broken",  # broken: the model the message must name
    [
        (lambda root, r: (root / r.members[0] / "1" / "model.onnx").unlink(), "missing", lambda r: r.members[0]),
        (lambda root, r: _edit_config(root / r.members[0] / "config.pbtxt", "max_batch_size", "max_batch_sise"),
         "not a valid Triton ModelConfig", lambda r: r.members[0]),
        (lambda root, r: _edit_config(root / r.members[0] / "config.pbtxt", f'name: "{r.members[0]}"', 'name: "x"'),
         "must match the folder name", lambda r: r.members[0]),
        (lambda root, r: shutil.rmtree(root / r.average), "needed by ensemble", lambda r: r.average),
        (lambda root, r: _edit_config(root / r.ensemble / "config.pbtxt",
                                      'value: "probabilities_1"\n    }\n  }\n  step',
                                      'value: "probabilities_9"\n    }\n  }\n  step'),
         "neither an ensemble input nor an output of an earlier step", lambda r: r.ensemble),
        (lambda root, r: _edit_config(root / r.members[0] / "config.pbtxt", '"onnxruntime_onnx"', '"tensorrt_plan"'),
         "is not served", lambda r: r.members[0]),
    ],
    ids=["missing-onnx-file", "config-typo", "name-mismatch", "ensemble-step-missing", "unwired-tensor",
         "unsupported-platform"],
)
def test_broken_repository_is_refused_with_the_model_named(repository_copy, tiny_repository, breakage, expected,
                                                           broken):  # fmt: skip
    breakage(repository_copy, tiny_repository)
    with pytest.raises(RepositoryError, match=expected) as error:
        load_order(scan_repository(repository_copy))
    assert repr(broken(tiny_repository)) in str(error.value), str(error.value)


def test_onnx_graph_must_match_config(repository_copy, tiny_repository):
    from server.models.runtime import OnnxModel, SessionSettings

    member = tiny_repository.members[0]
    _edit_config(repository_copy / member / "config.pbtxt", "dims: 10", "dims: 11")
    spec = scan_repository(repository_copy).specs[member]
    with pytest.raises(RepositoryError, match=r"shape \[-1, 11\] in config.pbtxt"):
        OnnxModel(spec, "1", SessionSettings("cpu", 1, 1))


SESSION_PARAMETERS = """
parameters { key: "intra_op_thread_count" value { string_value: "1" } }
parameters { key: "execution_mode" value { string_value: "1" } }
parameters { key: "enable_mem_arena" value { string_value: "false" } }
parameters { key: "session.intra_op.allow_spinning" value { string_value: "true" } }
"""


def test_config_parameters_tune_the_session_as_in_triton(tmp_path):
    """Triton's onnxruntime-backend keys in config.pbtxt, and onnxruntime's spinning key,
    override the server-wide flags for that model only."""
    import onnxruntime as ort

    from server.models.runtime import OnnxModel, SessionSettings
    from tests.support.tiny_models import write_member_model

    write_member_model(tmp_path, "tuned", seed=0, config_extra=SESSION_PARAMETERS)
    write_member_model(tmp_path, "plain", seed=1)
    specs = scan_repository(tmp_path).specs
    settings = SessionSettings("cpu", intra_op_threads=2, inter_op_threads=2, spinning=False)  # parallel needs 2+
    tuned = OnnxModel(specs["tuned"], "1", settings).session.get_session_options()
    plain = OnnxModel(specs["plain"], "1", settings).session.get_session_options()
    assert (tuned.intra_op_num_threads, tuned.execution_mode, tuned.enable_cpu_mem_arena) == (
        1, ort.ExecutionMode.ORT_PARALLEL, False)
    assert tuned.get_session_config_entry("session.intra_op.allow_spinning") == "1"
    assert (plain.intra_op_num_threads, plain.execution_mode, plain.enable_cpu_mem_arena) == (
        2, ort.ExecutionMode.ORT_SEQUENTIAL, True)
    assert plain.get_session_config_entry("session.intra_op.allow_spinning") == "0"


@pytest.mark.parametrize("key, value, expected", [
    ("intra_op_thread_count", "two", "a whole number of threads"),
    ("execution_mode", "2", "0 (sequential) or 1 (parallel)"),
    ("enable_mem_pattern", "maybe", "true or false"),
])
def test_a_bad_session_parameter_fails_the_load_naming_it(tmp_path, key, value, expected):
    from server.models.runtime import OnnxModel, SessionSettings
    from tests.support.tiny_models import write_member_model

    write_member_model(tmp_path, "m", seed=0,
                       config_extra=f'parameters {{ key: "{key}" value {{ string_value: "{value}" }} }}')  # fmt: skip
    message = f"model 'm': config.pbtxt parameter '{key}' must be {expected}"
    with pytest.raises(RepositoryError, match=re.escape(message)):
        OnnxModel(scan_repository(tmp_path).specs["m"], "1", SessionSettings("cpu"))


def test_device_cuda_without_cuda_is_refused():
    if cuda_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(DeviceError, match="--device cuda"):
        choose_providers("cuda")
    assert choose_providers("auto") == ["CPUExecutionProvider"]


# --- request decoding -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def member_spec(tiny_repository):
    return scan_repository(tiny_repository.path).specs[tiny_repository.members[0]]


def _request(images: np.ndarray, typed: bool = False, model: str = "m") -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model, id="abc")
    tensor = request.inputs.add(name="images", datatype="UINT8", shape=images.shape)
    if typed:
        tensor.contents.uint_contents.extend(images.reshape(-1).tolist())
    else:
        request.raw_input_contents.append(images.tobytes())
    return request


@pytest.mark.parametrize("typed", [False, True], ids=["raw", "typed"])
def test_decode_raw_and_typed_agree(member_spec, tiny_repository, typed):
    images = tiny_repository.images(3)
    decoded = decode_request(from_grpc(_request(images, typed)), member_spec)
    assert decoded.batch_size == 3
    np.testing.assert_array_equal(decoded.inputs["images"], images)
    assert decoded.inputs["images"].dtype == np.uint8


def test_encode_uses_raw_outputs_and_echoes_id(member_spec, tiny_repository):
    probabilities = np.full((2, 10), 0.1, np.float32)
    request = from_grpc(_request(tiny_repository.images(2)))
    decoded = decode_request(request, member_spec)
    response = to_grpc(encode_response(member_spec, "1", request.id, {"probabilities": probabilities},
                                       decoded.outputs))
    assert response.id == "abc" and response.model_version == "1"
    assert list(response.outputs[0].shape) == [2, 10] and response.outputs[0].datatype == "FP32"
    np.testing.assert_array_equal(np.frombuffer(response.raw_output_contents[0], np.float32).reshape(2, 10),
                                  probabilities)


def test_classification_is_top_k_with_labels_and_survives_nan():
    scores = np.array([[0.1, 0.7, 0.2], [np.nan, 0.5, np.inf]], np.float32)
    data, shape = classify(scores, 2, ("a", "b", "c"))
    assert shape == [2, 2]
    assert data == serialize_bytes([b"0.700000:1:b", b"0.200000:2:c", b"inf:2:c", b"0.500000:1:b"])


def test_typed_values_out_of_range_are_refused(member_spec, tiny_repository):
    request = _request(tiny_repository.images(1), typed=True)
    request.inputs[0].contents.uint_contents[0] = 300
    with pytest.raises(InferenceError, match="outside the UINT8 range") as error:
        decode_request(from_grpc(request), member_spec)
    assert error.value.code == grpc.StatusCode.INVALID_ARGUMENT


# --- the batcher -----------------------------------------------------------------------------
def _batcher(run, *, delay_s=0.05, max_batch_size=8, queue=16, dynamic=True, adaptive=False):
    policy = BatchingPolicy(max_batch_size, delay_s, queue, dynamic, adaptive_delay=adaptive)
    stats = ModelStats("m", "1")
    batcher = DynamicBatcher("m", "1", run, policy, stats, ServerMetrics().for_model("m", "1"))
    batcher.start()
    return batcher, stats


def _infer_concurrently(batcher, inputs: list[dict]) -> list:
    """Submit every request before waiting for any (as concurrent callers would), then wait."""
    tickets = [batcher.submit(tensors, 1, None) for tensors in inputs]
    return [batcher.result(ticket) for ticket in tickets]


def test_batcher_gathers_concurrent_requests_and_splits_results():
    calls = []

    def run(inputs):
        calls.append(inputs["x"].shape[0])
        return {"y": inputs["x"] * 2}

    batcher, stats = _batcher(run)
    results = _infer_concurrently(batcher, [{"x": np.full((1, 2), i, np.float32)} for i in range(5)])
    batcher.close()
    assert calls == [5]  # one execution for five requests
    for i, result in enumerate(results):
        np.testing.assert_array_equal(result["y"], np.full((1, 2), 2 * i))
    assert (stats.execution_count, stats.inference_count) == (1, 5)
    assert (stats.queue.count, stats.success.count) == (5, 5)


def test_batcher_respects_max_batch_size_and_disabled_batching():
    sizes = []

    def run(inputs):
        sizes.append(inputs["x"].shape[0])
        return {"y": inputs["x"]}

    for dynamic in (True, False):
        batcher, _ = _batcher(run, max_batch_size=4, dynamic=dynamic, delay_s=0.01)
        _infer_concurrently(batcher, [{"x": np.zeros((1, 1))} for _ in range(10)])
        batcher.close()
        if dynamic:
            assert max(sizes) <= 4 and sum(sizes) == 10 and len(sizes) < 10
            sizes.clear()
    assert sizes == [1] * 10


@pytest.mark.parametrize("adaptive", [True, False], ids=["adaptive", "triton"])
def test_a_lone_request_waits_the_delay_only_under_triton_s_rule(adaptive):
    batcher, stats = _batcher(lambda inputs: {"y": inputs["x"]}, delay_s=0.05, adaptive=adaptive)
    for _ in range(9):  # one request at a time: the held peak decays from max_batch_size to 1
        batcher.result(batcher.submit({"x": np.zeros((1, 1))}, 1, None))
    before_ns, before_count = stats.queue.ns, stats.queue.count
    batcher.result(batcher.submit({"x": np.zeros((1, 1))}, 1, None))
    queued_s = (stats.queue.ns - before_ns) / (stats.queue.count - before_count) / 1e9
    batcher.close()
    if adaptive:
        assert queued_s < 0.025  # sent on at once: nothing else could come
    else:
        assert queued_s >= 0.05  # held for the full delay


@pytest.mark.parametrize("rule, adaptive", [("adaptive", True), ("triton", False)])
def test_queue_delay_flag_reaches_the_batching_policy(member_spec, rule, adaptive):
    policy = batching_policy(member_spec, ServerSettings(model_repository=member_spec.directory.parent,
                                                         queue_delay=rule))
    assert policy.adaptive_delay is adaptive
    assert policy.max_queue_delay_s == member_spec.config.dynamic_batching.max_queue_delay_microseconds / 1e6


def test_adaptive_delay_sends_a_closed_loop_s_batch_once_every_client_is_in():
    sizes = []

    def run(inputs):
        sizes.append(inputs["x"].shape[0])
        return {"y": inputs["x"]}

    batcher, _ = _batcher(run, delay_s=0.2, adaptive=True)  # Triton's rule: 0.2 s a batch
    barrier = threading.Barrier(4)
    round_seconds = []

    def client():  # four clients, each waits for its answer before sending again
        for _ in range(12):
            barrier.wait()
            started = time.monotonic()
            batcher.result(batcher.submit({"x": np.zeros((1, 1))}, 1, None))
            round_seconds.append(time.monotonic() - started)

    threads = [threading.Thread(target=client) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    batcher.close()
    assert sum(sizes) == 48
    assert sizes[-4:] == [4, 4, 4, 4]  # the peak (4) learned: one batch per round
    assert max(round_seconds[-16:]) < 0.1  # no round waited the 0.2 s delay


def test_adaptive_delay_still_gathers_a_burst_after_lone_requests():
    calls = []

    def run(inputs):
        calls.append(inputs["x"].shape[0])
        return {"y": inputs["x"]}

    batcher, _ = _batcher(run, delay_s=0.02, adaptive=True)
    for _ in range(12):  # lone requests first: the peak decays to 1
        batcher.result(batcher.submit({"x": np.zeros((1, 1))}, 1, None))
    del calls[:]
    _infer_concurrently(batcher, [{"x": np.zeros((1, 1))} for _ in range(8)])  # then a burst
    batcher.close()
    assert sum(calls) == 8 and len(calls) <= 2  # at most the first goes alone


def test_batcher_bounded_queue_and_expired_deadline():
    executed = []

    def run(inputs):
        executed.append(inputs["x"].shape[0])
        return {"y": inputs["x"]}

    batcher, stats = _batcher(run, delay_s=0.2, queue=2)
    expired = batcher.submit({"x": np.zeros((1, 1))}, 1, time.monotonic() + 0.05)
    fine = batcher.submit({"x": np.zeros((1, 1))}, 1, None)
    with pytest.raises(InferenceError) as full:
        batcher.submit({"x": np.zeros((1, 1))}, 1, None)
    with pytest.raises(InferenceError) as late:
        batcher.result(expired)
    batcher.result(fine)
    batcher.close()
    assert full.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_queue_size 2" in full.value.message
    assert late.value.code == grpc.StatusCode.DEADLINE_EXCEEDED and "dropped before compute" in late.value.message
    assert executed == [1]  # the expired request never reached the model
    assert stats.fail.count == 2  # the refused one and the expired one (Triton counts both as failures)


def test_batcher_withdraws_the_requests_of_a_cancelled_call():
    executed = []

    def run(inputs):
        executed.append(inputs["x"].shape[0])
        return {"y": inputs["x"]}

    batcher, stats = _batcher(run, delay_s=0.2)
    scope = CallScope()
    cancelled = batcher.submit({"x": np.zeros((1, 1))}, 1, None, scope)
    kept = batcher.submit({"x": np.ones((1, 1))}, 1, None)
    scope.cancel()  # what gRPC does when the call ends early
    with pytest.raises(InferenceError) as error:
        batcher.result(cancelled)
    np.testing.assert_array_equal(batcher.result(kept)["y"], np.ones((1, 1)))
    batcher.close()
    assert error.value.code == grpc.StatusCode.CANCELLED
    assert executed == [1] and stats.fail.count == 1


def test_batcher_survives_a_failing_model():
    def run(inputs):
        raise RuntimeError("boom")

    batcher, stats = _batcher(run, delay_s=0)
    with pytest.raises(InferenceError) as error:
        run_blocking(batcher.steps({"x": np.zeros((1, 1))}, 1, None))
    batcher.close()
    assert error.value.code == grpc.StatusCode.INTERNAL and "boom" in error.value.message
    assert stats.fail.count == 1


def test_closing_a_batcher_fails_what_is_queued():
    batcher, _ = _batcher(lambda inputs: {"y": inputs["x"]}, delay_s=5.0)
    queued = batcher.submit({"x": np.zeros((1, 1))}, 1, None)
    batcher.close()
    with pytest.raises(InferenceError) as error:
        batcher.result(queued)
    assert error.value.code == grpc.StatusCode.UNAVAILABLE
