"""ModelInfer requests in, responses out: decoding, validation and encoding.

Decoding checks a request against the model's config and turns each input into a
numpy array: `raw_input_contents` with np.frombuffer (no copy), typed `contents` with
np.fromiter. Any mismatch raises `InferenceError` with the gRPC status to answer and
a one-line message naming what was received and what was expected.

Encoding always answers in `raw_output_contents` (what Triton does over gRPC, and
what tritonclient's `as_numpy` expects). An output requested with the classification
parameter (`classification: k`, which tritonclient's class_count sends) is replaced by
a BYTES tensor [batch, k] of "score:index:label" strings, best first (Triton's
classification extension).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import grpc
import numpy as np

from ensemble_serving.protocol import grpc_service_pb2 as pb
from ensemble_serving.tensors import CONTENTS_DTYPES, CONTENTS_FIELD, serialize_bytes
from server.repository import ModelSpec, TensorSpec

Tensors = dict[str, np.ndarray]

# The output parameter asking for top-k classes: "classification" is what Triton and
# tritonclient (InferRequestedOutput(name, class_count=k)) send; "class_count" is accepted too.
CLASSIFICATION_PARAMETERS = ("classification", "class_count")


class InferenceError(Exception):
    """A request that cannot be served; `code` is the gRPC status to answer with."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def invalid(message: str) -> InferenceError:
    return InferenceError(grpc.StatusCode.INVALID_ARGUMENT, message)


@dataclass(frozen=True)
class RequestedOutput:
    name: str
    class_count: int = 0  # > 0: answer top-k "score:index:label" strings instead of the tensor


@dataclass(frozen=True)
class DecodedRequest:
    inputs: Tensors
    batch_size: int
    outputs: tuple[RequestedOutput, ...]


def _expected_inputs(spec: ModelSpec) -> str:
    return ", ".join(tensor.describe(spec.batching) for tensor in spec.inputs)


def _check_shape(tensor: pb.ModelInferRequest.InferInputTensor, expected: TensorSpec, spec: ModelSpec) -> list[int]:
    shape = list(tensor.shape)
    wanted = expected.shape(spec.batching)
    fits = len(shape) == len(wanted) and all(w in (-1, s) and s >= 0 for s, w in zip(shape, wanted))
    if not fits:
        raise invalid(f"input {tensor.name!r} has shape {shape}; model {spec.name!r} expects {wanted}"
                      + (" (batch dimension first)" if spec.batching else ""))
    if spec.batching:
        if shape[0] < 1:
            raise invalid(f"input {tensor.name!r} has batch size {shape[0]}; expected at least 1")
        if shape[0] > spec.max_batch_size:
            raise invalid(f"input {tensor.name!r} has batch size {shape[0]}; model {spec.name!r} "
                          f"accepts at most max_batch_size {spec.max_batch_size}")
    return shape


def _from_raw(raw: bytes, tensor, expected: TensorSpec, shape: list[int]) -> np.ndarray:
    count = math.prod(shape)
    needed = count * expected.dtype.itemsize
    if len(raw) != needed:
        raise invalid(f"raw content of input {tensor.name!r} has {len(raw)} bytes; shape {shape} "
                      f"{expected.datatype} needs {needed} bytes")
    return np.frombuffer(raw, dtype=expected.dtype).reshape(shape)


def _from_contents(tensor, expected: TensorSpec, shape: list[int]) -> np.ndarray:
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
    array = np.fromiter(values, dtype=CONTENTS_DTYPES[field], count=count)
    if array.dtype != expected.dtype:
        info = np.iinfo(expected.dtype)
        if count and (array.min() < info.min or array.max() > info.max):
            raise invalid(f"input {tensor.name!r} has values outside the {expected.datatype} range "
                          f"[{info.min}, {info.max}] (got {array.min()}..{array.max()})")
        array = array.astype(expected.dtype)
    return array.reshape(shape)


def decode_request(request: pb.ModelInferRequest, spec: ModelSpec) -> DecodedRequest:
    if not request.inputs:
        raise invalid(f"request has no inputs; model {spec.name!r} expects {_expected_inputs(spec)}")
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise invalid(f"request has {len(raw)} raw_input_contents for {len(request.inputs)} inputs; "
                      f"expected one per input, in the order of `inputs`")
    declared = {tensor.name: tensor for tensor in spec.inputs}
    inputs: Tensors = {}
    batch_sizes = set()
    for index, tensor in enumerate(request.inputs):
        expected = declared.get(tensor.name)
        if expected is None:
            raise invalid(f"unexpected input {tensor.name!r}; model {spec.name!r} expects {_expected_inputs(spec)}")
        if tensor.name in inputs:
            raise invalid(f"input {tensor.name!r} appears twice in the request")
        if tensor.datatype != expected.datatype:
            raise invalid(f"input {tensor.name!r} has datatype {tensor.datatype or '(empty)'}; "
                          f"model {spec.name!r} expects {expected.datatype}")
        shape = _check_shape(tensor, expected, spec)
        if raw:
            if tensor.HasField("contents") and tensor.contents.ListFields():
                raise invalid(f"input {tensor.name!r} has both typed contents and raw_input_contents; use one")
            inputs[tensor.name] = _from_raw(raw[index], tensor, expected, shape)
        else:
            inputs[tensor.name] = _from_contents(tensor, expected, shape)
        batch_sizes.add(shape[0] if spec.batching else 1)
    missing = [name for name in declared if name not in inputs]
    if missing:
        raise invalid(f"request lacks input(s) {missing}; model {spec.name!r} expects {_expected_inputs(spec)}")
    if len(batch_sizes) > 1:
        raise invalid(f"inputs have different batch sizes {sorted(batch_sizes)}; they must agree")
    return DecodedRequest(inputs, batch_sizes.pop(), _requested_outputs(request, spec))


def _requested_outputs(request: pb.ModelInferRequest, spec: ModelSpec) -> tuple[RequestedOutput, ...]:
    if not request.outputs:
        return tuple(RequestedOutput(tensor.name) for tensor in spec.outputs)
    known = {tensor.name for tensor in spec.outputs}
    requested = []
    for output in request.outputs:
        if output.name not in known:
            raise invalid(f"requested output {output.name!r} does not exist; model {spec.name!r} has "
                          f"{', '.join(repr(name) for name in sorted(known))}")
        requested.append(RequestedOutput(output.name, _class_count(output)))
    return tuple(requested)


def _class_count(output: pb.ModelInferRequest.InferRequestedOutputTensor) -> int:
    for key in CLASSIFICATION_PARAMETERS:
        if key in output.parameters:
            parameter = output.parameters[key]
            choice = parameter.WhichOneof("parameter_choice")
            if choice not in ("int64_param", "uint64_param"):
                raise invalid(f"output {output.name!r}: parameter {key!r} must be an integer, got {choice}")
            count = getattr(parameter, choice)
            if count < 1:
                raise invalid(f"output {output.name!r}: parameter {key!r} is {count}; expected at least 1")
            return count
    return 0


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


def encode_response(request: pb.ModelInferRequest, spec: ModelSpec, version: str, outputs: Tensors,
                    requested: tuple[RequestedOutput, ...]) -> pb.ModelInferResponse:  # fmt: skip
    response = pb.ModelInferResponse(model_name=spec.name, model_version=version, id=request.id)
    declared = {tensor.name: tensor for tensor in spec.outputs}
    for wanted in requested:
        array = outputs[wanted.name]
        if wanted.class_count:
            data, shape = classify(array, wanted.class_count, declared[wanted.name].labels)
            response.outputs.add(name=wanted.name, datatype="BYTES", shape=shape)
        else:
            data = np.ascontiguousarray(array).tobytes()
            response.outputs.add(name=wanted.name, datatype=declared[wanted.name].datatype, shape=array.shape)
        response.raw_output_contents.append(data)
    return response
