"""Container health check: exit 0 when the server is ready to take requests.

Docker's HEALTHCHECK (and `docker compose`) runs this inside the container. It asks what
a load balancer asks, so the container is "healthy" exactly when traffic should reach it
(models loaded, not draining):

  healthcheck.py               GET /v2/health/ready on the HTTP port must answer 200, as
                               Kubernetes' `httpGet` probes ask; if HTTP is turned off
                               (ENSEMBLE_SERVER_HTTP_PORT=0), the gRPC check below instead
  healthcheck.py --grpc [SVC]  grpc.health.v1.Health/Check must say SERVING, as Kubernetes'
                               native `grpc:` probes ask (SVC: a model; "" = the server)

The ports come from the same environment variables the server reads, so a container
started with non-default ports still checks the right ones. No server code is imported
(the HTTP check needs only the standard library), so it stays fast and cannot break
because of a server-side import.
"""

import os
import sys
import urllib.error
import urllib.request

HTTP_PORT_VARIABLE, DEFAULT_HTTP_PORT = "ENSEMBLE_SERVER_HTTP_PORT", "8000"  # server/config.py: --http-port
GRPC_PORT_VARIABLE, DEFAULT_GRPC_PORT = "ENSEMBLE_SERVER_GRPC_PORT", "8001"  # server/config.py: --grpc-port
TIMEOUT_S = 3.0


def check_http(port: str) -> int:
    url = f"http://127.0.0.1:{port}/v2/health/ready"
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:
            status = response.status
    except urllib.error.HTTPError as error:  # 4xx / 5xx: answered, not ready
        status = error.code
    except OSError as error:
        print(f"unhealthy: GET {url} failed: {error}")
        return 1
    print(f"GET {url}: {status} ({'ready' if status == 200 else 'not ready'})")
    return 0 if status == 200 else 1


def check_grpc(port: str, service: str = "") -> int:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    address = f"127.0.0.1:{port}"
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


def main(args: list[str]) -> int:
    grpc_port = os.environ.get(GRPC_PORT_VARIABLE, DEFAULT_GRPC_PORT)
    if args[:1] == ["--grpc"]:
        return check_grpc(grpc_port, args[1] if len(args) > 1 else "")
    http_port = os.environ.get(HTTP_PORT_VARIABLE, DEFAULT_HTTP_PORT)
    return check_grpc(grpc_port) if http_port == "0" else check_http(http_port)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
