"""The standard gRPC health service (grpc.health.v1) and server reflection.

Health answers for the whole server (service ""), for the inference service by its
full name, and for each model by its name: NOT_SERVING while models load and after
shutdown begins, SERVING in between. Kubernetes' gRPC probes and grpc_health_probe
use this; Triton-aware clients use ServerReady/ModelReady instead, which agree.
"""

from __future__ import annotations

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from ensemble_serving.protocol import grpc_service_pb2

INFERENCE_SERVICE = grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class HealthReporter:
    def __init__(self, server: grpc.Server):
        self._servicer = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._servicer, server)

    def starting(self, model_names: list[str]) -> None:
        for service in ["", INFERENCE_SERVICE, *model_names]:
            self._servicer.set(service, NOT_SERVING)

    def serving(self, model_names: list[str]) -> None:
        for service in ["", INFERENCE_SERVICE, *model_names]:
            self._servicer.set(service, SERVING)

    def model_changed(self, name: str, serving: bool) -> None:
        """Model control loaded or unloaded `name` (ignored once shutdown has begun)."""
        self._servicer.set(name, SERVING if serving else NOT_SERVING)

    def shutting_down(self) -> None:
        self._servicer.enter_graceful_shutdown()


def enable_reflection(server: grpc.Server) -> None:
    reflection.enable_server_reflection(
        (INFERENCE_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
