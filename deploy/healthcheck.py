"""Container health check: exit 0 when the server's gRPC health service says SERVING.

Docker's HEALTHCHECK (and `docker compose`) runs this inside the container. It asks the
standard `grpc.health.v1.Health/Check` RPC, the same one Kubernetes' native `grpc:`
probes ask, so the container is "healthy" exactly when a load balancer should route to it:
models loaded, not draining. It imports only grpcio and grpcio-health-checking (no
server code), so it stays fast and cannot break because of a server-side import.

The port comes from the same environment variable the server reads, so a container
started with a non-default port still checks the right one.
"""

import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

PORT_VARIABLE = "ENSEMBLE_SERVER_GRPC_PORT"  # server/config.py: --grpc-port
DEFAULT_PORT = "8001"
TIMEOUT_S = 3.0


def main() -> int:
    address = f"127.0.0.1:{os.environ.get(PORT_VARIABLE, DEFAULT_PORT)}"
    service = sys.argv[1] if len(sys.argv) > 1 else ""  # "" = the server as a whole
    try:
        with grpc.insecure_channel(address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=TIMEOUT_S)
    except grpc.RpcError as error:
        print(f"unhealthy: {address} health check failed: {error.code().name}: {error.details()}")
        return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(f"{address} health: {status}")
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


if __name__ == "__main__":
    sys.exit(main())
