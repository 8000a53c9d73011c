"""The spans of an inference request (OpenTelemetry SDK, exported over OTLP/HTTP).

Imported only when tracing is on (server/observability/tracing.py). One trace per request:

  infer <model>                 SERVER  the request, HTTP or gRPC, from the transport's
  |                                     hand-off to its answer; continues the client's
  |                                     W3C traceparent (HTTP header, gRPC metadata)
  +- step <member>              an ensemble step: submitted to the member's batcher ... answered
  |  +- queue <member>          waiting in that batcher's queue
  |  +- batch <member>          the execution of the batch it joined (see below)
  +- queue <model>, batch <model>   the same directly under the request for a plain model

A batch serves several requests, often of several traces: its span is the child of the
first traced request (or step) in it and carries a link to every traced request (or step)
of the batch, so each trace finds the execution it waited for. Requests a sampler left out
make no span at all, in the batcher or anywhere: `start_request` returns None for them.

Attributes (ATTRIBUTE_*): model, version, protocol, batch size (images) and outcome ("ok",
or the error's gRPC code in lower case: invalid_argument, not_found, deadline_exceeded, ...).
A failed request, step or batch also gets the ERROR status with the error's message.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Mapping

from opentelemetry import propagate, trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import Link, Span, SpanKind, Status, StatusCode

DEFAULT_SERVICE_NAME = "ensemble-serving"
DEFAULT_ENDPOINT = "http://localhost:4318"

ATTRIBUTE_MODEL = "model.name"
ATTRIBUTE_VERSION = "model.version"
ATTRIBUTE_PROTOCOL = "inference.protocol"  # "http" | "grpc"
ATTRIBUTE_BATCH_SIZE = "inference.batch_size"  # images: of the request, or of the whole batch
ATTRIBUTE_OUTCOME = "inference.outcome"
ATTRIBUTE_BATCH_REQUESTS = "inference.batch.requests"  # requests in a batch, traced or not
ATTRIBUTE_ENSEMBLE = "inference.ensemble"  # a step's ensemble
OK = "ok"

# The semantic conventions' attributes of each transport's request span.
_PROTOCOL_ATTRIBUTES = {
    "grpc": {"rpc.system": "grpc", "rpc.service": "inference.GRPCInferenceService", "rpc.method": "ModelInfer"},
    "http": {"http.request.method": "POST"},
}


class RequestTracer:
    """Starts and ends the spans; every method is called only while tracing is on."""

    def __init__(self, provider: TracerProvider, endpoint: str):
        self._provider = provider
        self._endpoint = endpoint
        self._tracer = provider.get_tracer("ensemble-serving")
        # The batcher times requests on the monotonic clock; spans carry wall-clock times.
        self._wall_offset_ns = time.time_ns() - time.monotonic_ns()

    @classmethod
    def from_environment(cls, trace_rate: float | None, resource_attributes: dict[str, str]) -> RequestTracer:
        """The SDK configured from the OTEL_* variables; `trace_rate` replaces their sampler."""
        sampler = ParentBased(TraceIdRatioBased(trace_rate)) if trace_rate is not None else None  # None: the env's
        resource = Resource.create(resource_attributes)
        if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):  # no OTEL_SERVICE_NAME
            resource = resource.merge(Resource({SERVICE_NAME: DEFAULT_SERVICE_NAME}))
        provider = TracerProvider(sampler=sampler, resource=resource)
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        return cls(provider, _endpoint())

    def describe(self) -> str:
        service = self._provider.resource.attributes.get(SERVICE_NAME)
        return f"service {service}, sampler {self._provider.sampler.get_description()}, OTLP/HTTP to {self._endpoint}"

    def shutdown(self) -> None:
        self._provider.shutdown()  # exports what the batch processor still holds

    # -- the request ---------------------------------------------------------------------------
    def start_request(self, model: str, protocol: str, carrier) -> Span | None:
        """The request's span, continuing the trace in `carrier` (HTTP headers as a dict, or
        gRPC's invocation metadata) when it has one; None when the sampler leaves it out."""
        parent = propagate.extract(_as_mapping(carrier)) if carrier else None
        attributes = {ATTRIBUTE_MODEL: model, ATTRIBUTE_PROTOCOL: protocol, **_PROTOCOL_ATTRIBUTES.get(protocol, {})}
        span = self._tracer.start_span(f"infer {model}", context=parent, kind=SpanKind.SERVER, attributes=attributes)
        return span if span.is_recording() else None

    @staticmethod
    def request_decoded(span: Span, version: str, batch_size: int) -> None:
        span.set_attributes({ATTRIBUTE_VERSION: version, ATTRIBUTE_BATCH_SIZE: batch_size})

    @staticmethod
    def end_request(span: Span, outcome: str, error: BaseException | None) -> None:
        _end(span, outcome, error)

    # -- an ensemble's steps -------------------------------------------------------------------
    def start_step(self, parent: Span, ensemble: str, model: str, version: str) -> Span:
        return self._tracer.start_span(f"step {model}", context=trace.set_span_in_context(parent), attributes={
            ATTRIBUTE_ENSEMBLE: ensemble, ATTRIBUTE_MODEL: model, ATTRIBUTE_VERSION: version})

    @staticmethod
    def end_steps(spans: Iterable[Span], error: BaseException | None) -> None:
        outcome = OK if error is None else _outcome(error)
        for span in spans:
            _end(span, outcome, error)

    # -- the batcher's side --------------------------------------------------------------------
    def start_batch(self, model: str, version: str, tickets: list, started_ns: int, elements: int) -> Span | None:
        """When an instance takes `tickets` (monotonic `started_ns`): each traced ticket's
        queue span, ended now, and the batch's span, linked to them all; None when no ticket
        of the batch is traced. A ticket's `trace` is the span it belongs to, or None."""
        owners = [ticket.trace for ticket in tickets if ticket.trace is not None]
        if not owners:
            return None
        started = started_ns + self._wall_offset_ns
        identity = {ATTRIBUTE_MODEL: model, ATTRIBUTE_VERSION: version}
        for ticket in tickets:
            if ticket.trace is not None:
                arrived = ticket.arrival_ns + self._wall_offset_ns
                queued = self._tracer.start_span(f"queue {model}", context=trace.set_span_in_context(ticket.trace),
                                                 attributes=identity, start_time=arrived)
                queued.end(end_time=started)
        return self._tracer.start_span(
            f"batch {model}", context=trace.set_span_in_context(owners[0]), start_time=started,
            links=[Link(owner.get_span_context()) for owner in owners],
            attributes={**identity, ATTRIBUTE_BATCH_SIZE: elements, ATTRIBUTE_BATCH_REQUESTS: len(tickets)})

    @staticmethod
    def end_batch(span: Span, error: BaseException | None) -> None:
        _end(span, OK if error is None else "internal", error)


def _end(span: Span, outcome: str, error: BaseException | None) -> None:
    span.set_attribute(ATTRIBUTE_OUTCOME, outcome)
    if outcome != OK:
        span.set_status(Status(StatusCode.ERROR, _message(error) or outcome))
    span.end()


def _outcome(error: BaseException) -> str:
    if isinstance(error, GeneratorExit):  # the request was abandoned (its call ended) while this waited
        return "cancelled"
    code = getattr(error, "code", None)  # an InferenceError's grpc.StatusCode
    return code.name.lower() if hasattr(code, "name") else "internal"


def _message(error: BaseException | None) -> str:
    if error is None or isinstance(error, GeneratorExit):
        return ""
    return getattr(error, "message", None) or f"{type(error).__name__}: {error}"


def _as_mapping(carrier) -> Mapping[str, str]:
    """HTTP headers are a dict already; gRPC's metadata is a sequence of (key, value)."""
    return carrier if isinstance(carrier, Mapping) else dict(carrier)


def _endpoint() -> str:
    """Where the exporter sends, as it works it out from the variables (for the log line)."""
    traces = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    if traces:
        return traces
    return os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", DEFAULT_ENDPOINT).rstrip("/") + "/v1/traces"
