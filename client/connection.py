"""One gRPC channel to a KServe v2 / Triton server, and the checks made before sending data.

Everything here speaks only the standard protocol (docs/design.md §4), so the client works
against our server, Triton, or any other v2 server. Failures become a `ClientError`
whose message is one line a person can act on; the CLI prints it and exits non-zero.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import grpc

from client.security import PLAINTEXT, ClientSecurity, SecurityError, open_channel
from ensemble_serving.protocol import grpc_service_pb2 as pb
from ensemble_serving.protocol import grpc_service_pb2_grpc as pb_grpc

# A batch of 10,000 CIFAR images is 30 MB; the gRPC default cap of 4 MB would refuse it.
UNLIMITED_MESSAGES = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
DEFAULT_PROBE_TIMEOUT_S = 10.0

class ClientError(Exception):
    """A problem the user can fix (server down, wrong model, wrong data); one line of text."""


@dataclass(frozen=True)
class TensorSpec:
    name: str
    datatype: str
    shape: tuple[int, ...]  # as the server reports it: with the batch dimension when batching

    def describe(self) -> str:
        return f"{self.name} {self.datatype} {list(self.shape)}"


@dataclass(frozen=True)
class ImageModel:
    """What the client needs to know about an image classifier on the server."""

    name: str
    version: str  # "" = the server's default version
    platform: str
    image_input: TensorSpec
    probabilities_output: TensorSpec
    max_batch_size: int = 0  # from ModelConfig when the server has it; 0 = unknown / no limit known

    @property
    def batched(self) -> bool:
        """True when the model takes a leading batch dimension ([-1, H, W, C])."""
        return len(self.image_input.shape) == 4

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(H, W, C) of one image; -1 where the model accepts any size."""
        return tuple(self.image_input.shape[-3:])

    @property
    def num_classes(self) -> int:
        return self.probabilities_output.shape[-1]


def normalize_url(url: str) -> str:
    """Accept HOST:PORT, or grpc://HOST:PORT as some tools write it."""
    for scheme in ("grpc://", "http://"):
        if url.startswith(scheme):
            url = url[len(scheme):]
    url = url.rstrip("/")
    if not url or ":" not in url:
        raise ClientError(f"--url {url!r} is not HOST:PORT (for example localhost:8001)")
    return url


class Connection:
    """A channel (plaintext, TLS or mutual TLS; see client/security.py) + stub with error translation.

    Use as a context manager.
    """

    def __init__(self, url: str, timeout_s: float = DEFAULT_PROBE_TIMEOUT_S, security: ClientSecurity = PLAINTEXT):
        self.url = normalize_url(url)
        self.timeout_s = timeout_s
        try:
            self.channel = open_channel(self.url, security, options=UNLIMITED_MESSAGES)
        except SecurityError as error:
            raise ClientError(str(error)) from None
        self.stub = pb_grpc.GRPCInferenceServiceStub(self.channel)

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    # ------------------------------------------------------------------ plain RPCs

    def call(self, method: str, request, what: str):
        """Run stub.<method>(request); turn a gRPC failure into a ClientError saying `what` failed."""
        try:
            return getattr(self.stub, method)(request, timeout=self.timeout_s)
        except grpc.RpcError as error:
            raise rpc_error(error, what, self.url) from None

    def check_live(self) -> pb.ServerMetadataResponse:
        """Fail with 'server unreachable' unless the server answers; return its metadata."""
        try:
            live = self.stub.ServerLive(pb.ServerLiveRequest(), timeout=self.timeout_s).live
        except grpc.RpcError as error:
            if error.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise ClientError(
                    f"server unreachable at {self.url}: {first_line(error.details())} "
                    "(is the server running, and is --url its gRPC port, 8001 by default?)"
                ) from None
            raise rpc_error(error, "ServerLive", self.url) from None
        if not live:
            raise ClientError(f"server at {self.url} answers but reports it is not live")
        return self.call("ServerMetadata", pb.ServerMetadataRequest(), "ServerMetadata")

    def repository_index(self) -> list[dict] | None:
        """RepositoryIndex as {name, version, state, reason} entries sorted by name; None where the server has none.

        The one place the client reads it: check_model_ready and `client status` both start here.
        """
        try:
            index = self.stub.RepositoryIndex(pb.RepositoryIndexRequest(), timeout=self.timeout_s)
        except grpc.RpcError:
            return None  # RepositoryIndex is Triton's extension, not core v2
        entries = [{"name": m.name, "version": m.version, "state": m.state, "reason": m.reason} for m in index.models]
        return sorted(entries, key=lambda entry: entry["name"])

    def model_index(self) -> dict[str, str] | None:
        """{name: why it is not ready ("" when ready)}; None where the server has no RepositoryIndex."""
        entries = self.repository_index()
        if entries is None:
            return None
        reasons: dict[str, str] = {}
        for entry in entries:  # one entry per version; any ready version makes the model ready
            if entry["state"] == "READY":
                reasons[entry["name"]] = ""
            else:
                reasons.setdefault(entry["name"], f"{entry['state']} {entry['reason']}".strip())
        return reasons

    def check_model_ready(self, name: str, version: str = "") -> None:
        """Fail with 'not found' or 'not ready', naming the models the server does have."""
        try:
            ready = self.stub.ModelReady(pb.ModelReadyRequest(name=name, version=version),
                                         timeout=self.timeout_s).ready  # fmt: skip
        except grpc.RpcError as error:
            # Servers differ: some answer ready=false for an unknown model, others an error.
            if error.code() not in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAVAILABLE,
                                    grpc.StatusCode.INVALID_ARGUMENT):  # fmt: skip
                raise rpc_error(error, f"ModelReady({name})", self.url) from None
            ready = False
        if ready:
            return
        index = self.model_index()
        label = f"{name!r}" + (f" version {version}" if version else "")
        if index is not None and name not in index:
            available = ", ".join(sorted(index)) if index else "none"
            raise ClientError(f"model {label} not found on server {self.url} (available: {available})")
        reason = f": {index[name]}" if index and index.get(name) else ""
        raise ClientError(f"model {label} is on server {self.url} but not ready{reason}")

    def image_model(self, name: str, version: str = "") -> ImageModel:
        """Check the model is ready and is an image classifier; return its signature."""
        self.check_model_ready(name, version)
        metadata = self.call("ModelMetadata", pb.ModelMetadataRequest(name=name, version=version),
                             f"ModelMetadata({name})")  # fmt: skip
        model = image_model_from_metadata(metadata, version)
        return dataclasses.replace(model, max_batch_size=self.max_batch_size(name, version))

    def max_batch_size(self, name: str, version: str = "") -> int:
        """The model's max_batch_size from ModelConfig (Triton's model_configuration extension).

        Requests larger than this are refused, so the client splits its batches to fit.
        0 where the server does not offer ModelConfig (the batches are then sent as asked).
        """
        try:
            response = self.stub.ModelConfig(pb.ModelConfigRequest(name=name, version=version), timeout=self.timeout_s)
        except grpc.RpcError:
            return 0
        return max(0, int(response.config.max_batch_size))


def image_model_from_metadata(metadata: pb.ModelMetadataResponse, version: str = "") -> ImageModel:
    """Pick the image input and probability output out of a model's metadata, or explain why not."""
    name = metadata.name
    inputs = [tensor_spec(t) for t in metadata.inputs]
    outputs = [tensor_spec(t) for t in metadata.outputs]
    if len(inputs) != 1 or len(inputs[0].shape) not in (3, 4):
        found = "; ".join(t.describe() for t in inputs) or "none"
        raise ClientError(
            f"model {name!r} is not an image classifier this client can feed: it needs one input "
            f"of shape [-1, H, W, C] (or [H, W, C]), the model has: {found}"
        )
    image_input = inputs[0]
    if image_input.datatype != "UINT8":
        raise ClientError(
            f"model {name!r} input {image_input.describe()} takes {image_input.datatype}; this client "
            "sends raw pixels as UINT8 (normalization belongs inside the model, docs/design.md §3)"
        )
    probabilities = _pick_probabilities_output(name, outputs)
    return ImageModel(
        name=name,
        version=version,
        platform=metadata.platform,
        image_input=image_input,
        probabilities_output=probabilities,
    )


def _pick_probabilities_output(model_name: str, outputs: list[TensorSpec]) -> TensorSpec:
    by_name = {t.name: t for t in outputs}
    candidate = by_name.get("probabilities") or (outputs[0] if len(outputs) == 1 else None)
    if candidate is None or candidate.datatype not in ("FP32", "FP16", "FP64") or len(candidate.shape) not in (1, 2):
        found = "; ".join(t.describe() for t in outputs) or "none"
        raise ClientError(
            f"model {model_name!r} has no class-score output: expected 'probabilities' FP32 "
            f"[-1, num_classes], the model has: {found}"
        )
    return candidate


def tensor_spec(tensor: pb.ModelMetadataResponse.TensorMetadata) -> TensorSpec:
    return TensorSpec(name=tensor.name, datatype=tensor.datatype, shape=tuple(int(d) for d in tensor.shape))


def first_line(text: str) -> str:
    return (text or "").strip().splitlines()[0] if (text or "").strip() else "no details"


def status_text(error: grpc.RpcError) -> str:
    """`<CODE>: <first line of the server's message>`."""
    code = error.code().name if error.code() is not None else "UNKNOWN"
    return f"{code}: {first_line(error.details())}"


def rpc_error(error: grpc.RpcError, what: str, url: str, hint: str = "") -> ClientError:
    """`<what> failed on HOST:PORT: <CODE>: <server's message><hint>` as one line: every gRPC failure the client reports."""
    return ClientError(f"{what} failed on {url}: {status_text(error)}{hint}")
