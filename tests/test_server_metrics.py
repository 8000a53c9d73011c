"""The Prometheus endpoint of the real server, scraped and parsed with prometheus_client."""

from __future__ import annotations

import grpc
import pytest

from ensemble_serving.protocol import grpc_service_pb2 as pb
from tests.support.metrics import scrape_families
from tests.support.requests import infer_request

PREFIX = "ensemble_server_"
EXPECTED_FAMILIES = {
    "requests": "counter",
    "executions": "counter",
    "request_duration_seconds": "histogram",
    "queue_duration_seconds": "histogram",
    "compute_duration_seconds": "histogram",
    "batch_size": "histogram",
    "pending_requests": "gauge",
    "model_load_duration_seconds": "gauge",
    "model_execution_provider_info": "gauge",
    "ready": "gauge",
    "model_load_failures": "counter",  # tests/test_faults.py checks its values
    "unauthenticated_requests": "counter",  # tests/test_security.py checks its values
}


def sample(families, name: str, suffix: str = "", **labels) -> float:
    family = families[PREFIX + name]
    matches = [s.value for s in family.samples
               if s.name == PREFIX + name + suffix and all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(matches) == 1, (name, suffix, labels, [s for s in family.samples][:5])
    return matches[0]


@pytest.fixture(scope="module")
def traffic(server, tiny_repository):
    """Some successes, one bad request and one unknown model, then a scrape."""
    stub = server.stub()
    before = scrape_families(server)
    for count in (1, 2, 3):
        stub.ModelInfer(infer_request(tiny_repository.ensemble, tiny_repository.images(count)))
    for request in (infer_request(tiny_repository.ensemble, tiny_repository.images(1), name="pixels"),
                    infer_request("no-such-model", tiny_repository.images(1))):
        with pytest.raises(grpc.RpcError):
            stub.ModelInfer(request)
    return before, scrape_families(server), stub


def test_metric_families_follow_prometheus_conventions(traffic):
    _, families, _ = traffic
    ours = {name[len(PREFIX):]: family.type for name, family in families.items() if name.startswith(PREFIX)}
    assert EXPECTED_FAMILIES.items() <= ours.items()
    for name, family in families.items():
        if name.startswith(PREFIX) and family.type == "counter":
            assert all(s.name.endswith("_total") for s in family.samples)
        if name.startswith(PREFIX) and family.type == "histogram" and "duration" in name:
            assert name.endswith("_seconds")  # base units


def test_requests_are_counted_by_outcome(traffic, tiny_repository):
    before, after, _ = traffic
    ensemble = {"model": tiny_repository.ensemble, "version": "1", "protocol": "grpc"}

    def delta(outcome, **labels):
        return (sample(after, "requests", "_total", outcome=outcome, **labels)
                - sample(before, "requests", "_total", outcome=outcome, **labels))

    assert delta("success", **ensemble) == 3
    assert delta("invalid_argument", **ensemble) == 1
    assert delta("not_found", model="", version="", protocol="grpc") >= 1  # unknown names are not used as labels
    latency_count = (sample(after, "request_duration_seconds", "_count", **ensemble)
                     - sample(before, "request_duration_seconds", "_count", **ensemble))
    assert latency_count == 4


def test_batch_and_latency_histograms_agree_with_statistics(traffic, tiny_repository):
    _, families, stub = traffic
    member = {"model": tiny_repository.members[0], "version": "1"}
    stats = stub.ModelStatistics(pb.ModelStatisticsRequest(name=member["model"])).model_stats[0]
    assert sample(families, "batch_size", "_sum", **member) == stats.inference_count
    assert sample(families, "batch_size", "_count", **member) == stats.execution_count
    assert sample(families, "executions", "_total", **member) == stats.execution_count
    assert sample(families, "queue_duration_seconds", "_count", **member) == stats.inference_stats.queue.count
    assert sample(families, "compute_duration_seconds", "_count", **member) == stats.execution_count
    buckets = [s for s in families[PREFIX + "compute_duration_seconds"].samples
               if s.name.endswith("_bucket") and s.labels["model"] == member["model"]]
    assert buckets[-1].labels["le"] == "+Inf" and buckets[-1].value == stats.execution_count


def test_gauges_pending_load_provider_ready(traffic, tiny_repository):
    _, families, _ = traffic
    for model in tiny_repository.members:
        labels = {"model": model, "version": "1"}
        assert sample(families, "pending_requests", **labels) == 0
        assert sample(families, "model_load_duration_seconds", **labels) > 0
        assert sample(families, "model_execution_provider_info", provider="CPUExecutionProvider", **labels) == 1
    assert sample(families, "ready") == 1
