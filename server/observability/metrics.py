"""Prometheus metrics on the metrics port (docs/design.md §5).

Names follow Prometheus conventions (base units, `_total` counters, `_seconds`
histograms) and carry `model` and `version` labels:

  ensemble_server_requests_total{protocol,outcome}   ModelInfer calls (protocol grpc or http) by outcome: success,
                                                     invalid_argument, not_found, unavailable,
                                                     resource_exhausted, deadline_exceeded, cancelled,
                                                     internal
  ensemble_server_request_duration_seconds{protocol} end to end inside the server
  ensemble_server_queue_duration_seconds             arrival -> start of its batch's execution
  ensemble_server_compute_duration_seconds           one execution (batch forming + onnxruntime + split)
  ensemble_server_batch_size                         elements per execution
  ensemble_server_executions_total                   executions (compare with requests: batching)
  ensemble_server_pending_requests                   queued, not yet executing (read at scrape time)
  ensemble_server_model_load_duration_seconds        session creation + warm-up
  ensemble_server_model_execution_provider_info      1, with provider= the provider actually used,
                                                     requested= the first one asked for
  ensemble_server_ready                              1 when every model has loaded and not draining
  ensemble_server_model_load_failures_total{model}   models that failed to load (reason: the log line
                                                     and RepositoryIndex); only without --strict
  ensemble_server_model_loads_total{model,outcome}   loads and reloads (start-up and model control):
                                                     success or failure (the reason: log and RepositoryIndex)
  ensemble_server_model_unloads_total{model,outcome} unloads: success or failure
  ensemble_server_model_loaded_versions{model}       how many versions of the model are served now
  ensemble_server_unauthenticated_requests_total{reason}  calls refused for a missing or invalid
                                                     bearer token (--auth-tokens-file)
  ensemble_server_http_connections_closed_total{reason}  HTTP connections closed by the edge's limits:
                                                     header_timeout, keep_alive_timeout, max_connections
  ensemble_server_http_connections_open              HTTP connections open now
  ensemble_server_worker_restarts_total{worker}      --workers: dead workers restarted (the supervisor's)

With `--workers N` (server/process/workers.py) every worker writes its values to files
(prometheus_client's multiprocess mode) and the supervisor serves their sum: counters and
histograms add up, the pending gauge too, and the others take the live workers' maximum
(ready: their minimum). The pending gauge is then sampled once a second, and an unloaded
version's counters stay until the restart (only its gauges drop to 0): multiprocess mode
cannot remove series.

Each model version gets a `ModelMetrics` holding its pre-labelled children, so the
hot path does no label lookups. When a version is unloaded its series are removed
(`ModelMetrics.remove`): a scrape shows only versions that serve. Requests naming an unknown model are counted under
model="" (the name a client sent is not used as a label: it is unbounded).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, start_http_server

log = logging.getLogger(__name__)

PREFIX = "ensemble_server"
OUTCOMES = ("success", "invalid_argument", "not_found", "unavailable", "resource_exhausted",
            "deadline_exceeded", "cancelled", "internal")  # fmt: skip
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
PROTOCOLS = ("grpc", "http")
HTTP_CLOSE_REASONS = ("header_timeout", "keep_alive_timeout", "max_connections")
PENDING_SAMPLE_S = 1.0  # --workers: how often a worker writes its queues' lengths


class ModelMetrics:
    """The children of every per-model metric for one model version."""

    def __init__(self, metrics: ServerMetrics, model: str, version: str):
        labels = {"model": model, "version": version}
        self._requests = {(protocol, outcome): metrics.requests.labels(protocol=protocol, outcome=outcome, **labels)
                          for protocol in PROTOCOLS for outcome in OUTCOMES}
        self._request_duration = {protocol: metrics.request_duration.labels(protocol=protocol, **labels)
                                  for protocol in PROTOCOLS}
        self.queue_duration = metrics.queue_duration.labels(**labels)
        self.compute_duration = metrics.compute_duration.labels(**labels)
        self.batch_size = metrics.batch_size.labels(**labels)
        self.executions = metrics.executions.labels(**labels)
        self.pending = metrics.pending.labels(**labels)
        self._load_duration = metrics.load_duration.labels(**labels)
        self._provider = metrics.provider
        self._labels = labels
        self._server = metrics

    def report_pending(self, count: Callable[[], int]) -> None:
        """The pending gauge reads `count()` (at scrape time; with --workers, once a second)."""
        self._server.watch_pending(self.pending, count)

    def count_request(self, protocol: str, outcome: str, seconds: float) -> None:
        self._requests[protocol, outcome].inc()
        self._request_duration[protocol].observe(seconds)

    def record_batch(self, elements: int, compute_s: float, queued_ns: list[int]) -> None:
        """One execution of `elements` batch elements from len(queued_ns) requests."""
        self.executions.inc()
        self.batch_size.observe(elements)
        self.compute_duration.observe(compute_s)
        for ns in queued_ns:
            self.queue_duration.observe(ns / 1e9)

    def record_load(self, seconds: float, provider: str, requested: str) -> None:
        self._load_duration.set(seconds)
        self._provider.labels(provider=provider, requested=requested, **self._labels).set(1)

    def remove(self) -> None:
        """Drop every series of this model version (it was unloaded). Left behind, its
        gauges would go on claiming a loaded model, an execution provider and a queue,
        and the pending gauge's callback would keep the unloaded batcher alive."""
        server = self._server
        server.watch_pending(self.pending, None)
        if server.multiprocess:  # no removal there: the gauges at least stop claiming the version
            for gauge in (self.pending, self._load_duration):
                gauge.set(0)
            for values in _children_of_version(server.provider, self._labels["model"], self._labels["version"]):
                server.provider.labels(*values).set(0)
            return
        for family in (server.requests, server.request_duration, server.queue_duration, server.compute_duration,
                       server.batch_size, server.executions, server.pending, server.load_duration,
                       server.provider):  # fmt: skip
            _remove_version(family, self._labels["model"], self._labels["version"])


def _remove_version(family, model: str, version: str) -> None:
    """Remove every child of `family` labelled with this model and version, whatever its
    other labels (outcome, provider, ...)."""
    for values in _children_of_version(family, model, version):
        family.remove(*values)


def _children_of_version(family, model: str, version: str) -> list[tuple[str, ...]]:
    """The label values of `family`'s children for this model version. prometheus_client
    lists children only through its private `_labelnames` / `_metrics`."""
    names = family._labelnames
    with family._lock:
        children = list(family._metrics)
    found = []
    for values in children:
        labels = dict(zip(names, values))
        if labels.get("model") == model and labels.get("version") == version:
            found.append(values)
    return found


class ServerMetrics:
    def __init__(self, multiprocess: bool = False) -> None:
        """`multiprocess`: one of --workers' processes (PROMETHEUS_MULTIPROC_DIR is set)."""
        self.multiprocess = multiprocess
        disable_created_metrics()  # no `_created` series: they double the output and nobody graphs them
        self.registry = CollectorRegistry()
        labels = ("model", "version")
        kwargs = {"registry": self.registry}
        self.requests = Counter(f"{PREFIX}_requests", "Inference requests by protocol (grpc, http) and outcome "
                                "(gRPC status).", (*labels, "protocol", "outcome"), **kwargs)
        self.request_duration = Histogram(f"{PREFIX}_request_duration_seconds",
                                          "Inference time inside the server, arrival to response.",
                                          (*labels, "protocol"), buckets=LATENCY_BUCKETS, **kwargs)
        self.queue_duration = Histogram(f"{PREFIX}_queue_duration_seconds",
                                        "Time a request waited in the batcher queue before its execution began.",
                                        labels, buckets=LATENCY_BUCKETS, **kwargs)
        self.compute_duration = Histogram(f"{PREFIX}_compute_duration_seconds",
                                          "Time of one model execution: batch forming, onnxruntime, splitting.",
                                          labels, buckets=LATENCY_BUCKETS, **kwargs)
        self.batch_size = Histogram(f"{PREFIX}_batch_size", "Batch elements per model execution.",
                                    labels, buckets=BATCH_BUCKETS, **kwargs)
        self.executions = Counter(f"{PREFIX}_executions", "Model executions (onnxruntime calls).", labels, **kwargs)
        self.pending = Gauge(f"{PREFIX}_pending_requests", "Requests queued and not yet executing.",
                             labels, multiprocess_mode="livesum", **kwargs)
        self.load_duration = Gauge(f"{PREFIX}_model_load_duration_seconds",
                                   "Time to create the model's session and warm it up.", labels,
                                   multiprocess_mode="livemax", **kwargs)
        self.provider = Gauge(f"{PREFIX}_model_execution_provider_info",
                              "1 for the onnxruntime execution provider the model actually runs on.",
                              (*labels, "provider", "requested"), multiprocess_mode="livemax", **kwargs)
        self.ready = Gauge(f"{PREFIX}_ready", "1 when all models are loaded and the server is not draining.",
                           multiprocess_mode="livemin", **kwargs)
        self.load_failures = Counter(f"{PREFIX}_model_load_failures",
                                     "Models that failed to load (the reason is in the log and RepositoryIndex).",
                                     ("model",), **kwargs)
        # Model control (server/models/control.py).
        self.model_loads = Counter(f"{PREFIX}_model_loads", "Model loads and reloads by outcome (success, failure).",
                                   ("model", "outcome"), **kwargs)
        self.model_unloads = Counter(f"{PREFIX}_model_unloads", "Model unloads by outcome (success, failure).",
                                     ("model", "outcome"), **kwargs)
        self.loaded_versions = Gauge(f"{PREFIX}_model_loaded_versions", "Versions of the model being served.",
                                     ("model",), multiprocess_mode="livemax", **kwargs)
        self.unauthenticated = Counter(f"{PREFIX}_unauthenticated_requests",
                                       "Calls refused with UNAUTHENTICATED: bearer token missing or invalid.",
                                       ("reason",), **kwargs)
        # The HTTP edge's limits (server/transport/http_edge.py).
        self.http_connections_closed = Counter(
            f"{PREFIX}_http_connections_closed", "HTTP connections the server closed by its limits: header_timeout, "
            "keep_alive_timeout, max_connections.", ("reason",), **kwargs)
        self.http_connections_open = Gauge(f"{PREFIX}_http_connections_open", "HTTP connections open now.",
                                           multiprocess_mode="livesum", **kwargs)
        for reason in HTTP_CLOSE_REASONS:
            self.http_connections_closed.labels(reason=reason)
        # Requests refused before a model is known (unknown name, not ready yet) count under
        # model="": create those series now so that they exist from the first scrape.
        for protocol in PROTOCOLS:
            for outcome in ("not_found", "unavailable"):
                self.requests.labels(model="", version="", protocol=protocol, outcome=outcome)
        self._http_server = None
        self._pending_counts: dict[Gauge, Callable[[], int]] = {}  # multiprocess: sampled by a thread
        self._sampler: threading.Thread | None = None

    def watch_pending(self, gauge: Gauge, count: Callable[[], int] | None) -> None:
        """Let `gauge` show `count()` (None: stop). In one process the gauge calls it at
        scrape time; a worker's gauge lives in a file that a thread refreshes every second."""
        if not self.multiprocess:
            if count is not None:
                gauge.set_function(count)
            return
        if count is None:
            self._pending_counts.pop(gauge, None)
            return
        self._pending_counts[gauge] = count
        if self._sampler is None:
            self._sampler = threading.Thread(target=self._sample_pending, name="pending-sampler", daemon=True)
            self._sampler.start()

    def _sample_pending(self) -> None:
        while True:
            for gauge, count in list(self._pending_counts.items()):
                gauge.set(count())
            time.sleep(PENDING_SAMPLE_S)

    def for_model(self, model: str, version: str) -> ModelMetrics:
        return ModelMetrics(self, model, version)

    def count_unknown_model_request(self, protocol: str, outcome: str) -> None:
        self.requests.labels(model="", version="", protocol=protocol, outcome=outcome).inc()

    def serve(self, host: str, port: int) -> None:
        """Start the /metrics HTTP endpoint in a background thread."""
        self._http_server, _thread = start_http_server(port, addr=host, registry=self.registry)
        log.info("metrics on http://%s:%d/metrics", host, self._http_server.server_port)

    def shutdown(self) -> None:
        if self._http_server is not None:
            self._http_server.shutdown()
            self._http_server.server_close()
            self._http_server = None
