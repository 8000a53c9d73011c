"""`InferenceError`: a request that cannot be served, with the gRPC status to answer.

Raised at every layer (decoding, scheduling, model control) and turned into a gRPC status or
an HTTP status and JSON body by the transport that received the request. Lives here, below
every subpackage, so that each of them can raise it without importing the others.
"""

from __future__ import annotations

import grpc


class InferenceError(Exception):
    """A request that cannot be served; `code` is the gRPC status to answer with."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def invalid(message: str) -> InferenceError:
    return InferenceError(grpc.StatusCode.INVALID_ARGUMENT, message)
