"""What the server answers, whichever transport asked: the protocol's operations on the
registry and the server state, with protobuf messages in and out (the gRPC servicer sends
them as they are; the HTTP endpoint turns them into JSON), inference as a `WireRequest`
in and a `WireResponse` out (each transport reads and writes its own bodies), and
failures raised as `InferenceError`, whose gRPC status each transport maps to its own.

Inference is counted here once for both transports: requests by outcome and protocol,
end-to-end latency, and the failure statistics of ModelStatistics.
"""

from __future__ import annotations

import logging
import threading
import time
from importlib import metadata
from typing import Protocol

import grpc

from ensemble_serving.protocol import grpc_service_pb2 as pb
from server.inference.request_codec import (
    DecodedRequest,
    InferenceError,
    WireRequest,
    WireResponse,
    decode_request,
    encode_response,
)
from server.inference.shared_memory import SystemSharedMemory
from server.models.control import ModelController
from server.models.registry import LoadedModel, ModelRegistry
from server.observability import tracing
from server.observability.metrics import ServerMetrics
from server.observability.statistics import merge_statistics
from server.scheduling.batcher import CallScope
from server.scheduling.steps import run_async, run_blocking

log = logging.getLogger(__name__)

SERVER_NAME = "ensemble-serving"
EXTENSIONS = ("classification", "model_configuration", "model_repository", "statistics", "binary_tensor_data",
              "system_shared_memory")
CUDA_SHM_UNSUPPORTED = ("CUDA shared memory is not supported on this server (it runs no CUDA build of the "
                        "server); use system shared memory (SystemSharedMemoryRegister)")

_OUTCOME = {
    grpc.StatusCode.INVALID_ARGUMENT: "invalid_argument",
    grpc.StatusCode.NOT_FOUND: "not_found",
    grpc.StatusCode.UNAVAILABLE: "unavailable",
    grpc.StatusCode.RESOURCE_EXHAUSTED: "resource_exhausted",
    grpc.StatusCode.DEADLINE_EXCEEDED: "deadline_exceeded",
}


def _server_version() -> str:
    try:
        return metadata.version("ensemble-serving")
    except metadata.PackageNotFoundError:
        return "0.0.0"


class ServerState:
    """Ready once every model has loaded; draining after SIGTERM. Counts requests in
    flight (from any thread) so that shutdown can wait for them."""

    def __init__(self) -> None:
        self.registry = ModelRegistry()
        self.controller: ModelController | None = None  # set by the app before the ports open
        self.shared_memory = SystemSharedMemory()
        self.ready = False
        self.draining = False
        self.in_flight = 0
        self._idle = threading.Condition()

    @property
    def serving(self) -> bool:
        return self.ready and not self.draining

    def begin_request(self) -> None:
        with self._idle:
            self.in_flight += 1

    def end_request(self) -> None:
        with self._idle:
            self.in_flight -= 1
            if self.in_flight == 0:
                self._idle.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        """Blocks until no request is in flight (True) or `timeout` passed (False)."""
        with self._idle:
            return self._idle.wait_for(lambda: self.in_flight == 0, timeout)


class _AccountedCall:
    """One inference call while it is handled: counted in flight, then its outcome recorded
    (requests by outcome, latency, failure statistics). An unexpected exception becomes
    INTERNAL: a bug must cost one request, not the server. A plain class rather than a
    @contextmanager, which costs several times as much on every request's path."""

    __slots__ = ("state", "metrics", "protocol", "deadline", "start", "model", "span", "tracer")

    def __init__(self, state: ServerState, metrics: ServerMetrics, protocol: str, deadline: float | None):
        self.state, self.metrics, self.protocol, self.deadline = state, metrics, protocol, deadline
        self.start = time.perf_counter()
        self.model: LoadedModel | None = None  # set once the model is found
        self.span = None  # tracing on and this request sampled: its span (server/observability/tracing.py)

    def trace(self, request: WireRequest, carrier, scope: CallScope) -> None:
        """Tracing is on: start the request's span (continuing the client's traceparent in
        `carrier`), which the call's tickets then belong to."""
        self.tracer = tracing.active
        self.span = scope.trace = self.tracer.start_request(request.model_name, self.protocol, carrier)

    def __enter__(self) -> _AccountedCall:
        self.state.begin_request()
        return self

    def __exit__(self, kind, error, traceback) -> None:
        try:
            if error is None:
                self._count("success")
            elif isinstance(error, InferenceError):
                self._count(self._outcome(error), error)
            elif isinstance(error, Exception):
                log.exception("inference on model %s failed", self.model.spec.name if self.model else "?",
                              exc_info=error)
                self._count("internal", error)
                raise InferenceError(grpc.StatusCode.INTERNAL,
                                     f"internal error: {type(error).__name__}: {error}") from None
        finally:
            if self.model is not None:
                self.model.release()
            self.state.end_request()

    def _outcome(self, error: InferenceError) -> str:
        if error.code == grpc.StatusCode.CANCELLED:
            # The call ended first: by the client's cancel, or by its deadline.
            expired = self.deadline is not None and time.monotonic() >= self.deadline
            return "deadline_exceeded" if expired else "cancelled"
        return _OUTCOME.get(error.code, "internal")

    def _count(self, outcome: str, error: BaseException | None = None) -> None:
        elapsed = time.perf_counter() - self.start
        if self.span is not None:
            self.tracer.end_request(self.span, "ok" if outcome == "success" else outcome, error)
        if self.model is None:
            self.metrics.count_unknown_model_request(self.protocol, outcome)
            return
        self.model.metrics.count_request(self.protocol, outcome, elapsed)
        if outcome == "invalid_argument":
            self.model.stats.record_failure(int(elapsed * 1e9))


class SiblingStatistics(Protocol):
    """--workers: the other workers' ModelStatistics (server/process/siblings.py asks them)."""

    def asked_by_sibling(self, metadata) -> bool: ...

    def collect(self, name: str, version: str) -> list[pb.ModelStatistics]: ...

    def register_shared_memory(self, name: str, key: str, offset: int, byte_size: int) -> None: ...

    def unregister_shared_memory(self, name: str) -> None: ...


class InferenceService:
    def __init__(self, state: ServerState, metrics: ServerMetrics, siblings: SiblingStatistics | None = None):
        self.state = state
        self.metrics = metrics
        self.siblings = siblings  # --workers: the other workers' statistics
        self.version = _server_version()

    # -- server and models -----------------------------------------------------------------
    def server_metadata(self) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=self.version, extensions=EXTENSIONS)

    def model_ready(self, name: str, version: str) -> bool:
        """Whether the model version serves now; NOT_FOUND for one the server does not have.
        An ensemble whose member is unloaded is loaded but not ready."""
        model = self.state.registry.get(name, version)
        return self.state.serving and not model.unready_reason()

    def model_metadata(self, name: str, version: str) -> pb.ModelMetadataResponse:
        return self.state.registry.metadata(name, version)

    def model_config(self, name: str, version: str) -> pb.ModelConfigResponse:
        return pb.ModelConfigResponse(config=self.state.registry.get(name, version).config)

    def model_statistics(self, name: str, version: str, own_only: bool = False) -> pb.ModelStatisticsResponse:
        """The statistics of the whole server: with --workers, this worker's and (unless
        `own_only`, a sibling asking) its siblings' summed."""
        registry = self.state.registry
        if not name:
            models = list(registry)
        elif version:
            models = [registry.get(name, version)]
        else:
            registry.get(name)  # NOT_FOUND for an unknown name
            models = list(registry.versions(name).values())
        stats = [model.stats.to_proto() for model in models]
        if self.siblings is not None and not own_only:
            stats = merge_statistics(stats + self.siblings.collect(name, version))
        return pb.ModelStatisticsResponse(model_stats=stats)

    # -- model repository (server/models/control.py does the work) -----------------------
    def repository_index(self, ready_only: bool) -> pb.RepositoryIndexResponse:
        entries = self.state.controller.index(ready_only=ready_only)
        return pb.RepositoryIndexResponse(models=[
            pb.RepositoryIndexResponse.ModelIndex(name=entry.name, version=entry.version, state=entry.state,
                                                  reason=entry.reason) for entry in entries])  # fmt: skip

    def load_model(self, name: str, config_json: str | None, files: dict[str, bytes]) -> None:
        self._control(self.state.controller.load, name, config_json, files)

    def unload_model(self, name: str, unload_dependents: bool) -> None:
        self._control(self.state.controller.unload, name, unload_dependents)

    @staticmethod
    def _control(operation, name: str, *args) -> None:
        log.info("%s %s", operation.__name__, name)
        try:
            operation(name, *args)
        except InferenceError:
            raise
        except Exception as error:  # a bug must cost one call, not the server
            log.exception("%s %s failed", operation.__name__, name)
            raise InferenceError(grpc.StatusCode.INTERNAL, f"internal error: {type(error).__name__}: {error}") from None

    # -- system shared memory (server/inference/shared_memory.py does the work) ----------------
    def shm_status(self, name: str) -> pb.SystemSharedMemoryStatusResponse:
        response = pb.SystemSharedMemoryStatusResponse()
        for region, key, offset, byte_size in self.state.shared_memory.status(name):
            response.regions[region].CopyFrom(pb.SystemSharedMemoryStatusResponse.RegionStatus(
                name=region, key=key, offset=offset, byte_size=byte_size))
        return response

    def shm_register(self, name: str, key: str, offset: int, byte_size: int, from_sibling: bool = False) -> None:
        """Map the region here and, with --workers (unless a sibling asks), in every other worker."""
        log.info("register system shared memory %r: key %r, offset %d, %d bytes", name, key, offset, byte_size)
        self.state.shared_memory.register(name, key, offset, byte_size)
        if self.siblings is not None and not from_sibling:
            try:
                self.siblings.register_shared_memory(name, key, offset, byte_size)
            except InferenceError:
                self.state.shared_memory.unregister(name)  # all workers or none
                raise

    def shm_unregister(self, name: str, from_sibling: bool = False) -> None:
        log.info("unregister system shared memory %r", name or "(all)")
        self.state.shared_memory.unregister(name)
        if self.siblings is not None and not from_sibling:
            self.siblings.unregister_shared_memory(name)

    @staticmethod
    def cuda_shm_unsupported() -> None:
        raise InferenceError(grpc.StatusCode.UNIMPLEMENTED, CUDA_SHM_UNSUPPORTED)

    @staticmethod
    def cuda_shm_unknown(name: str) -> None:
        raise InferenceError(grpc.StatusCode.NOT_FOUND, f"Unable to find CUDA shared memory region: {name!r} "
                                                        f"({CUDA_SHM_UNSUPPORTED})")

    # -- inference -------------------------------------------------------------------------
    def infer(self, request: WireRequest, deadline: float | None, scope: CallScope, protocol: str,
              carrier=None) -> WireResponse:  # fmt: skip
        """Serve one request on this thread (gRPC's worker threads). `carrier`: where a
        client's W3C traceparent may be (gRPC's metadata), read only with tracing on."""
        with _AccountedCall(self.state, self.metrics, protocol, deadline) as call:
            if tracing.active is not None:
                call.trace(request, carrier, scope)
            decoded = self._decode(request, call)
            outputs = run_blocking(call.model.scheduler.steps(decoded.inputs, decoded.batch_size, deadline, scope))
            return self._encode(call, request, outputs, decoded)

    async def infer_async(self, request: WireRequest, deadline: float | None, scope: CallScope, protocol: str,
                          carrier=None) -> WireResponse:  # fmt: skip
        """Serve one request on the running event loop (the HTTP endpoint); `carrier`: the
        request's headers (a dict), read only with tracing on."""
        with _AccountedCall(self.state, self.metrics, protocol, deadline) as call:
            if tracing.active is not None:
                call.trace(request, carrier, scope)
            decoded = self._decode(request, call)
            outputs = await run_async(call.model.scheduler.steps(decoded.inputs, decoded.batch_size, deadline, scope))
            return self._encode(call, request, outputs, decoded)

    def _encode(self, call: _AccountedCall, request: WireRequest, outputs, decoded: DecodedRequest) -> WireResponse:
        response = encode_response(call.model.spec, call.model.version, request.id, outputs, decoded.outputs)
        for output in response.outputs:
            if output.region is not None:
                self.state.shared_memory.write(output.region, output.raw, f"output {output.name!r}")
                output.raw = b""
        return response

    def _decode(self, request: WireRequest, call: _AccountedCall) -> DecodedRequest:
        state = self.state
        if not state.serving:
            raise InferenceError(grpc.StatusCode.UNAVAILABLE,
                                 "the server is shutting down" if state.draining
                                 else "the server is not ready: models are still loading")
        # A lease: a version replaced meanwhile finishes this request before it closes.
        call.model = state.registry.acquire(request.model_name, request.model_version)
        for tensor in request.inputs:
            if tensor.region is not None:
                tensor.raw = state.shared_memory.read(tensor.region, f"input {tensor.name!r}")
        decoded = decode_request(request, call.model.spec)
        if call.span is not None:
            call.tracer.request_decoded(call.span, call.model.version, decoded.batch_size)
        return decoded

