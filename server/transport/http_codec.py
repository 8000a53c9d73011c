"""KServe v2 REST bodies in and out: JSON, and Triton's binary tensor extension.

An infer request body is a JSON header, optionally followed by binary tensor data:

    {"id": "7", "parameters": {"binary_data_output": true},
     "inputs":  [{"name": "images", "datatype": "UINT8", "shape": [1, 28, 28, 1],
                  "parameters": {"binary_data_size": 784}}],        <- or "data": [...]
     "outputs": [{"name": "probabilities", "parameters": {"classification": 3}}]}
    <784 bytes of pixels>

with the header's length in the `Inference-Header-Content-Length` HTTP header when
binary data follows. `infer_request` reads it into the same `WireRequest` as a gRPC
message (every input raw; binary tensors are views of the body, not copies), so both
transports share one decoder, one validation and one set of messages
(server.inference.request_codec); only what is particular to HTTP (JSON that does not parse, `data`
that does not fit its shape, binary sizes that do not add up) is checked here.
`infer_response` writes the answer back as JSON, or with the outputs the request asked
for in binary after the JSON header.

`message_json` renders the other answers (metadata, config, statistics, index) as Triton
does: protobuf's JSON mapping with the proto field names, and 64-bit integers as
numbers instead of strings.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numpy as np
import orjson
from google.protobuf import descriptor
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message

from ensemble_serving.tensors import NUMPY_DTYPES, bf16_to_float32, deserialize_bytes, float32_to_bf16, serialize_bytes
from server.inference.request_codec import (
    CLASSIFICATION_PARAMETERS,
    RequestedOutput,
    WireInput,
    WireRequest,
    WireResponse,
    invalid,
    requested_output,
    shm_region,
)

HEADER_LENGTH = "inference-header-content-length"
JSON_CONTENT_TYPE = "application/json"
BINARY_CONTENT_TYPE = "application/octet-stream"


@dataclass(frozen=True)
class ResponseFormat:
    """Which outputs go back in binary: by name, and the default for the others."""

    binary_by_default: bool
    binary: dict[str, bool]

    def is_binary(self, output: str) -> bool:
        return self.binary.get(output, self.binary_by_default)


# -- requests -------------------------------------------------------------------------------
def infer_request(body: bytes, header_length: int | None, model: str, version: str
                  ) -> tuple[WireRequest, ResponseFormat, float | None]:  # fmt: skip
    """(the request, how to answer it, its timeout in seconds or None)."""
    header, binary = _split(body, header_length)
    request_id = _typed(header["id"], str, "'id'") if "id" in header else ""
    parameters = json_object(header.get("parameters", {}), "request 'parameters'")
    tensors = header.get("inputs")
    if not isinstance(tensors, list) or not tensors:
        raise invalid("request JSON needs 'inputs': a non-empty list of tensors")
    inputs, offset = [], 0
    for index, tensor in enumerate(tensors):
        tensor, offset = _input(json_object(tensor, f"inputs[{index}]"), binary, offset)
        inputs.append(tensor)
    if offset != len(binary):
        raise invalid(f"the body carries {len(binary)} bytes of binary data after the JSON header; "
                      f"the inputs' binary_data_size add up to {offset}")
    outputs, response_format = _outputs(header.get("outputs", []), parameters)
    return WireRequest(model, version, request_id, inputs, outputs), response_format, _timeout_s(parameters)


def _split(body: bytes, header_length: int | None) -> tuple[dict, memoryview]:
    if header_length is not None and not 0 < header_length <= len(body):
        raise invalid(f"{HEADER_LENGTH} is {header_length}; the body has {len(body)} bytes")
    text = body if header_length is None else body[:header_length]
    return parse_json_object(text, "request JSON", header_length), memoryview(body)[header_length or len(body):]


def parse_json_object(text: bytes, what: str, header_length: int | None = None) -> dict:
    """The JSON object in `text` (a request body, or its first `header_length` bytes); 400
    when it is not one."""
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError as error:  # bad UTF-8 too
        value = _loads_non_finite(text)
        if value is None:
            where = f" (the first {header_length} bytes, per {HEADER_LENGTH})" if header_length else ""
            raise invalid(f"request body{where} is not valid JSON: {error}") from None
    return json_object(value, what)


# Triton reads and writes JSON with rapidjson's NaN-and-Inf flags: a float tensor's NaN,
# Infinity and -Infinity travel as those bare words (tritonclient sends and reads them so),
# where strict JSON, and orjson, have none. orjson stays the fast path; only a body it
# refuses that holds one of the words is read again by the standard library.
_NON_FINITE_WORDS = (b"NaN", b"Infinity")


def _finite_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):  # 1e999: refused, as orjson and rapidjson refuse it
        raise ValueError(f"number {text} is too large for a double")
    return value


def _loads_non_finite(text: bytes):
    """`text` parsed allowing NaN, Infinity and -Infinity; None when it is not JSON even so."""
    text = bytes(text)  # a memoryview has no `in`; a copy only on this rare path
    if not any(word in text for word in _NON_FINITE_WORDS):
        return None
    try:
        value = json.loads(text.decode("utf-8"), parse_float=_finite_float)
        orjson.dumps(value)  # refuses what orjson would have: lone surrogates in strings
    except (ValueError, RecursionError, orjson.JSONEncodeError):  # UnicodeDecodeError, JSONDecodeError too
        return None
    return value


def json_object(value, what: str) -> dict:
    if not isinstance(value, dict):
        raise invalid(f"{what} must be a JSON object, got {type(value).__name__}")
    return value


def _typed(value, kind: type, what: str):
    # bool is an int in Python; a JSON true is not a count.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise invalid(f"{what} must be {'an integer' if kind is int else 'a string'}, got {json.dumps(value)}")
    return value


def _input(tensor: dict, binary: memoryview, offset: int) -> tuple[WireInput, int]:
    """One input (its data raw) and the offset of the next binary tensor."""
    name = _typed(tensor.get("name"), str, "an input's 'name'")
    datatype = _typed(tensor.get("datatype"), str, f"input {name!r}: 'datatype'")
    shape = tensor.get("shape")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise invalid(f"input {name!r}: 'shape' must be a list of non-negative integers, got {json.dumps(shape)}")
    parameters = json_object(tensor.get("parameters", {}), f"input {name!r}: 'parameters'")
    region = shm_region(f"input {name!r}", parameters)
    if region is not None:  # read from the region by the service
        if "data" in tensor or "binary_data_size" in parameters:
            raise invalid(f"input {name!r} names shared memory region {region.name!r} and carries data too; use one")
        return WireInput(name, datatype, shape, None, None, region), offset
    size = parameters.get("binary_data_size")
    if size is not None:
        size = _typed(size, int, f"input {name!r}: binary_data_size")
        if "data" in tensor:
            raise invalid(f"input {name!r} has both 'data' and binary_data_size; use one")
        if offset + size > len(binary):
            raise invalid(f"input {name!r}: binary_data_size {size} at byte {offset} runs past the "
                          f"{len(binary)} bytes of binary data after the JSON header")
        return WireInput(name, datatype, shape, binary[offset:offset + size]), offset + size
    if "data" not in tensor:
        raise invalid(f"input {name!r} has neither 'data' nor parameters.binary_data_size")
    return WireInput(name, datatype, shape, _json_data(name, datatype, shape, tensor["data"])), offset


def _json_data(name: str, datatype: str, shape: list[int], data) -> bytes:
    """The raw bytes of an input given as JSON `data` (flat or nested, row-major)."""
    count = math.prod(shape)
    if datatype == "BYTES":
        values = _flat(data)
        if not all(isinstance(v, str) for v in values):
            raise invalid(f"input {name!r} is BYTES: its data must be strings")
        _check_count(name, len(values), shape, count)
        return serialize_bytes([v.encode() for v in values])
    dtype = NUMPY_DTYPES.get(datatype)
    if dtype is None:
        raise invalid(f"input {name!r} has datatype {datatype!r}; the protocol's datatypes are "
                      f"{', '.join([*NUMPY_DTYPES, 'BYTES'])}")
    values = _flat(data)
    _check_count(name, len(values), shape, count)
    if datatype == "BF16":  # JSON numbers, held as their BF16 bit patterns
        return float32_to_bf16(_numbers(name, datatype, NUMPY_DTYPES["FP32"], values)).tobytes()
    return _numbers(name, datatype, dtype, values).tobytes()


def _flat(data) -> list:
    if not isinstance(data, list):
        return [data]
    flat: list = []
    stack = [iter(data)]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            flat.append(item)
        else:
            stack.pop()
    return flat


def _check_count(name: str, got: int, shape: list[int], needed: int) -> None:
    if got != needed:
        raise invalid(f"input {name!r} has {got} values in 'data'; shape {shape} needs {needed}")


def _numbers(name: str, datatype: str, dtype: np.dtype, values: list) -> np.ndarray:
    """`values` as `dtype`, refusing what does not fit: strings, non-integers for an
    integer type, numbers for BOOL, integers out of range."""
    if datatype == "BOOL":
        if not all(isinstance(v, bool) for v in values):
            raise invalid(f"input {name!r} is BOOL: its data must be true or false")
        return np.array(values, dtype=dtype)
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        raise invalid(f"input {name!r} is {datatype}: its data must be numbers")
    if dtype.kind == "f":
        return np.array(values, dtype=dtype)
    if not all(isinstance(v, int) for v in values):
        raise invalid(f"input {name!r} is {datatype}: its data must be integers")
    info = np.iinfo(dtype)
    if values and (min(values) < info.min or max(values) > info.max):
        raise invalid(f"input {name!r} has values outside the {datatype} range [{info.min}, {info.max}] "
                      f"(got {min(values)}..{max(values)})")
    return np.array(values, dtype=dtype)


def _outputs(outputs, parameters: dict) -> tuple[list[RequestedOutput], ResponseFormat]:
    if not isinstance(outputs, list):
        raise invalid(f"request 'outputs' must be a list, got {type(outputs).__name__}")
    binary_by_default = parameters.get("binary_data_output", False)
    if not isinstance(binary_by_default, bool):
        raise invalid(f"parameter binary_data_output must be true or false, got {json.dumps(binary_by_default)}")
    requested, binary = [], {}
    for index, output in enumerate(outputs):
        output = json_object(output, f"outputs[{index}]")
        name = _typed(output.get("name"), str, "an output's 'name'")
        output_parameters = json_object(output.get("parameters", {}), f"output {name!r}: 'parameters'")
        if "binary_data" in output_parameters:
            binary[name] = output_parameters["binary_data"] is True
        requested.append(_requested(name, output_parameters))
    return requested, ResponseFormat(binary_by_default, binary)


def _requested(name: str, parameters: dict) -> RequestedOutput:
    region = shm_region(f"output {name!r}", parameters)
    for key in CLASSIFICATION_PARAMETERS:
        if key in parameters:
            return requested_output(name, key, _typed(parameters[key], int, f"output {name!r}: parameter {key!r}"),
                                    region)
    return requested_output(name, region=region)


def _timeout_s(parameters: dict) -> float | None:
    """Triton's `timeout` request parameter (microseconds) in seconds."""
    if "timeout" not in parameters:
        return None
    timeout_us = _typed(parameters["timeout"], int, "parameter 'timeout' (microseconds)")
    if timeout_us < 0:
        raise invalid(f"parameter 'timeout' is {timeout_us}; expected microseconds >= 0")
    return timeout_us / 1e6 if timeout_us else None


# -- responses ------------------------------------------------------------------------------
def infer_response(response: WireResponse, response_format: ResponseFormat) -> tuple[bytes, int | None]:
    """(the body, the JSON header's length when binary outputs follow it, else None)."""
    header: dict = {"model_name": response.model_name, "model_version": response.model_version}
    if response.id:
        header["id"] = response.id
    blobs, finite = [], True
    outputs = header["outputs"] = []
    for tensor in response.outputs:
        output = {"name": tensor.name, "datatype": tensor.datatype, "shape": tensor.shape}
        # An output written to shared memory gets name, datatype and shape only, as Triton
        # answers: clients built on Triton's C++ HTTP client (perf_analyzer) read an output's
        # parameters as binary data and fail on one without binary_data_size.
        if tensor.region is not None:
            outputs.append(output)
            continue
        if response_format.is_binary(tensor.name):
            output["parameters"] = {"binary_data_size": len(tensor.raw)}
            blobs.append(tensor.raw)
        else:
            output["data"] = _json_values(tensor.datatype, tensor.raw)
            finite = finite and _all_finite(tensor.datatype, tensor.raw)
        outputs.append(output)
    # orjson writes a non-finite float as null; Triton writes NaN, Infinity, -Infinity.
    text = orjson.dumps(header) if finite else json.dumps(header, ensure_ascii=False, separators=(",", ":")).encode()
    if not blobs:
        return text, None
    return b"".join([text, *blobs]), len(text)


def _json_values(datatype: str, raw: bytes) -> list:
    if datatype == "BYTES":
        return [value.decode(errors="replace") for value in deserialize_bytes(raw)]
    if datatype == "BF16":
        return bf16_to_float32(np.frombuffer(raw, dtype=NUMPY_DTYPES[datatype])).tolist()
    return np.frombuffer(raw, dtype=NUMPY_DTYPES[datatype]).tolist()


def _all_finite(datatype: str, raw: bytes) -> bool:
    if datatype == "BF16":  # held as bit patterns: all exponent bits set is an infinity or a NaN
        return not (np.frombuffer(raw, dtype="<u2") & 0x7F80 == 0x7F80).any()
    dtype = NUMPY_DTYPES.get(datatype)
    return dtype is None or dtype.kind != "f" or bool(np.isfinite(np.frombuffer(raw, dtype=dtype)).all())


def error_body(message: str) -> bytes:
    return orjson.dumps({"error": message})


def message_json(message: Message) -> bytes:
    return orjson.dumps(message_dict(message))


def message_dict(message: Message) -> dict:
    """A protobuf message as Triton's HTTP endpoint writes it."""
    as_dict = MessageToDict(message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
    return _int64_as_numbers(as_dict, message.DESCRIPTOR)


_INT64 = {descriptor.FieldDescriptor.CPPTYPE_INT64, descriptor.FieldDescriptor.CPPTYPE_UINT64}


def _int64_as_numbers(as_dict: dict, message_type: descriptor.Descriptor) -> dict:
    """protobuf's JSON mapping writes 64-bit integers as strings; Triton writes numbers."""
    for field in message_type.fields:
        if field.name not in as_dict:
            continue
        value = as_dict[field.name]
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            value_field = field.message_type.fields_by_name["value"]
            as_dict[field.name] = {key: _field_value(item, value_field) for key, item in value.items()}
        elif isinstance(value, list):
            as_dict[field.name] = [_field_value(item, field) for item in value]
        else:
            as_dict[field.name] = _field_value(value, field)
    return as_dict


def _field_value(value, field: descriptor.FieldDescriptor):
    if field.cpp_type in _INT64 and isinstance(value, str):
        return int(value)
    if field.message_type is not None and isinstance(value, dict):
        return _int64_as_numbers(value, field.message_type)
    return value
