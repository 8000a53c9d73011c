"""What an operator reads off the server.

  metrics.py     Prometheus metrics on the metrics port
  statistics.py  Triton's ModelStatistics counters
  health.py      grpc.health.v1 (server and per model) and server reflection
  tracing.py     OpenTelemetry tracing: the switch (off by default) a request's path reads
  tracing_spans.py  the spans, exported over OTLP/HTTP (imports the `tracing` extra; only when on)

May import the base modules only (server/config.py, server/errors.py).
"""
