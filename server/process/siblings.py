"""`--workers N`: one worker's ModelStatistics include its siblings' counters, and a system
shared-memory region registered with one worker is registered with all of them.

A statistics request reaches one worker (whichever holds the client's connection). That
worker asks each sibling over the sibling's private Unix socket (in the supervisor's 0700
runtime directory) for its own counters only, marked with the workers' shared secret,
and adds them up (server/observability/statistics.py: merge_statistics). A sibling without the model
(still loading it) adds nothing; a sibling that does not answer fails the request with
UNAVAILABLE rather than let it report part of the server as the whole.

Shared memory: the kernel spreads a client's connections among the workers, so a region
registered on one connection must be mapped by the worker that serves the next. The
worker that receives a register (or unregister) call passes it on to each sibling, marked
as from a sibling so that it goes no further; a sibling that refuses undoes the
registration everywhere (all workers map a region, or none does).
"""

from __future__ import annotations

import contextlib
import threading

import grpc

from ensemble_serving.protocol import grpc_service_pb2 as pb
from ensemble_serving.protocol import grpc_service_pb2_grpc as pb_grpc
from server.errors import InferenceError
from server.process.worker_role import WorkerRole
from server.transport.security import SIBLING_METADATA_KEY, from_sibling

SIBLING_TIMEOUT_S = 5.0


class SiblingStatistics:
    def __init__(self, role: WorkerRole):
        self._role = role
        self._stubs: dict[int, pb_grpc.GRPCInferenceServiceStub] = {}
        self._lock = threading.Lock()

    def asked_by_sibling(self, metadata) -> bool:
        """Whether a statistics call comes from a sibling (answer with this worker's own counters)."""
        return from_sibling(metadata, self._role.secret)

    def collect(self, name: str, version: str) -> list[pb.ModelStatistics]:
        """Every sibling's own statistics for (name, version) as ModelStatistics asks them."""
        request = pb.ModelStatisticsRequest(name=name, version=version)
        metadata = ((SIBLING_METADATA_KEY, self._role.secret),)
        collected: list[pb.ModelStatistics] = []
        for index, stub in self._sibling_stubs().items():
            try:
                response = stub.ModelStatistics(request, metadata=metadata, timeout=SIBLING_TIMEOUT_S)
            except grpc.RpcError as error:
                if error.code() == grpc.StatusCode.NOT_FOUND:
                    continue  # that worker has not (yet) loaded the model
                raise InferenceError(grpc.StatusCode.UNAVAILABLE,
                                     f"statistics incomplete: worker {index} of {self._role.count} did not answer "
                                     f"({error.code().name}: {error.details()})") from None  # fmt: skip
            collected.extend(response.model_stats)
        return collected

    def _sibling_stubs(self) -> dict[int, pb_grpc.GRPCInferenceServiceStub]:
        with self._lock:
            if not self._stubs:
                self._stubs = {index: pb_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(f"unix:{path}"))
                               for index, path in self._role.sibling_sockets.items()}  # fmt: skip
            return self._stubs

    # -- system shared memory --------------------------------------------------------------
    def register_shared_memory(self, name: str, key: str, offset: int, byte_size: int) -> None:
        request = pb.SystemSharedMemoryRegisterRequest(name=name, key=key, offset=offset, byte_size=byte_size)
        done = []
        for index, stub in self._sibling_stubs().items():
            try:
                stub.SystemSharedMemoryRegister(request, metadata=self._metadata(), timeout=SIBLING_TIMEOUT_S)
            except grpc.RpcError as error:
                for other in done:
                    self._quietly_unregister(other, name)
                raise InferenceError(error.code(), f"shared memory region {name!r}: worker {index} of {self._role.count} "
                                           f"could not map it ({error.code().name}: {error.details()})") from None
            done.append(stub)

    def unregister_shared_memory(self, name: str) -> None:
        request = pb.SystemSharedMemoryUnregisterRequest(name=name)
        for index, stub in self._sibling_stubs().items():
            try:
                stub.SystemSharedMemoryUnregister(request, metadata=self._metadata(), timeout=SIBLING_TIMEOUT_S)
            except grpc.RpcError as error:
                raise InferenceError(grpc.StatusCode.UNAVAILABLE,
                                     f"shared memory {name or '(all regions)'}: worker {index} of {self._role.count} "
                                     f"did not unregister it ({error.code().name}: {error.details()})") from None

    def _quietly_unregister(self, stub: pb_grpc.GRPCInferenceServiceStub, name: str) -> None:
        with contextlib.suppress(grpc.RpcError):
            stub.SystemSharedMemoryUnregister(pb.SystemSharedMemoryUnregisterRequest(name=name),
                                              metadata=self._metadata(), timeout=SIBLING_TIMEOUT_S)

    def _metadata(self) -> tuple[tuple[str, str], ...]:
        return ((SIBLING_METADATA_KEY, self._role.secret),)
