"""How tensors travel in the v2 protocol (docs/design.md §4): the datatype tables and the
BYTES codec, shared by the client and the server so that both read the wire alike.

  NUMPY_DTYPES    protocol datatype name -> numpy dtype of its raw (little-endian) bytes;
                  BYTES has no fixed width and is absent (see serialize_bytes). numpy has
                  no bfloat16: BF16 is held as its 16-bit patterns (uint16), converted by
                  bf16_to_float32 / float32_to_bf16
  DATATYPES       every datatype served: NUMPY_DTYPES' and BYTES
  CONTENTS_FIELD  datatype -> the InferTensorContents field that carries it when a tensor
                  travels typed instead of raw (FP16 and BF16 travel raw only, as in Triton)
  CONTENTS_DTYPES that field -> the numpy type its values decode to (wider than the tensor's
                  own for the 8- and 16-bit integers: int_contents holds int32s)
  ONNX_TYPES      onnxruntime's element type string -> datatype name

Needs only numpy: the client installs without onnxruntime or torch.
"""

from __future__ import annotations

import struct

import numpy as np

NUMPY_DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
    "BF16": np.dtype("<u2"),
}
DATATYPES: tuple[str, ...] = (*NUMPY_DTYPES, "BYTES")

CONTENTS_FIELD: dict[str, str] = {
    "BOOL": "bool_contents",
    "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}  # fmt: skip

CONTENTS_DTYPES: dict[str, type] = {
    "bool_contents": np.bool_, "int_contents": np.int32, "int64_contents": np.int64,
    "uint_contents": np.uint32, "uint64_contents": np.uint64, "fp32_contents": np.float32,
    "fp64_contents": np.float64,
}  # fmt: skip

ONNX_TYPES: dict[str, str] = {
    "tensor(bool)": "BOOL", "tensor(uint8)": "UINT8", "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32", "tensor(uint64)": "UINT64", "tensor(int8)": "INT8",
    "tensor(int16)": "INT16", "tensor(int32)": "INT32", "tensor(int64)": "INT64",
    "tensor(float16)": "FP16", "tensor(float)": "FP32", "tensor(double)": "FP64",
    "tensor(bfloat16)": "BF16", "tensor(string)": "BYTES",
}  # fmt: skip

_LENGTH = struct.Struct("<I")  # each BYTES element: a 4-byte little-endian length, then the bytes


def serialize_bytes(items: list[bytes]) -> bytes:
    """A BYTES tensor's raw contents: each element as its 4-byte little-endian length, then its bytes."""
    return b"".join(_LENGTH.pack(len(item)) + item for item in items)


def deserialize_bytes(raw: bytes) -> list[bytes]:
    """The elements of a BYTES tensor's raw contents; ValueError where the lengths do not add up."""
    values, offset = [], 0
    while offset < len(raw):
        if offset + _LENGTH.size > len(raw):
            raise ValueError(f"BYTES contents end inside a length prefix at byte {offset} of {len(raw)}")
        (length,) = _LENGTH.unpack_from(raw, offset)
        offset += _LENGTH.size
        if offset + length > len(raw):
            raise ValueError(f"BYTES element at byte {offset} claims {length} bytes; only {len(raw) - offset} remain")
        values.append(bytes(raw[offset : offset + length]))
        offset += length
    return values


def float32_to_bf16(values: np.ndarray) -> np.ndarray:
    """float32 values as BF16 bit patterns (uint16), rounded to nearest even; NaN stays NaN."""
    bits = np.ascontiguousarray(values, dtype="<f4").view("<u4")
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype("<u2")
    return np.where(np.isnan(values), np.uint16(0x7FC0), rounded).astype("<u2")


def bf16_to_float32(bits: np.ndarray) -> np.ndarray:
    """BF16 bit patterns (uint16) as the float32 values they stand for (exactly)."""
    return (np.ascontiguousarray(bits, dtype="<u2").astype("<u4") << 16).view("<f4")
