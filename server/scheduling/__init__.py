"""Dynamic batching, knowing nothing of models or transports.

  batcher.py  a model's queue, batch forming, one compute thread per model instance
  steps.py    how a request waits for its batches: on a thread (gRPC) or an event loop (HTTP)

May import observability and the base modules only.
"""
