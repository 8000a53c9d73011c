"""`server --workers N`: worker processes on shared ports, one server to its clients."""

from __future__ import annotations

import signal
import socket
import subprocess

import grpc
import numpy as np
import psutil
import pytest
import requests

from ensemble_serving.protocol import grpc_service_pb2 as pb
from ensemble_serving.protocol import grpc_service_pb2_grpc as pb_grpc
from server.observability.statistics import merge_statistics
from tests.support.requests import infer_request, probabilities
from tests.support.servers import ROOT, free_port, listening_workers, server_command, wait_until

TOKEN = "workers-test-token-0123456789abcdef"
AUTH = (("authorization", f"Bearer {TOKEN}"),)
CONNECTIONS = 16  # all on one worker by chance: 2 in 2**16


def _metric(server, name: str, **labels) -> float:
    text = requests.get(server.metrics_url, timeout=5).text
    wanted = ",".join(f'{key}="{value}"' for key, value in sorted(labels.items()))
    for line in text.splitlines():
        series, _, value = line.rpartition(" ")
        if series == (f"{name}{{{wanted}}}" if labels else name):
            return float(value)
    raise AssertionError(f"no series {name}{{{wanted}}} in:\n{text}")


@pytest.fixture
def two_workers(start_server, tiny_repository):
    server = start_server(tiny_repository, "--workers", "2", wait=False,
                          env={"ENSEMBLE_SERVER_AUTH_TOKENS": TOKEN})  # fmt: skip
    wait_until(server, lambda: _all_ready(server))
    return server


def _all_ready(server) -> bool:
    """Both workers started and ready: the supervisor's ready gauge is their minimum."""
    try:
        return len(listening_workers(server)) == 2 and _metric(server, "ensemble_server_ready") == 1.0
    except (requests.ConnectionError, AssertionError):
        return False  # the metrics port is not up yet, or no worker has written the gauge


@pytest.fixture
def connections(two_workers):
    """stubs(n): n stubs, each on its own TCP connection (which the kernel gives to one worker)."""
    channels = []

    def stubs(count: int) -> list[pb_grpc.GRPCInferenceServiceStub]:
        # A local subchannel pool: channels to one address would otherwise share a connection.
        new = [grpc.insecure_channel(two_workers.grpc_address, options=[("grpc.use_local_subchannel_pool", 1)])
               for _ in range(count)]  # fmt: skip
        channels.extend(new)
        return [pb_grpc.GRPCInferenceServiceStub(channel) for channel in new]

    yield stubs
    for channel in channels:
        channel.close()


def test_workers_share_the_ports_and_report_as_one_server(two_workers, connections, tiny_repository):
    member = tiny_repository.members[0]
    stubs = connections(CONNECTIONS)
    images = tiny_repository.images(2, seed=3)
    expected = tiny_repository.expected_probabilities(member, images)
    for stub in stubs:
        for _ in range(3):
            answer = stub.ModelInfer(infer_request(member, images), metadata=AUTH, timeout=30)
            np.testing.assert_allclose(probabilities(answer), expected, atol=1e-5)

    # The connections went to both workers...
    port = two_workers.grpc_port
    per_worker = [sum(1 for c in worker.net_connections("tcp") if c.laddr.port == port and c.status == "ESTABLISHED")
                  for worker in listening_workers(two_workers)]  # fmt: skip
    assert min(per_worker) > 0, f"connections per worker: {per_worker}"

    # ...and whichever worker answers, ModelStatistics (gRPC and HTTP) counts both.
    requests_sent = CONNECTIONS * 3
    for stub in connections(4):
        stats = stub.ModelStatistics(pb.ModelStatisticsRequest(name=member), metadata=AUTH, timeout=10).model_stats
        assert [(s.name, s.inference_count, s.inference_stats.success.count) for s in stats] == [
            (member, requests_sent * 2, requests_sent)]
        assert sum(b.compute_infer.count for b in stats[0].batch_stats) == stats[0].execution_count
    http = requests.get(f"{two_workers.http_url}/v2/models/{member}/stats", timeout=10,
                        headers={"Authorization": f"Bearer {TOKEN}"}).json()  # fmt: skip
    assert http["model_stats"][0]["inference_count"] == requests_sent * 2
    # A client cannot pass for a sibling: without a token it is refused, as before.
    with pytest.raises(grpc.RpcError) as refused:
        stubs[0].ModelStatistics(pb.ModelStatisticsRequest(name=member), metadata=(("x-ensemble-sibling", "guess"),))
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED

    # /metrics, served by the supervisor, sums the workers.
    labels = {"model": member, "version": "1", "protocol": "grpc", "outcome": "success"}
    assert _metric(two_workers, "ensemble_server_requests_total", **labels) == requests_sent


def test_sigterm_drains_every_worker_then_exits_zero(two_workers, tiny_repository):
    workers = listening_workers(two_workers)
    two_workers.send_signal(signal.SIGTERM)
    assert two_workers.process.wait(timeout=60) == 0
    assert not any(worker.is_running() and worker.status() != psutil.STATUS_ZOMBIE for worker in workers)
    log = two_workers.log()
    assert log.count("SIGTERM received: shutting down") == 2 and "all workers stopped" in log


def test_workers_refuse_explicit_model_control(tiny_repository):
    command = server_command(tiny_repository.path, free_port(), free_port(), "--workers", "2",
                             "--model-control-mode", "explicit")  # fmt: skip
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "--workers > 1 needs --model-control-mode none or poll" in result.stderr


@pytest.mark.parametrize("reuse_port", [False, True], ids=["plain", "so_reuseport"])
def test_workers_refuse_a_port_in_use(tiny_repository, reuse_port):
    # Even a listener with SO_REUSEPORT (Triton's gRPC port has it) is not joined.
    with socket.socket() as taken:
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, int(reuse_port))
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        command = server_command(tiny_repository.path, port, free_port(), "--workers", "2")
        result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert f"cannot listen for gRPC on 127.0.0.1:{port}" in result.stderr


def test_merge_statistics_adds_up_workers():
    def part(count: int, last: int, batch_size: int) -> pb.ModelStatistics:
        stats = pb.ModelStatistics(name="m", version="1", last_inference=last, inference_count=count,
                                   execution_count=count)  # fmt: skip
        stats.inference_stats.success.count = count
        stats.inference_stats.success.ns = 10 * count
        stats.batch_stats.add(batch_size=batch_size).compute_infer.count = count
        return stats

    other = pb.ModelStatistics(name="n", version="1", inference_count=1)
    merged = merge_statistics([part(2, 100, 4), other, part(3, 50, 1)])
    assert [(s.name, s.inference_count, s.last_inference) for s in merged] == [("m", 5, 100), ("n", 1, 0)]
    assert (merged[0].inference_stats.success.count, merged[0].inference_stats.success.ns) == (5, 50)
    assert [(b.batch_size, b.compute_infer.count) for b in merged[0].batch_stats] == [(1, 3), (4, 2)]
