"""What an operator reads off the server.

  metrics.py     Prometheus metrics on the metrics port
  statistics.py  Triton's ModelStatistics counters
  health.py      grpc.health.v1 (server and per model) and server reflection

May import the base modules only (server/config.py, server/errors.py).
"""
