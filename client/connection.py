"""The gRPC transport (client/transport.py): one channel to a KServe v2 / Triton server.

Everything here speaks only the standard protocol (docs/design.md §4), so the client works
against our server, Triton, or any other v2 server. A failed call becomes a `ServerError`:
`<what> failed on HOST:PORT: <CODE>: <the server's message>`, one line.
"""

from __future__ import annotations

import concurrent.futures

import grpc
import numpy as np

from client.inference import image_request, output_array
from client.security import PLAINTEXT, ClientSecurity, SecurityError, open_channel
from client.transport import (
    DEFAULT_PROBE_TIMEOUT_S,
    ClientError,
    ImageModel,
    ModelMetadata,
    ServerError,
    ServerMetadata,
    TensorSpec,
    Transport,
    first_line,
    unreachable,
)
from ensemble_serving.protocol import grpc_service_pb2 as pb
from ensemble_serving.protocol import grpc_service_pb2_grpc as pb_grpc

# A batch of 10,000 CIFAR images is 30 MB; the gRPC default cap of 4 MB would refuse it.
UNLIMITED_MESSAGES = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
# How servers answer ModelReady for a model they do not have: some ready=false, others one of these.
_UNKNOWN_MODEL_CODES = (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INVALID_ARGUMENT)
# The server judged the request itself wrong or unsupported (ServerError.refused).
_REFUSED_CODES = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNIMPLEMENTED)
UNREACHABLE_HINT = ("is the server running, and is --url its gRPC port, 8001 by default? "
                    "For HTTP/REST write http://HOST:PORT")  # fmt: skip


def normalize_url(url: str) -> str:
    """Accept HOST:PORT, or grpc://HOST:PORT as some tools write it."""
    if url.startswith("grpc://"):
        url = url[len("grpc://"):]
    url = url.rstrip("/")
    if not url or ":" not in url:
        raise ClientError(f"--url {url!r} is not HOST:PORT (for example localhost:8001) nor an http:// URL")
    return url


class GrpcConnection(Transport):
    """A channel (plaintext, TLS or mutual TLS; see client/security.py) + stub with error translation."""

    protocol = "grpc"

    def __init__(self, url: str, timeout_s: float = DEFAULT_PROBE_TIMEOUT_S, security: ClientSecurity = PLAINTEXT):
        self.url = normalize_url(url)
        self.timeout_s = timeout_s
        try:
            self.channel = open_channel(self.url, security, options=UNLIMITED_MESSAGES)
        except SecurityError as error:
            raise ClientError(str(error)) from None
        self.stub = pb_grpc.GRPCInferenceServiceStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def call(self, method: str, request, what: str):
        """Run stub.<method>(request); turn a gRPC failure into a ServerError saying `what` failed."""
        try:
            return getattr(self.stub, method)(request, timeout=self.timeout_s)
        except grpc.RpcError as error:
            raise rpc_error(error, what, self.url) from None

    # ------------------------------------------------------------------ server

    def check_live(self) -> ServerMetadata:
        try:
            live = self.stub.ServerLive(pb.ServerLiveRequest(), timeout=self.timeout_s).live
        except grpc.RpcError as error:
            if error.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise unreachable(self.url, error.details(), UNREACHABLE_HINT) from None
            raise rpc_error(error, "ServerLive", self.url) from None
        if not live:
            raise ClientError(f"server at {self.url} answers but reports it is not live")
        metadata = self.call("ServerMetadata", pb.ServerMetadataRequest(), "ServerMetadata")
        return ServerMetadata(name=metadata.name, version=metadata.version, extensions=tuple(metadata.extensions))

    def server_ready(self) -> bool:
        return self.call("ServerReady", pb.ServerReadyRequest(), "ServerReady").ready

    def repository_index(self) -> list[dict] | None:
        try:
            index = self.stub.RepositoryIndex(pb.RepositoryIndexRequest(), timeout=self.timeout_s)
        except grpc.RpcError:
            return None
        entries = [{"name": m.name, "version": m.version, "state": m.state, "reason": m.reason} for m in index.models]
        return sorted(entries, key=lambda entry: entry["name"])

    # ------------------------------------------------------------------ models

    def model_ready(self, name: str, version: str = "") -> bool:
        try:
            return self.stub.ModelReady(pb.ModelReadyRequest(name=name, version=version), timeout=self.timeout_s).ready
        except grpc.RpcError as error:
            if error.code() in _UNKNOWN_MODEL_CODES:
                return False
            raise rpc_error(error, f"ModelReady({name})", self.url) from None

    def model_metadata(self, name: str, version: str = "") -> ModelMetadata:
        metadata = self.call("ModelMetadata", pb.ModelMetadataRequest(name=name, version=version),
                             f"ModelMetadata({name})")  # fmt: skip
        return ModelMetadata(
            name=metadata.name,
            platform=metadata.platform,
            versions=tuple(metadata.versions),
            inputs=tuple(tensor_spec(t) for t in metadata.inputs),
            outputs=tuple(tensor_spec(t) for t in metadata.outputs),
        )

    def max_batch_size(self, name: str, version: str = "") -> int:
        try:
            response = self.stub.ModelConfig(pb.ModelConfigRequest(name=name, version=version), timeout=self.timeout_s)
        except grpc.RpcError:
            return 0
        return max(0, int(response.config.max_batch_size))

    # ------------------------------------------------------------------ inference

    def infer(self, model: ImageModel, images: np.ndarray, class_count: int = 0) -> np.ndarray:
        try:
            response = self.stub.ModelInfer(image_request(model, images, class_count), timeout=self.timeout_s)
        except grpc.RpcError as error:
            raise inference_error(error, model.name, self.url) from None
        return output_array(response, model.probabilities_output.name)

    def submit_infer(self, model: ImageModel, images: np.ndarray) -> concurrent.futures.Future:
        result: concurrent.futures.Future = concurrent.futures.Future()
        call = self.stub.ModelInfer.future(image_request(model, images), timeout=self.timeout_s)
        call.add_done_callback(lambda done: self._settle(result, done, model))
        return result

    def _settle(self, result: concurrent.futures.Future, call: grpc.Future, model: ImageModel) -> None:
        """Runs on a gRPC thread when the call ends: pass its outcome on, translated."""
        try:
            result.set_result(output_array(call.result(), model.probabilities_output.name))
        except grpc.RpcError as error:
            result.set_exception(inference_error(error, model.name, self.url))
        except Exception as error:  # a bad response (ClientError) or anything else: never lost in a callback
            result.set_exception(error)


def tensor_spec(tensor: pb.ModelMetadataResponse.TensorMetadata) -> TensorSpec:
    return TensorSpec(name=tensor.name, datatype=tensor.datatype, shape=tuple(int(d) for d in tensor.shape))


def status_text(error: grpc.RpcError) -> str:
    """`<CODE>: <first line of the server's message>`."""
    code = error.code().name if error.code() is not None else "UNKNOWN"
    return f"{code}: {first_line(error.details())}"


def rpc_error(error: grpc.RpcError, what: str, url: str, hint: str = "") -> ServerError:
    """`<what> failed on HOST:PORT: <CODE>: <server's message><hint>` as one line: every gRPC failure the client reports."""
    return ServerError(what, url, status_text(error), refused=error.code() in _REFUSED_CODES, hint=hint)


def inference_error(error: grpc.RpcError, model_name: str, url: str) -> ServerError:
    hint = " (raise --timeout, or lower --batch-size)" if error.code() == grpc.StatusCode.DEADLINE_EXCEEDED else ""
    return rpc_error(error, f"inference on model {model_name!r}", url, hint)
