"""Stage 3: serve a Triton-layout model repository over the KServe v2 / Triton gRPC protocol.

Read top to bottom, a request meets these modules:

  cli.py         `server --model-repository DIR ...` (click; flags and env vars from config.py)
  app.py         wiring and lifecycle: start, load, ready, SIGTERM drain, exit
  repository.py  scan the repository, parse config.pbtxt, versions, load order
  runtime.py     onnxruntime sessions: providers (CPU/CUDA), optimizations, threads
  registry.py    the loaded models by name and version (leased per request); loading them
  warmup.py      config.pbtxt model_warmup (or one automatic warm-up) before a model turns ready
  model_control.py  load / reload / unload while serving: modes none, poll, explicit
  servicer.py    the GRPCInferenceService RPCs, run on grpcio's worker threads
  request_codec.py  ModelInfer decoding/validation and response encoding (+ classification)
  batcher.py     dynamic batching: queue, batch forming, one compute thread per model instance
  ensemble.py    ensemble steps, each member through its own batcher
  statistics.py  Triton ModelStatistics counters
  metrics.py     Prometheus metrics on the metrics port
  health.py      grpc.health.v1 and server reflection
  workers.py     --workers N: a supervisor and N worker processes sharing the ports
  siblings.py    --workers N: each worker's ModelStatistics summed with its siblings'

The server never imports torch.
"""
