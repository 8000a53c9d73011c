"""The wire: gRPC and HTTP/REST endpoints of the KServe v2 / Triton protocol.

  grpc_servicer.py  the GRPCInferenceService RPCs, on grpcio's worker threads
  http_app.py       the HTTP/REST routes, a bare ASGI application on the event loop
  http_codec.py     HTTP's JSON and binary-tensor bodies, to and from the shared request types
  http_server.py    uvicorn serving http_app on the server's event loop
  security.py       TLS credentials and bearer tokens, for both ports

Thin: each endpoint reads its own bodies and calls server/inference. May import
inference, models, scheduling, observability and the base modules; not process.
"""
