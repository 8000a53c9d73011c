"""The `inference.GRPCInferenceService` implementation (KServe v2 / Triton over gRPC).

Every RPC answers from the registry and the server state, on the gRPC worker thread
that received it. ModelInfer decodes the request (server.request_codec), hands it to the
model's scheduler (batcher or ensemble), waits for the answer on that same thread and
encodes it. Failures become gRPC statuses with a one-line message; nothing a client
sends can take the server down.
"""

from __future__ import annotations

import logging
import threading
import time
from importlib import metadata

import grpc

from ensemble_serving.protocol import grpc_service_pb2 as pb
from ensemble_serving.protocol import grpc_service_pb2_grpc as pb_grpc
from server.batcher import CallScope
from server.metrics import ServerMetrics
from server.request_codec import InferenceError, decode_request, encode_response
from server.model_control import FILE_PARAMETER_PREFIX, ModelController
from server.registry import ModelRegistry
from server.repository import Repository

log = logging.getLogger(__name__)

SERVER_NAME = "ensemble-serving"
EXTENSIONS = ("classification", "model_configuration", "model_repository", "statistics")


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
        self.ready = False
        self.draining = False
        self.in_flight = 0
        self._idle = threading.Condition()

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


_OUTCOME = {
    grpc.StatusCode.INVALID_ARGUMENT: "invalid_argument",
    grpc.StatusCode.NOT_FOUND: "not_found",
    grpc.StatusCode.UNAVAILABLE: "unavailable",
    grpc.StatusCode.RESOURCE_EXHAUSTED: "resource_exhausted",
    grpc.StatusCode.DEADLINE_EXCEEDED: "deadline_exceeded",
}


# grpcio's thread-pool server reports a call without a deadline as one this far away, or
# further (and a lock wait that long overflows): no deadline.
_NO_DEADLINE_S = 365 * 24 * 3600.0


def _deadline(context) -> float | None:
    """The call's deadline on time.monotonic()'s clock, or None."""
    remaining = context.time_remaining()
    if remaining is None or remaining >= _NO_DEADLINE_S:
        return None
    return time.monotonic() + remaining


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, state: ServerState, repository: Repository, metrics: ServerMetrics):
        self.state = state
        self.repository = repository
        self.metrics = metrics
        self.version = _server_version()

    # -- server ------------------------------------------------------------------------
    def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self.state.ready and not self.state.draining)

    def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=self.version, extensions=EXTENSIONS)

    # -- models ------------------------------------------------------------------------
    def ModelReady(self, request, context):
        try:
            model = self.state.registry.get(request.name, request.version)
        except InferenceError:
            return pb.ModelReadyResponse(ready=False)
        # An ensemble whose member is unloaded is loaded but not ready.
        return pb.ModelReadyResponse(ready=self.state.ready and not self.state.draining
                                     and not model.unready_reason())

    def ModelMetadata(self, request, context):
        try:
            return self.state.registry.metadata(request.name, request.version)
        except InferenceError as error:
            context.abort(error.code, error.message)

    def ModelConfig(self, request, context):
        try:
            model = self.state.registry.get(request.name, request.version)
        except InferenceError as error:
            context.abort(error.code, error.message)
        return pb.ModelConfigResponse(config=model.config)

    def ModelStatistics(self, request, context):
        log.debug("ModelStatistics name=%r version=%r", request.name, request.version)
        registry = self.state.registry
        try:
            if not request.name:
                models = list(registry)
            elif request.version:
                models = [registry.get(request.name, request.version)]
            else:
                registry.get(request.name)  # NOT_FOUND for an unknown name
                models = list(registry.versions(request.name).values())
        except InferenceError as error:
            context.abort(error.code, error.message)
        return pb.ModelStatisticsResponse(model_stats=[model.stats.to_proto() for model in models])

    # -- model repository (server/model_control.py does the work) ----------------------
    def RepositoryIndex(self, request, context):
        entries = self.state.controller.index(ready_only=request.ready)
        return pb.RepositoryIndexResponse(models=[
            pb.RepositoryIndexResponse.ModelIndex(name=entry.name, version=entry.version, state=entry.state,
                                                  reason=entry.reason) for entry in entries])  # fmt: skip

    def RepositoryModelLoad(self, request, context):
        parameters = request.parameters
        config = parameters["config"].string_param if "config" in parameters else None
        files = {key[len(FILE_PARAMETER_PREFIX):]: value.bytes_param for key, value in parameters.items()
                 if key.startswith(FILE_PARAMETER_PREFIX)}  # fmt: skip
        self._control(context, self.state.controller.load, request.model_name, config, files)
        return pb.RepositoryModelLoadResponse()

    def RepositoryModelUnload(self, request, context):
        parameters = request.parameters
        dependents = "unload_dependents" in parameters and parameters["unload_dependents"].bool_param
        self._control(context, self.state.controller.unload, request.model_name, dependents)
        return pb.RepositoryModelUnloadResponse()

    @staticmethod
    def _control(context, call, *args) -> None:
        log.info("%s %s", call.__name__, args[0])
        try:
            call(*args)
        except InferenceError as error:
            context.abort(error.code, error.message)
        except Exception as error:  # a bug must cost one call, not the server
            log.exception("%s %s failed", call.__name__, args[0])
            context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(error).__name__}: {error}")

    # -- inference ---------------------------------------------------------------------
    def ModelInfer(self, request, context):
        start = time.perf_counter()
        state = self.state
        model = None
        state.begin_request()
        try:
            if not state.ready or state.draining:
                raise InferenceError(grpc.StatusCode.UNAVAILABLE,
                                     "the server is shutting down" if state.draining
                                     else "the server is not ready: models are still loading")
            # A lease: a version replaced meanwhile finishes this request before it closes.
            model = state.registry.acquire(request.model_name, request.model_version)
            decoded = decode_request(request, model.spec)
            deadline = _deadline(context)
            scope = CallScope()
            # Runs when the call ends for any reason: a client that cancelled, or whose
            # deadline passed, leaves the queues at once.
            context.add_callback(scope.cancel)
            outputs = model.scheduler.infer(decoded.inputs, decoded.batch_size, deadline, scope)
            response = encode_response(request, model.spec, model.version, outputs, decoded.outputs)
        except InferenceError as error:
            self._count(model, self._outcome(error, context), start)
            context.abort(error.code, error.message)  # raises: ends the call with that status
        except Exception as error:  # a bug must cost one request, not the server
            log.exception("ModelInfer %s failed", request.model_name)
            self._count(model, "internal", start)
            context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(error).__name__}: {error}")
        finally:
            if model is not None:
                model.release()
            state.end_request()
        self._count(model, "success", start)
        return response

    @staticmethod
    def _outcome(error: InferenceError, context) -> str:
        if error.code == grpc.StatusCode.CANCELLED:
            # The call ended first: by the client's cancel, or by its deadline.
            remaining = context.time_remaining()
            return "deadline_exceeded" if remaining is not None and remaining <= 0 else "cancelled"
        return _OUTCOME.get(error.code, "internal")

    def _count(self, model, outcome: str, start: float) -> None:
        if model is None:
            self.metrics.count_unknown_model_request(outcome)
            return
        model.metrics.requests[outcome].inc()
        model.metrics.request_duration.observe(time.perf_counter() - start)
        if outcome == "invalid_argument":
            model.stats.record_failure(int((time.perf_counter() - start) * 1e9))
