"""What the server answers, whichever transport asked: the protocol's operations.

  service.py        InferenceService (metadata, statistics, model control, inference) and
                    ServerState (ready, draining, requests in flight)
  request_codec.py  ModelInfer decoding and validation against the model's config, response
                    encoding, the classification extension

May import models, scheduling, observability and the base modules; not transport or process.
"""
