"""Stage 3: serve a Triton-layout model repository over the KServe v2 / Triton protocol,
on gRPC and HTTP/REST.

Subpackages, in the order a request meets them; each may import only those below it
(import-linter checks it: pyproject.toml, [tool.importlinter]):

  process/        the command, start-up, SIGTERM drain, --workers N (cli, run, app, workers)
  transport/      the gRPC servicer and the HTTP/REST app, TLS and bearer tokens
  inference/      the protocol's operations for both transports, and the request codec
  models/         repository, onnxruntime sessions, registry, ensembles, model control
  scheduling/     dynamic batching: queues, batches, how a request waits for them
  observability/  Prometheus metrics, ModelStatistics, grpc.health.v1, OpenTelemetry tracing

Below them all:

  config.py       every flag and its ENSEMBLE_SERVER_* environment variable
  errors.py       InferenceError: a failure with the gRPC status to answer

The server never imports torch.
"""
