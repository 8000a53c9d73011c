"""`server --model-repository DIR`: the command line (console script `server`, or `python -m server`)."""

from __future__ import annotations

import sys

import click

from server.config import ServerSettings, apply_settings_options
from server.process.run import configure_logging, run_server
from server.process.workers import supervise


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@apply_settings_options
def main(**options) -> None:
    """Serve a Triton-layout model repository of ONNX models and ensembles over the
    KServe v2 / Triton protocol, on gRPC and on HTTP/REST (tritonclient, perf_analyzer
    and KServe clients work unmodified), with dynamic batching, grpc.health.v1, server
    reflection and Prometheus metrics.

    \b
    Example:
      server --model-repository model_repository --model cifar10
      perf_analyzer -m cifar10 -i grpc -u localhost:8001 --concurrency-range 1:16:4
      curl localhost:8000/v2/health/ready
      curl localhost:8000/v2/models/cifar10
      curl localhost:8002/metrics

    Ready (ServerReady, grpc.health.v1 SERVING) once every model has loaded. On SIGTERM
    or SIGINT it turns not-ready, finishes the requests in flight within --grace-period,
    and exits 0. Start-up problems print one line and exit 2. With --workers N, N such
    server processes share the ports (one supervisor, one /metrics).
    """
    settings = ServerSettings(**options)
    configure_logging(settings)
    if settings.workers > 1:
        sys.exit(supervise(settings))
    sys.exit(run_server(settings))


if __name__ == "__main__":
    main()
