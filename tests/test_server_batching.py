"""Dynamic batching on the real server: shared executions, the queue bound, deadlines.

The server here waits up to 0.5 s for a fuller batch (--max-queue-delay-us 500000), so
requests sent together certainly meet in one batch, and holds at most 8 queued
requests per model (--max-queue-size 8).
"""

from __future__ import annotations

import signal

import grpc
import numpy as np
import onnxruntime as ort
import pytest

from ensemble_serving.protocol import grpc_service_pb2 as pb
from tests.support.metrics import metric, scrape, wait_for_no_pending
from tests.support.requests import infer_request, probabilities

QUEUE_DELAY_US = 500_000
QUEUE_SIZE = 8


@pytest.fixture(scope="module")
def batching_server(start_server, tiny_repository):
    return start_server(tiny_repository, "--max-queue-delay-us", str(QUEUE_DELAY_US),
                        "--max-queue-size", str(QUEUE_SIZE))


def statistics(stub, model: str) -> pb.ModelStatistics:
    return stub.ModelStatistics(pb.ModelStatisticsRequest(name=model)).model_stats[0]


def send_together(stub, requests: list[pb.ModelInferRequest], timeout: float = 30,
                  finished: list[int] | None = None) -> list:  # fmt: skip
    """Send all requests at once; each result is a response or the grpc.RpcError it raised.
    `finished`, when given, gets each request's index as its answer arrives."""
    futures = [stub.ModelInfer.future(request, timeout=timeout) for request in requests]
    if finished is not None:
        for index, future in enumerate(futures):
            future.add_done_callback(lambda _future, index=index: finished.append(index))
    results = []
    for future in futures:
        try:
            results.append(future.result())
        except grpc.RpcError as error:
            results.append(error)
    return results


def test_concurrent_requests_share_executions(batching_server, tiny_repository):
    stub = batching_server.stub()
    member = tiny_repository.members[0]
    images = [tiny_repository.images(1, seed=seed) for seed in range(6)]
    before = statistics(stub, member)
    responses = send_together(stub, [infer_request(member, image) for image in images])
    after = statistics(stub, member)

    assert after.inference_count - before.inference_count == 6
    executions = after.execution_count - before.execution_count
    assert executions < 6, f"6 concurrent requests took {executions} executions"
    assert max(entry.batch_size for entry in after.batch_stats) > 1
    # Each request got its own row back out of the shared batch.
    session = ort.InferenceSession(str(tiny_repository.path / member / "1" / "model.onnx"))
    for image, response in zip(images, responses):
        np.testing.assert_allclose(probabilities(response), session.run(None, {"images": image})[0],
                                   rtol=1e-5, atol=1e-6)


def test_concurrent_ensemble_requests_are_batched_per_member(batching_server, tiny_repository):
    stub = batching_server.stub()
    watched = [*tiny_repository.members, tiny_repository.average]
    before = {model: statistics(stub, model) for model in watched}
    responses = send_together(stub, [infer_request(tiny_repository.ensemble, tiny_repository.images(2, seed=s))
                                     for s in range(5)])
    assert all(probabilities(response).shape == (2, len(tiny_repository.class_names)) for response in responses)
    for model in watched:
        after = statistics(stub, model)
        assert after.inference_count - before[model].inference_count == 10
        assert after.execution_count - before[model].execution_count < 5, model


def test_a_full_queue_answers_resource_exhausted_at_once(batching_server, tiny_repository):
    server = batching_server
    stub = server.stub()
    member = tiny_repository.members[1]
    finished: list[int] = []
    results = send_together(stub, [infer_request(member, tiny_repository.images(1)) for _ in range(QUEUE_SIZE + 4)],
                            finished=finished)  # fmt: skip
    refused = [index for index, result in enumerate(results) if isinstance(result, grpc.RpcError)]
    # All sent within the batch delay: the queue takes QUEUE_SIZE, the rest are refused.
    assert len(refused) == 4 and len(results) - len(refused) == QUEUE_SIZE, results
    for index in refused:
        assert results[index].code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert f"max_queue_size {QUEUE_SIZE}" in results[index].details() and member in results[index].details()
    # The refused requests were answered at once, before the queued ones ended their 0.5 s wait.
    assert set(finished[:len(refused)]) == set(refused), finished
    assert wait_for_no_pending(server) == 0
    # Still serving once the queue has drained.
    assert probabilities(stub.ModelInfer(infer_request(member, tiny_repository.images(1)))).shape[0] == 1


def test_an_expired_deadline_is_answered_at_once_and_dropped_before_compute(batching_server, tiny_repository):
    server = batching_server
    stub = server.stub()
    member = tiny_repository.members[1]
    before = statistics(stub, member)
    expired_before = metric(scrape(server), "ensemble_server_requests_total", model=member, outcome="deadline_exceeded")
    patient_images = tiny_repository.images(1, seed=1)
    patient = stub.ModelInfer.future(infer_request(member, patient_images), timeout=30)
    hurried = stub.ModelInfer.future(infer_request(member, tiny_repository.images(1, seed=2)),
                                     timeout=0.1)  # shorter than the 0.5 s the batcher waits  # fmt: skip
    with pytest.raises(grpc.RpcError) as error:
        hurried.result()
    assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    # Answered at its deadline, while the batch it would have joined was still gathering.
    assert not patient.done()
    np.testing.assert_allclose(probabilities(patient.result()),
                               tiny_repository.expected_probabilities(member, patient_images), rtol=1e-5, atol=1e-6)
    # That batch ran the patient request alone: the expired one was dropped before compute.
    after = statistics(stub, member)
    assert after.execution_count - before.execution_count == 1
    assert after.inference_count - before.inference_count == 1
    assert after.inference_stats.fail.count - before.inference_stats.fail.count == 1
    assert wait_for_no_pending(server) == 0
    expired = metric(scrape(server), "ensemble_server_requests_total", model=member, outcome="deadline_exceeded")
    assert expired - expired_before == 1


def test_without_dynamic_batching_every_request_runs_alone(start_server, tiny_repository):
    # Set through the environment, as a container would; --model loads one model only.
    server = start_server(tiny_repository, "--model", tiny_repository.members[0],
                          env={"ENSEMBLE_SERVER_DYNAMIC_BATCHING": "false",
                               "ENSEMBLE_SERVER_MAX_QUEUE_DELAY_US": str(QUEUE_DELAY_US)})
    stub = server.stub()
    member = tiny_repository.members[0]
    assert not stub.ModelConfig(pb.ModelConfigRequest(name=member)).config.HasField("dynamic_batching")
    before = statistics(stub, member)
    send_together(stub, [infer_request(member, tiny_repository.images(1)) for _ in range(5)])
    after = statistics(stub, member)
    assert after.execution_count - before.execution_count == 5
    assert [entry.batch_size for entry in after.batch_stats] == [1]

    index = {model.name: model for model in stub.RepositoryIndex(pb.RepositoryIndexRequest()).models}
    assert index[member].state == "READY"
    assert index[tiny_repository.ensemble].state == "UNAVAILABLE"
    assert "not selected" in index[tiny_repository.ensemble].reason
    with pytest.raises(grpc.RpcError) as error:
        stub.ModelInfer(infer_request(tiny_repository.ensemble, tiny_repository.images(1)))
    assert error.value.code() == grpc.StatusCode.NOT_FOUND

    # SIGINT (Ctrl-C) stops it as cleanly as SIGTERM (see test_server_lifecycle.py).
    server.send_signal(signal.SIGINT)
    assert server.process.wait(timeout=30) == 0
