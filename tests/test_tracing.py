"""OpenTelemetry tracing (server/observability/tracing.py, tracing_spans.py), end to end:
real servers export over OTLP/HTTP to a real receiver on a real port
(tests/support/otlp_receiver.py), which decodes the protobuf payloads with
opentelemetry-proto. Checked: the span tree of one ensemble request over HTTP that
carries a client's traceparent (parents, the batch spans' links, the attributes), a gRPC
request with traceparent metadata, one batch span linked to every request of its batch,
an error's outcome, an unsampled traceparent honoured, nothing exported with tracing off,
and a server without the `tracing` extra (OpenTelemetry blocked from import)."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import threading
import time

import pytest

pytest.importorskip("opentelemetry.sdk.trace", reason="the `tracing` extra is not installed")

from server.observability import tracing  # noqa: E402
from tests.support.http import binary_infer_body, call  # noqa: E402
from tests.support.otlp_receiver import OtlpReceiver, ReceivedSpan, span_tree  # noqa: E402
from tests.support.requests import infer_request  # noqa: E402
from tests.support.servers import ROOT, RunningServer, free_port, server_command, wait_until_ready  # noqa: E402

SERVICE = "ensemble-serving-under-test"
# Requests wait this long for company (Triton's rule), so that concurrent ones share a batch.
QUEUE_DELAY_US = 250_000
OTEL_VARIABLES = ("OTEL_SDK_DISABLED", "OTEL_TRACES_SAMPLER", "OTEL_TRACES_SAMPLER_ARG", "OTEL_EXPORTER_OTLP_PROTOCOL",
                  "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_PROPAGATORS",
                  "OTEL_RESOURCE_ATTRIBUTES")  # fmt: skip
SHOWN = ("model.name", "model.version", "inference.protocol", "inference.ensemble", "inference.batch_size",
         "inference.outcome", "inference.batch.requests")  # fmt: skip


def _otel_env(receiver: OtlpReceiver) -> dict[str, str]:
    """The exporter pointed at `receiver`, exporting every 50 ms."""
    return {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint, "OTEL_SERVICE_NAME": SERVICE,
            "OTEL_BSP_SCHEDULE_DELAY": "50"}


@pytest.fixture(scope="module", autouse=True)
def _no_otel_settings_from_outside():
    """The servers here inherit the environment: whatever it says about OpenTelemetry is
    set aside for this module, and put back after it."""
    saved = {name: os.environ.pop(name) for name in OTEL_VARIABLES if name in os.environ}
    yield
    os.environ.update(saved)


def _traceparent(sampled: bool = True) -> tuple[str, str, str]:
    """(traceparent, its trace id, its span id): a client's span, as W3C Trace Context writes it."""
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return f"00-{trace_id}-{span_id}-{'01' if sampled else '00'}", trace_id, span_id


@pytest.fixture(scope="module")
def receiver():
    with OtlpReceiver() as running:
        yield running


@pytest.fixture(scope="module")
def traced_server(start_server, tiny_repository, receiver) -> RunningServer:
    """Every request traced; batching as the repository's config.pbtxt says."""
    return start_server(tiny_repository, "--trace-rate", "1.0", env=_otel_env(receiver))


@pytest.fixture(scope="module")
def gathering_server(start_server, tiny_repository, receiver) -> RunningServer:
    """Every request traced, and each waits QUEUE_DELAY_US for others to share its batch."""
    return start_server(tiny_repository, "--trace-rate", "1.0", "--max-queue-delay-us", str(QUEUE_DELAY_US),
                        "--queue-delay", "triton", env=_otel_env(receiver))  # fmt: skip


def _only(spans: list[ReceivedSpan], **where) -> ReceivedSpan:
    found = [span for span in spans if all(getattr(span, key) == value for key, value in where.items())]
    assert len(found) == 1, f"expected one span with {where}, got {len(found)}:\n{span_tree(spans)}"
    return found[0]


def _children(spans: list[ReceivedSpan], parent: ReceivedSpan) -> list[ReceivedSpan]:
    return [span for span in spans if span.parent_span_id == parent.span_id]


def _check_queue_and_batch(spans: list[ReceivedSpan], owner: ReceivedSpan, model: str, batch_size: int) -> None:
    """`owner` (a request or a step) has one queue span and one batch span, the batch linked to it."""
    queue = _only(_children(spans, owner), name=f"queue {model}")
    batch = _only(_children(spans, owner), name=f"batch {model}")
    assert (owner.trace_id, owner.span_id) in batch.links
    assert batch.attributes["model.name"] == queue.attributes["model.name"] == model
    assert batch.attributes["model.version"] == "1"
    assert batch.attributes["inference.batch_size"] == batch_size
    assert batch.attributes["inference.outcome"] == "ok"
    assert queue.end_ns == batch.start_ns, "the queue wait ends when the batch starts"
    assert owner.start_ns <= queue.start_ns and batch.end_ns <= owner.end_ns


def test_http_ensemble_request_continues_the_clients_trace(traced_server, tiny_repository, receiver):
    traceparent, trace_id, client_span = _traceparent()
    unsampled, unsampled_trace, _ = _traceparent(sampled=False)
    body, headers = binary_infer_body(tiny_repository.images(1))
    # A client that chose not to sample its trace is honoured (parent-based sampling) ...
    assert call(traced_server.http_port, "POST", f"/v2/models/{tiny_repository.ensemble}/infer", body,
                {**headers, "traceparent": unsampled}).status == 200  # fmt: skip
    answer = call(traced_server.http_port, "POST", f"/v2/models/{tiny_repository.ensemble}/infer", body,
                  {**headers, "traceparent": traceparent})  # fmt: skip
    assert answer.status == 200, answer.body

    steps = [*tiny_repository.members, tiny_repository.average]
    expected = 1 + 3 * len(steps)  # the request; a step, its queue wait and its batch per step
    receiver.wait_for(lambda r: len(r.trace(trace_id)) >= expected)
    time.sleep(0.3)  # nothing more may come
    spans = receiver.trace(trace_id)
    print(f"\nThe span tree of one HTTP request to ensemble {tiny_repository.ensemble!r} with the client's "
          f"traceparent {traceparent}, as the OTLP receiver got it:\n{span_tree(spans, SHOWN)}")
    assert len(spans) == expected

    request = _only(spans, parent_span_id=client_span)
    assert (request.name, request.kind, request.service) == (f"infer {tiny_repository.ensemble}", "SERVER", SERVICE)
    assert request.attributes == {"model.name": tiny_repository.ensemble, "model.version": "1",
                                  "inference.protocol": "http", "http.request.method": "POST",
                                  "inference.batch_size": 1, "inference.outcome": "ok"}  # fmt: skip
    step_spans = {span.attributes["model.name"]: span for span in _children(spans, request)}
    assert sorted(step_spans) == sorted(steps)
    for model, step in step_spans.items():
        assert step.name == f"step {model}"
        assert step.attributes["inference.ensemble"] == tiny_repository.ensemble
        assert step.attributes["inference.outcome"] == "ok"
        assert request.start_ns <= step.start_ns and step.end_ns <= request.end_ns
        _check_queue_and_batch(spans, step, model, batch_size=1)
    average = step_spans[tiny_repository.average]
    assert all(step_spans[member].end_ns <= average.start_ns for member in tiny_repository.members), \
        "the average runs after its members"
    # ... no span at all for its request.
    assert receiver.trace(unsampled_trace) == []


def test_grpc_request_continues_the_trace_in_its_metadata(traced_server, tiny_repository, receiver):
    stub = traced_server.stub()
    member = tiny_repository.members[0]
    traceparent, trace_id, client_span = _traceparent()
    stub.ModelInfer(infer_request(member, tiny_repository.images(2)), metadata=(("traceparent", traceparent),),
                    timeout=30)  # fmt: skip
    receiver.wait_for(lambda r: len(r.trace(trace_id)) >= 3)
    spans = receiver.trace(trace_id)
    print(f"\ngRPC ModelInfer to {member!r} with traceparent metadata:\n{span_tree(spans, SHOWN)}")
    request = _only(spans, parent_span_id=client_span)
    assert (request.name, request.kind) == (f"infer {member}", "SERVER")
    assert request.attributes == {"model.name": member, "model.version": "1", "inference.protocol": "grpc",
                                  "rpc.system": "grpc", "rpc.service": "inference.GRPCInferenceService",
                                  "rpc.method": "ModelInfer", "inference.batch_size": 2,
                                  "inference.outcome": "ok"}  # fmt: skip
    _check_queue_and_batch(spans, request, member, batch_size=2)
    assert len(spans) == 3


def test_failed_request_has_its_error_code_as_outcome(traced_server, tiny_repository, receiver):
    traceparent, trace_id, client_span = _traceparent()
    bad = infer_request(tiny_repository.members[0], tiny_repository.images(1), datatype="FP32")
    with pytest.raises(Exception) as raised:
        traced_server.stub().ModelInfer(bad, metadata=(("traceparent", traceparent),), timeout=30)
    assert raised.value.code().name == "INVALID_ARGUMENT"
    receiver.wait_for(lambda r: len(r.trace(trace_id)) >= 1)
    time.sleep(0.3)
    request = _only(receiver.trace(trace_id), parent_span_id=client_span)
    assert request.attributes["inference.outcome"] == "invalid_argument"
    assert request.status == "ERROR" and "FP32" in request.status_message
    assert len(receiver.trace(trace_id)) == 1, "refused before any queue"


def test_one_batch_span_is_linked_to_every_request_in_its_batch(gathering_server, tiny_repository, receiver):
    stub = gathering_server.stub()
    member = tiny_repository.members[1]
    clients = [_traceparent() for _ in range(4)]
    start = threading.Barrier(len(clients))
    errors = []

    def send(traceparent: str) -> None:
        start.wait()
        try:
            stub.ModelInfer(infer_request(member, tiny_repository.images(1)), metadata=(("traceparent", traceparent),),
                            timeout=30)  # fmt: skip
        except Exception as error:  # reported below
            errors.append(error)

    threads = [threading.Thread(target=send, args=(traceparent,)) for traceparent, _, _ in clients]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    trace_ids = {trace_id for _, trace_id, _ in clients}
    receiver.wait_for(lambda r: all(len(r.trace(trace_id)) >= 2 for trace_id in trace_ids)
                      and sum(1 for s in r.spans if s.name == f"batch {member}" and s.trace_id in trace_ids) >= 1)
    time.sleep(0.3)
    spans = [span for trace_id in trace_ids for span in receiver.trace(trace_id)]
    requests = {span.span_id: span for span in spans if span.name == f"infer {member}"}
    batches = [span for span in spans if span.name == f"batch {member}"]
    print(f"\n{len(clients)} concurrent gRPC requests to {member!r}, {len(batches)} batch span(s):\n"
          f"{span_tree(spans, SHOWN)}")
    assert len(requests) == len(clients)
    linked = [span_id for batch in batches for _, span_id in batch.links]
    assert sorted(linked) == sorted(requests), "each request linked from exactly one batch"
    for batch in batches:
        assert batch.parent_span_id in {span_id for _, span_id in batch.links}, "a child of one of its requests"
        assert batch.attributes["inference.batch.requests"] == len(batch.links) == batch.attributes[
            "inference.batch_size"]
        for trace_id, span_id in batch.links:
            assert requests[span_id].trace_id == trace_id
    assert max(len(batch.links) for batch in batches) > 1, "the queue delay gathered requests into one batch"


def test_nothing_is_exported_with_tracing_off(start_server, tiny_repository):
    with OtlpReceiver() as receiver:
        server = start_server(tiny_repository, env=_otel_env(receiver))  # the same, without --trace-rate
        traceparent, _, _ = _traceparent()
        body, headers = binary_infer_body(tiny_repository.images(1))
        for _ in range(3):
            answer = call(server.http_port, "POST", f"/v2/models/{tiny_repository.ensemble}/infer", body,
                          {**headers, "traceparent": traceparent})  # fmt: skip
            assert answer.status == 200
            server.stub().ModelInfer(infer_request(tiny_repository.ensemble, tiny_repository.images(1)),
                                     metadata=(("traceparent", traceparent),), timeout=30)  # fmt: skip
        time.sleep(1.0)  # 20 export periods
        assert receiver.posts == 0 and receiver.spans == []
        assert "tracing on" not in server.log()


def test_every_worker_traces(start_server, tiny_repository, receiver):
    """--workers 2: each worker process starts its own exporter (the supervisor none)."""
    server = start_server(tiny_repository, "--workers", "2", "--trace-rate", "1.0", env=_otel_env(receiver))
    body, headers = binary_infer_body(tiny_repository.images(1))
    clients = [_traceparent() for _ in range(6)]
    for traceparent, _, _ in clients:  # a new connection each: the kernel spreads them over the workers
        answer = call(server.http_port, "POST", f"/v2/models/{tiny_repository.members[0]}/infer", body,
                      {**headers, "traceparent": traceparent})  # fmt: skip
        assert answer.status == 200
    receiver.wait_for(lambda r: all(len(r.trace(trace_id)) == 3 for _, trace_id, _ in clients))
    for _, trace_id, client_span in clients:
        assert _only(receiver.trace(trace_id), parent_span_id=client_span).attributes["inference.protocol"] == "http"
    assert server.log().count("tracing on (--trace-rate 1)") == 2, server.log()


def test_a_collector_that_is_down_costs_no_request(start_server, tiny_repository):
    """Export fails (nothing listens at the endpoint): every request is still answered, and
    SIGTERM still ends the server, after at most OTEL_EXPORTER_OTLP_TIMEOUT of trying."""
    nobody = f"http://127.0.0.1:{free_port()}"
    server = start_server(tiny_repository, "--trace-rate", "1.0",
                          env={"OTEL_EXPORTER_OTLP_ENDPOINT": nobody, "OTEL_BSP_SCHEDULE_DELAY": "50",
                               "OTEL_EXPORTER_OTLP_TIMEOUT": "2"})  # fmt: skip
    body, headers = binary_infer_body(tiny_repository.images(1))
    for _ in range(20):
        assert call(server.http_port, "POST", f"/v2/models/{tiny_repository.ensemble}/infer", body,
                    headers).status == 200  # fmt: skip
    started = time.monotonic()
    assert server.stop() == 0
    assert time.monotonic() - started < 20, "SIGTERM to exit"


# -- without the `tracing` extra -----------------------------------------------------------
BLOCK_OPENTELEMETRY = ("import runpy, sys; sys.modules['opentelemetry'] = None; sys.argv[0] = 'server'; "
                       "runpy.run_module('server', run_name='__main__', alter_sys=True)")  # fmt: skip


def _server_without_opentelemetry(repository, log_path, *flags: str) -> RunningServer:
    """`python -m server` in a process where `import opentelemetry` fails, as without the extra."""
    grpc_port, metrics_port, http_port = free_port(), free_port(), free_port()
    command = server_command(repository, grpc_port, metrics_port, *flags, http_port=http_port)
    command = [sys.executable, "-c", BLOCK_OPENTELEMETRY, *command[3:]]  # after `python -m server`
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(command, cwd=ROOT, stdout=log_file, stderr=subprocess.STDOUT)
    return RunningServer(process, grpc_port, metrics_port, log_path, http_port)


def test_without_the_extra_the_server_serves_and_tracing_fails_clearly(tiny_repository, tmp_path):
    server = _server_without_opentelemetry(tiny_repository.path, tmp_path / "off.log")
    try:
        wait_until_ready(server)
        traceparent, _, _ = _traceparent()
        body, headers = binary_infer_body(tiny_repository.images(1))
        answer = call(server.http_port, "POST", f"/v2/models/{tiny_repository.ensemble}/infer", body,
                      {**headers, "traceparent": traceparent})  # fmt: skip
        assert answer.status == 200
    finally:
        assert server.stop() == 0, server.log()
    asked = _server_without_opentelemetry(tiny_repository.path, tmp_path / "on.log", "--trace-rate", "0.5")
    assert asked.process.wait(60) == 2
    assert ("server: error: tracing is on (--trace-rate 0.5) but OpenTelemetry is not installed (no module "
            "opentelemetry.sdk.trace): pip install 'ensemble-serving[tracing]', or leave tracing off") in asked.log()


# -- the switch ------------------------------------------------------------------------------
@pytest.mark.parametrize(("rate", "environ", "on"), [
    (None, {}, False),
    (0.0, {"OTEL_TRACES_SAMPLER": "always_on"}, False),  # the flag wins over the environment
    (0.01, {}, True),
    (1.0, {"OTEL_TRACES_SAMPLER": "always_off"}, True),
    (None, {"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.1"}, True),
    (None, {"OTEL_TRACES_SAMPLER": "parentbased_always_off"}, False),
    (1.0, {"OTEL_SDK_DISABLED": "true"}, False),  # the standard off switch wins over everything
])  # fmt: skip
def test_tracing_is_on_only_when_asked_for(rate, environ, on):
    assert tracing.requested(rate, environ) is on
    assert tracing.check(rate, environ) is on


@pytest.mark.parametrize(("rate", "environ", "message"), [
    (None, {"OTEL_TRACES_SAMPLER": "sometimes"}, "OTEL_TRACES_SAMPLER 'sometimes' is not a sampler; use one of "
                                                 "always_on, traceidratio,"),
    (None, {"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "lots"},
     "needs OTEL_TRACES_SAMPLER_ARG, the fraction of traces to keep, between 0 and 1; got 'lots'"),
    (None, {"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "1.5"}, "got '1.5'"),
    (0.5, {"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}, "OTEL_EXPORTER_OTLP_PROTOCOL 'grpc' is not supported: the server "
                                                   "exports OTLP over HTTP/protobuf"),
])  # fmt: skip
def test_bad_tracing_settings_are_refused_with_the_reason(rate, environ, message):
    with pytest.raises(tracing.TracingConfigError) as refused:
        tracing.check(rate, environ)
    assert message in str(refused.value)


def test_the_trace_rate_flag_is_explained_in_help():
    help_text = subprocess.run([sys.executable, "-m", "server", "--help"], cwd=ROOT, capture_output=True, text=True,
                               check=True).stdout  # fmt: skip
    assert "--trace-rate" in help_text and "ENSEMBLE_SERVER_TRACE_RATE" in help_text
    assert "OTEL_EXPORTER_OTLP_ENDPOINT" in help_text and "traceparent" in help_text


def test_the_benchmarks_sink_counts_what_an_exporter_sends(tmp_path):
    """benchmarks/otlp_sink.py, the receiver the cost measurement exports to, fed by the SDK's own exporter."""
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor

    port = free_port()
    sink = subprocess.Popen([sys.executable, str(ROOT / "benchmarks" / "otlp_sink.py"), "--port", str(port),
                             "--every", "0.2", "--json", str(tmp_path / "totals.json")], stdout=subprocess.PIPE,
                            text=True)  # fmt: skip
    try:
        assert "listening" in sink.stdout.readline()
        provider = TracerProvider()
        exporter = OTLPSpanExporter(endpoint=f"http://127.0.0.1:{port}/v1/traces")
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        for index in range(5):
            provider.get_tracer("test").start_span(f"span {index}").end()
        provider.shutdown()
    finally:
        sink.terminate()
        output = sink.communicate(timeout=30)[0]
    assert sink.returncode == 0, output
    totals = json.loads((tmp_path / "totals.json").read_text())
    assert (totals["posts"], totals["spans"], totals["bad"]) == (5, 5, 0), output
