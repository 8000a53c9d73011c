"""What the client needs from a KServe v2 server, whatever the wire: gRPC or HTTP/REST.

evaluate, predict and status talk to a `Transport`. Two implement it:

  client/connection.py       GrpcConnection  HOST:PORT (the default; Triton's port 8001)
  client/http_connection.py  HttpConnection  http://HOST:PORT or https://HOST:PORT (port 8000)

`connect(url, ...)` (client/connect.py) picks one from the URL's scheme. A transport implements the few
protocol calls below (each raising a one-line `ClientError`); the checks made before
sending data (is the model there, is it ready, is it an image classifier) are written
once, here, on top of them, so both protocols give the same messages.
"""

from __future__ import annotations

import abc
import concurrent.futures
import dataclasses
from dataclasses import dataclass

import numpy as np

DEFAULT_PROBE_TIMEOUT_S = 10.0
HTTP_SCHEMES = ("http://", "https://")


class ClientError(Exception):
    """A problem the user can fix (server down, wrong model, wrong data); one line of text."""


class ServerError(ClientError):
    """The server answered a request with an error.

    `status` is the short form (`NOT_FOUND: ...` over gRPC, `HTTP 404: ...` over HTTP);
    `refused` is True when the server judged the request itself invalid or unsupported
    (gRPC INVALID_ARGUMENT / UNIMPLEMENTED, HTTP 400 / 501): predict then retries
    without the classification extension.
    """

    def __init__(self, what: str, url: str, status: str, refused: bool = False, hint: str = ""):
        self.status = status
        self.refused = refused
        super().__init__(f"{what} failed on {url}: {status}{hint}")


@dataclass(frozen=True)
class TensorSpec:
    name: str
    datatype: str
    shape: tuple[int, ...]  # as the server reports it: with the batch dimension when batching

    def describe(self) -> str:
        return f"{self.name} {self.datatype} {list(self.shape)}"


@dataclass(frozen=True)
class ServerMetadata:
    name: str
    version: str
    extensions: tuple[str, ...] = ()


@dataclass(frozen=True)
class ModelMetadata:
    """A model's metadata as both protocols report it (ModelMetadata / GET /v2/models/{m})."""

    name: str
    platform: str
    versions: tuple[str, ...] = ()
    inputs: tuple[TensorSpec, ...] = ()
    outputs: tuple[TensorSpec, ...] = ()


@dataclass(frozen=True)
class ImageModel:
    """What the client needs to know about an image classifier on the server."""

    name: str
    version: str  # "" = the server's default version
    platform: str
    image_input: TensorSpec
    probabilities_output: TensorSpec
    max_batch_size: int = 0  # from the model's config when the server has it; 0 = unknown / no limit known

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

    def input_shape(self, images: np.ndarray) -> list[int]:
        """The shape to declare for `images` [N, H, W, C]: without N for a non-batching model."""
        return list(images.shape) if self.batched else list(images.shape[1:])


# --------------------------------------------------------------------------- the transport


class Transport(abc.ABC):
    """One connection to a v2 server. Use as a context manager.

    Subclasses set the three attributes and implement the protocol calls; every method
    raises `ClientError` (often a `ServerError`) with one line naming what failed, on
    which server, and why.
    """

    protocol: str  # "grpc" or "http"
    url: str  # as shown in messages and reports
    timeout_s: float  # for each request

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # ------------------------------------------------------------------ the protocol calls

    @abc.abstractmethod
    def close(self) -> None: ...

    @abc.abstractmethod
    def check_live(self) -> ServerMetadata:
        """Fail with 'server unreachable' unless the server answers and is live; return its metadata."""

    @abc.abstractmethod
    def server_ready(self) -> bool: ...

    @abc.abstractmethod
    def repository_index(self) -> list[dict] | None:
        """{name, version, state, reason} entries sorted by name; None where the server has no index.

        The index is Triton's extension, not core v2; check_model_ready and `client status` start here.
        """

    @abc.abstractmethod
    def model_ready(self, name: str, version: str = "") -> bool:
        """False also where the server answers 'unknown model' (servers differ in how they say it)."""

    @abc.abstractmethod
    def model_metadata(self, name: str, version: str = "") -> ModelMetadata: ...

    @abc.abstractmethod
    def max_batch_size(self, name: str, version: str = "") -> int:
        """The model's max_batch_size from its config (Triton's model_configuration extension).

        Requests larger than this are refused, so the client splits its batches to fit.
        0 where the server does not offer the config (the batches are then sent as asked).
        """

    @abc.abstractmethod
    def infer(self, model: ImageModel, images: np.ndarray, class_count: int = 0) -> np.ndarray:
        """Send `images` (uint8 [N, H, W, C]; N = 1 for a non-batching model); return the
        probabilities output as the server shaped it.

        class_count > 0 asks for the classification extension: the output then holds the
        top class_count classes as "score:index:label" strings (a BYTES / object array).
        """

    @abc.abstractmethod
    def submit_infer(self, model: ImageModel, images: np.ndarray) -> concurrent.futures.Future:
        """`infer` without waiting: a future of its result (or of its ClientError)."""

    # ------------------------------------------------------------------ the checks, written once

    def model_index(self) -> dict[str, str] | None:
        """{name: why it is not ready ("" when ready)}; None where the server has no index."""
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
        if self.model_ready(name, version):
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
        model = image_model_from_metadata(self.model_metadata(name, version), version)
        return dataclasses.replace(model, max_batch_size=self.max_batch_size(name, version))


# --------------------------------------------------------------------------- reading metadata


def image_model_from_metadata(metadata: ModelMetadata, version: str = "") -> ImageModel:
    """Pick the image input and probability output out of a model's metadata, or explain why not."""
    name = metadata.name
    inputs = metadata.inputs
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
    probabilities = _pick_probabilities_output(name, list(metadata.outputs))
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


def first_line(text: str) -> str:
    return (text or "").strip().splitlines()[0] if (text or "").strip() else "no details"


def unreachable(url: str, detail: str, hint: str) -> ClientError:
    """The one message for a server that does not answer at all, over either protocol."""
    return ClientError(f"server unreachable at {url}: {first_line(detail)} ({hint})")
