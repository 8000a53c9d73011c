"""The `inference.GRPCInferenceService` implementation (KServe v2 / Triton over gRPC).

A thin adapter over `server.inference.service.InferenceService`: every RPC runs on the gRPC worker
thread that received it, asks the service, and turns an `InferenceError` into the call's
status with its one-line message. ModelInfer waits for its batch on that same thread.
Nothing a client sends can take the server down.
"""

from __future__ import annotations

import logging
import time

from ensemble_serving.protocol import grpc_service_pb2 as pb
from ensemble_serving.protocol import grpc_service_pb2_grpc as pb_grpc
from server.errors import InferenceError
from server.inference.request_codec import from_grpc, to_grpc
from server.inference.service import InferenceService
from server.models.control import FILE_PARAMETER_PREFIX
from server.observability import tracing
from server.scheduling.batcher import CallScope

log = logging.getLogger(__name__)

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
    def __init__(self, service: InferenceService):
        self.service = service
        self.state = service.state

    def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self.state.serving)

    def ServerMetadata(self, request, context):
        return self.service.server_metadata()

    def ModelReady(self, request, context):
        try:
            return pb.ModelReadyResponse(ready=self.service.model_ready(request.name, request.version))
        except InferenceError:
            return pb.ModelReadyResponse(ready=False)

    def ModelMetadata(self, request, context):
        return _answer(context, self.service.model_metadata, request.name, request.version)

    def ModelConfig(self, request, context):
        return _answer(context, self.service.model_config, request.name, request.version)

    def ModelStatistics(self, request, context):
        log.debug("ModelStatistics name=%r version=%r", request.name, request.version)
        return _answer(context, self.service.model_statistics, request.name, request.version,
                       self._from_sibling(context))

    # -- model repository (server/models/control.py does the work) ----------------------
    def RepositoryIndex(self, request, context):
        return self.service.repository_index(request.ready)

    def RepositoryModelLoad(self, request, context):
        parameters = request.parameters
        config = parameters["config"].string_param if "config" in parameters else None
        files = {key[len(FILE_PARAMETER_PREFIX):]: value.bytes_param for key, value in parameters.items()
                 if key.startswith(FILE_PARAMETER_PREFIX)}  # fmt: skip
        _answer(context, self.service.load_model, request.model_name, config, files)
        return pb.RepositoryModelLoadResponse()

    def RepositoryModelUnload(self, request, context):
        parameters = request.parameters
        dependents = "unload_dependents" in parameters and parameters["unload_dependents"].bool_param
        _answer(context, self.service.unload_model, request.model_name, dependents)
        return pb.RepositoryModelUnloadResponse()

    # -- system shared memory (server/inference/shared_memory.py) -------------------------
    def SystemSharedMemoryStatus(self, request, context):
        return _answer(context, self.service.shm_status, request.name)

    def SystemSharedMemoryRegister(self, request, context):
        from_sibling = self._from_sibling(context)
        _answer(context, self.service.shm_register, request.name, request.key, request.offset, request.byte_size,
                from_sibling)  # fmt: skip
        return pb.SystemSharedMemoryRegisterResponse()

    def SystemSharedMemoryUnregister(self, request, context):
        _answer(context, self.service.shm_unregister, request.name, self._from_sibling(context))
        return pb.SystemSharedMemoryUnregisterResponse()

    # No CUDA region can exist here: registering one is refused, the status lists none, and
    # unregistering (which clients do for a clean start, after the system regions) has nothing to do.
    def CudaSharedMemoryStatus(self, request, context):
        if request.name:
            _answer(context, self.service.cuda_shm_unknown, request.name)
        return pb.CudaSharedMemoryStatusResponse()

    def CudaSharedMemoryRegister(self, request, context):
        _answer(context, self.service.cuda_shm_unsupported)

    def CudaSharedMemoryUnregister(self, request, context):
        return pb.CudaSharedMemoryUnregisterResponse()

    def _from_sibling(self, context) -> bool:
        siblings = self.service.siblings
        return siblings is not None and siblings.asked_by_sibling(context.invocation_metadata())

    def ModelInfer(self, request, context):
        deadline = _deadline(context)
        scope = CallScope()
        # Runs when the call ends for any reason: a client that cancelled, or whose
        # deadline passed, leaves the queues at once.
        context.add_callback(scope.cancel)
        carrier = context.invocation_metadata() if tracing.active is not None else None  # a client's traceparent
        return to_grpc(_answer(context, self.service.infer, from_grpc(request), deadline, scope, "grpc", carrier))


def _answer(context, operation, *args):
    """operation(*args), or the call ended with the status of its InferenceError."""
    try:
        return operation(*args)
    except InferenceError as error:
        context.abort(error.code, error.message)  # raises: ends the call with that status
