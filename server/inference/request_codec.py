"""ModelInfer requests in, responses out: decoding, validation and encoding.

Both transports read a request into the same `WireRequest` (gRPC's message through
`from_grpc`, HTTP's JSON in server.transport.http_codec), and one decoder checks it against the
model's config and turns each input into a numpy array: raw bytes with np.frombuffer (no
copy), gRPC's typed `contents` with np.fromiter. Any mismatch raises `InferenceError` with
the gRPC status to answer and a one-line message naming what was received and what was
expected. The answer is a `WireResponse`, which each transport writes its own way
(`to_grpc` here).

BYTES tensors are held as object arrays of str: onnxruntime's Python API takes and gives
string tensors as str, copying every byte including NULs, but only UTF-8 text (a bytes
object it would turn into its repr, and a str it cannot encode it refuses). So a BYTES
element is decoded as UTF-8 here, and one that is not UTF-8 is refused, naming it.

An input or requested output may name a system shared-memory region (parameters
`shared_memory_region`, `shared_memory_byte_size`, `shared_memory_offset`, as Triton's):
the service reads such an input's bytes from the region before decoding, and writes such
an output into it after encoding (server/inference/shared_memory.py).

Outputs always travel raw (gRPC's `raw_output_contents`: what Triton does, and what
tritonclient's `as_numpy` expects); an output written to shared memory has an empty one.
An output requested with the classification parameter (`classification: k`, which
tritonclient's class_count sends) is replaced by a BYTES tensor [batch, k] of
"score:index:label" strings, best first (Triton's classification extension).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from ensemble_serving.protocol import grpc_service_pb2 as pb
from ensemble_serving.tensors import (
    CONTENTS_DTYPES,
    CONTENTS_FIELD,
    bf16_to_float32,
    deserialize_bytes,
    serialize_bytes,
)
from server.errors import InferenceError, invalid
from server.inference.shared_memory import Region
from server.models.repository import ModelSpec, TensorSpec
from server.scheduling.batcher import Tensors

# The output parameter asking for top-k classes: "classification" is what Triton and
# tritonclient (InferRequestedOutput(name, class_count=k)) send; "class_count" is accepted too.
CLASSIFICATION_PARAMETERS = ("classification", "class_count")
SHM_REGION, SHM_BYTE_SIZE, SHM_OFFSET = "shared_memory_region", "shared_memory_byte_size", "shared_memory_offset"


class RequestedOutput(NamedTuple):  # NamedTuples here: made on every request, and cheaper than frozen dataclasses
    name: str
    class_count: int = 0  # > 0: answer top-k "score:index:label" strings instead of the tensor
    region: Region | None = None  # write it into this shared-memory region


@dataclass(slots=True)
class WireInput:
    """One input tensor as a transport carried it, not yet checked against the model."""

    name: str
    datatype: str
    shape: list[int]
    raw: bytes | memoryview | None  # its bytes, row-major; None: gRPC's typed `contents` (or `region`)
    contents: pb.InferTensorContents | None = None
    region: Region | None = None  # its bytes lie in this shared-memory region (read into `raw` first)


@dataclass(slots=True)
class WireRequest:
    """A ModelInfer request as either transport read it."""

    model_name: str
    model_version: str
    id: str
    inputs: list[WireInput]
    outputs: list[RequestedOutput]  # empty: every output of the model
    # What the transport found wrong in the message itself (gRPC: raw contents that do not
    # pair with the inputs); raised by the decoder, so that it counts against the model.
    malformed: str = ""


@dataclass(slots=True)
class WireOutput:
    name: str
    datatype: str
    shape: list[int]
    raw: bytes  # empty once written to `region`
    region: Region | None = None


@dataclass(slots=True)
class WireResponse:
    model_name: str
    model_version: str
    id: str
    outputs: list[WireOutput]


class DecodedRequest(NamedTuple):
    inputs: Tensors
    batch_size: int
    outputs: tuple[RequestedOutput, ...]


def _expected_inputs(spec: ModelSpec) -> str:
    return ", ".join(tensor.describe(spec.batching) for tensor in spec.inputs)


def _check_shape(tensor: WireInput, expected: TensorSpec, spec: ModelSpec) -> list[int]:
    shape = tensor.shape
    wanted = expected.shape(spec.batching)
    fits = len(shape) == len(wanted) and all(w in (-1, s) and s >= 0 for s, w in zip(shape, wanted))
    if not fits:
        raise invalid(f"unexpected shape for input {tensor.name!r} for model {spec.name!r}. Expected {wanted}, "
                      f"got {shape}" + (" (batch dimension first)" if spec.batching else ""))
    if spec.batching:
        if shape[0] < 1:
            raise invalid(f"input {tensor.name!r} has batch size {shape[0]}; expected at least 1")
        if shape[0] > spec.max_batch_size:
            raise invalid(f"inference request batch-size must be <= {spec.max_batch_size} for {spec.name!r} "
                          f"(input {tensor.name!r} has batch size {shape[0]}; max_batch_size {spec.max_batch_size})")
    return shape


def _from_raw(tensor: WireInput, expected: TensorSpec, shape: list[int]) -> np.ndarray:
    count = math.prod(shape)
    if expected.datatype == "BYTES":
        try:
            items = deserialize_bytes(tensor.raw)
        except ValueError as error:
            raise invalid(f"raw content of BYTES input {tensor.name!r} is not length-prefixed elements: {error}"
                          ) from None
        return _text_array(tensor.name, items, shape)
    needed = count * expected.dtype.itemsize
    if len(tensor.raw) != needed:
        raise invalid(f"raw content of input {tensor.name!r} has {len(tensor.raw)} bytes; shape {shape} "
                      f"{expected.datatype} needs {needed} bytes")
    return np.frombuffer(tensor.raw, dtype=expected.dtype).reshape(shape)


def _from_contents(tensor: WireInput, expected: TensorSpec, shape: list[int]) -> np.ndarray:
    field = CONTENTS_FIELD.get(expected.datatype)
    if field is None:
        raise invalid(f"input {tensor.name!r} is {expected.datatype}, which travels only in raw_input_contents")
    filled = [name.name for name, _ in tensor.contents.ListFields()]
    if filled and filled != [field]:
        raise invalid(f"input {tensor.name!r} ({expected.datatype}) carries data in contents.{', '.join(filled)}; "
                      f"expected contents.{field}")
    values = getattr(tensor.contents, field)
    count = math.prod(shape)
    if len(values) != count:
        raise invalid(f"input {tensor.name!r} has {len(values)} values in contents.{field}; "
                      f"shape {shape} needs {count}")
    if field == "bytes_contents":
        return _text_array(tensor.name, values, shape)
    array = np.fromiter(values, dtype=CONTENTS_DTYPES[field], count=count)
    if array.dtype != expected.dtype:
        info = np.iinfo(expected.dtype)
        if count and (array.min() < info.min or array.max() > info.max):
            raise invalid(f"input {tensor.name!r} has values outside the {expected.datatype} range "
                          f"[{info.min}, {info.max}] (got {array.min()}..{array.max()})")
        array = array.astype(expected.dtype)
    return array.reshape(shape)


def _text_array(name: str, items, shape: list[int]) -> np.ndarray:
    """BYTES elements as the object array of str onnxruntime takes (see the module's note)."""
    count = math.prod(shape)
    if len(items) != count:
        raise invalid(f"input {name!r} has {len(items)} BYTES elements; shape {shape} needs {count}")
    array = np.empty(count, dtype=object)
    for index, item in enumerate(items):
        try:
            array[index] = item.decode("utf-8")
        except UnicodeDecodeError as error:
            raise invalid(f"input {name!r}: BYTES element {index} is not UTF-8 ({error.reason} at byte "
                          f"{error.start}); onnxruntime's string tensors hold UTF-8 text (NULs included)") from None
    return array.reshape(shape)


def text_bytes(array: np.ndarray) -> bytes:
    """A BYTES tensor (object array of str, or of bytes) as its raw length-prefixed contents."""
    return serialize_bytes([item if isinstance(item, bytes) else str(item).encode("utf-8") for item in array.flat])


def decode_request(request: WireRequest, spec: ModelSpec) -> DecodedRequest:
    if request.malformed:
        raise invalid(request.malformed)
    if not request.inputs:
        raise invalid(f"request has no inputs; model {spec.name!r} expects {_expected_inputs(spec)}")
    declared = {tensor.name: tensor for tensor in spec.inputs}
    inputs: Tensors = {}
    batch_sizes = set()
    for tensor in request.inputs:
        expected = declared.get(tensor.name)
        if expected is None:
            raise invalid(f"unexpected inference input {tensor.name!r} for model {spec.name!r}; "
                          f"it expects {_expected_inputs(spec)}")
        if tensor.name in inputs:
            raise invalid(f"input {tensor.name!r} appears twice in the request")
        if tensor.datatype != expected.datatype:
            raise invalid(f"input {tensor.name!r} has datatype {tensor.datatype or '(empty)'}; "
                          f"model {spec.name!r} expects {expected.datatype}")
        shape = _check_shape(tensor, expected, spec)
        if tensor.raw is not None:
            inputs[tensor.name] = _from_raw(tensor, expected, shape)
        else:
            inputs[tensor.name] = _from_contents(tensor, expected, shape)
        batch_sizes.add(shape[0] if spec.batching else 1)
    if len(inputs) != len(declared):
        missing = [name for name in declared if name not in inputs]
        raise invalid(f"expected {len(declared)} inputs but got {len(inputs)} inputs for model {spec.name!r}. "
                      f"Got input(s) {list(inputs)}, but missing required input(s) {missing}. Please provide all "
                      f"required input(s): {_expected_inputs(spec)}")
    if len(batch_sizes) > 1:
        raise invalid(f"inputs have different batch sizes {sorted(batch_sizes)}; they must agree")
    return DecodedRequest(inputs, batch_sizes.pop(), _requested_outputs(request.outputs, spec))


def _requested_outputs(outputs: list[RequestedOutput], spec: ModelSpec) -> tuple[RequestedOutput, ...]:
    if not outputs:
        return tuple(RequestedOutput(tensor.name) for tensor in spec.outputs)
    known = {tensor.name for tensor in spec.outputs}
    for output in outputs:
        if output.name not in known:
            raise invalid(f"unexpected inference output {output.name!r} for model {spec.name!r}; it has "
                          f"{', '.join(repr(name) for name in sorted(known))}")
    return tuple(outputs)


def requested_output(name: str, key: str | None = None, class_count: int = 0,
                     region: Region | None = None) -> RequestedOutput:  # fmt: skip
    """An output as a client asked for it; `key` names the classification parameter it
    was asked with (its `class_count` must then be at least 1)."""
    if key is not None and class_count < 1:
        raise invalid(f"output {name!r}: parameter {key!r} is {class_count}; expected at least 1")
    return RequestedOutput(name, class_count, region)


def shm_region(what: str, parameters: dict) -> Region | None:
    """The shared-memory region a tensor's parameters name ({key: value}), or None."""
    if SHM_REGION not in parameters:
        stray = [key for key in (SHM_BYTE_SIZE, SHM_OFFSET) if key in parameters]
        if stray:
            raise invalid(f"{what}: parameter {stray[0]!r} needs {SHM_REGION!r} too")
        return None
    name = parameters[SHM_REGION]
    if not isinstance(name, str) or not name:
        raise invalid(f"{what}: parameter {SHM_REGION!r} must be a region's name, got {name!r}")
    if SHM_BYTE_SIZE not in parameters:
        raise invalid(f"{what}: shared memory region {name!r} needs parameter {SHM_BYTE_SIZE!r}")
    sizes = [parameters.get(key, 0) for key in (SHM_BYTE_SIZE, SHM_OFFSET)]
    for key, value in zip((SHM_BYTE_SIZE, SHM_OFFSET), sizes):
        if type(value) is not int or value < 0:
            raise invalid(f"{what}: parameter {key!r} must be a byte count >= 0, got {value!r}")
    return Region(name, sizes[0], sizes[1])


def classify(scores: np.ndarray, class_count: int, labels: tuple[str, ...]) -> tuple[bytes, list[int]]:
    """Top-k of each row of `scores` [batch, classes] as "score:index[:label]" BYTES [batch, k].
    NaN scores sort last and print as "nan"."""
    rows = scores.reshape(scores.shape[0], -1) if scores.ndim > 1 else scores.reshape(1, -1)
    k = min(class_count, rows.shape[1])
    order = np.argsort(-rows, axis=1, kind="stable")[:, :k]
    items = []
    for row, indices in zip(rows, order):
        for index in indices:
            text = f"{row[index]:f}:{index}"
            if index < len(labels):
                text += f":{labels[index]}"
            items.append(text.encode())
    return serialize_bytes(items), [rows.shape[0], k] if scores.ndim > 1 else [k]


def encode_response(spec: ModelSpec, version: str, request_id: str, outputs: Tensors,
                    requested: tuple[RequestedOutput, ...]) -> WireResponse:  # fmt: skip
    declared = {tensor.name: tensor for tensor in spec.outputs}
    tensors = []
    for wanted in requested:
        array = outputs[wanted.name]
        if wanted.class_count:
            if declared[wanted.name].datatype == "BF16":  # scores, not their bit patterns
                array = bf16_to_float32(array).reshape(array.shape)
            data, shape = classify(array, wanted.class_count, declared[wanted.name].labels)
            tensors.append(WireOutput(wanted.name, "BYTES", shape, data))
        elif array.dtype == object:
            tensors.append(WireOutput(wanted.name, "BYTES", list(array.shape), text_bytes(array)))
        else:
            tensors.append(WireOutput(wanted.name, declared[wanted.name].datatype, list(array.shape),
                                      np.ascontiguousarray(array).tobytes()))
        tensors[-1].region = wanted.region
    return WireResponse(spec.name, version, request_id, tensors)


# -- gRPC's messages ----------------------------------------------------------------------------
def from_grpc(request: pb.ModelInferRequest) -> WireRequest:
    raw = request.raw_input_contents
    malformed = ""
    regions: list[Region | None] = []
    for tensor in request.inputs:
        try:
            # Only a tensor with parameters can name a region: the rest pay for no lookup.
            regions.append(shm_region(f"input {tensor.name!r}", _parameter_values(tensor.parameters))
                           if tensor.parameters else None)
        except InferenceError as error:
            malformed = malformed or error.message
            regions.append(None)
    # raw_input_contents pair with the inputs that are not in shared memory (as tritonclient sends them)
    unshared = sum(region is None for region in regions)
    if raw and len(raw) != unshared:
        malformed = malformed or (f"request has {len(raw)} raw_input_contents for {unshared} inputs (those not in "
                                  f"shared memory); expected one per input, in the order of `inputs`")
    inputs, next_raw = [], 0
    for tensor, region in zip(request.inputs, regions):
        shape = list(tensor.shape)
        if region is not None:
            inputs.append(WireInput(tensor.name, tensor.datatype, shape, None, None, region))
            continue
        if not raw:
            inputs.append(WireInput(tensor.name, tensor.datatype, shape, None, tensor.contents))
            continue
        if tensor.HasField("contents") and tensor.contents.ListFields():
            malformed = malformed or f"input {tensor.name!r} has both typed contents and raw_input_contents; use one"
        data = raw[next_raw] if next_raw < len(raw) else b""  # a shortfall is `malformed` already
        next_raw += 1
        inputs.append(WireInput(tensor.name, tensor.datatype, shape, data))
    outputs = []
    for output in request.outputs:
        try:
            outputs.append(_grpc_requested_output(output))
        except InferenceError as error:
            malformed = malformed or error.message
    return WireRequest(request.model_name, request.model_version, request.id, inputs, outputs, malformed)


def _parameter_values(parameters) -> dict:
    """A gRPC parameters map's values as Python values (shared-memory keys only: the others
    are read where they are used)."""
    return {key: getattr(parameters[key], parameters[key].WhichOneof("parameter_choice") or "string_param")
            for key in (SHM_REGION, SHM_BYTE_SIZE, SHM_OFFSET) if key in parameters}  # fmt: skip


def _grpc_requested_output(output: pb.ModelInferRequest.InferRequestedOutputTensor) -> RequestedOutput:
    if not output.parameters:
        return requested_output(output.name)
    region = shm_region(f"output {output.name!r}", _parameter_values(output.parameters))
    for key in CLASSIFICATION_PARAMETERS:
        if key in output.parameters:
            parameter = output.parameters[key]
            choice = parameter.WhichOneof("parameter_choice")
            if choice not in ("int64_param", "uint64_param"):
                raise invalid(f"output {output.name!r}: parameter {key!r} must be an integer, got {choice}")
            return requested_output(output.name, key, getattr(parameter, choice), region)
    return requested_output(output.name, region=region)


def to_grpc(response: WireResponse) -> pb.ModelInferResponse:
    message = pb.ModelInferResponse(model_name=response.model_name, model_version=response.model_version,
                                    id=response.id)
    for output in response.outputs:  # built in place: a message passed to the constructor is copied
        tensor = message.outputs.add(name=output.name, datatype=output.datatype, shape=output.shape)
        if output.region is not None:  # as Triton: where it went, and an empty raw contents to keep the order
            tensor.parameters[SHM_REGION].string_param = output.region.name
            tensor.parameters[SHM_BYTE_SIZE].int64_param = output.region.byte_size
            if output.region.offset:
                tensor.parameters[SHM_OFFSET].int64_param = output.region.offset
        message.raw_output_contents.append(output.raw)
    return message
