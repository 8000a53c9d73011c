"""ensemble_serving/tensors.py: the BYTES length-prefix codec and the datatype tables."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from ensemble_serving.protocol import grpc_service_pb2 as pb
from ensemble_serving.tensors import (
    CONTENTS_DTYPES,
    CONTENTS_FIELD,
    DATATYPES,
    NUMPY_DTYPES,
    ONNX_TYPES,
    bf16_to_float32,
    deserialize_bytes,
    float32_to_bf16,
    serialize_bytes,
)


@pytest.mark.parametrize("items", [[], [b""], [b"0.9:7:seven", b"0.1:1"], [b"\x00" * 300, b"", bytes(range(256))]])
def test_bytes_codec_round_trips(items):
    assert deserialize_bytes(serialize_bytes(items)) == items


def test_bytes_wire_format_is_a_little_endian_uint32_length_then_the_bytes():
    assert serialize_bytes([b"ab", b"c"]) == b"\x02\x00\x00\x00ab\x01\x00\x00\x00c"
    assert deserialize_bytes(struct.pack("<I", 3) + b"xyz") == [b"xyz"]


@pytest.mark.parametrize(
    ("raw", "message"),
    [(b"\x02\x00", "inside a length prefix"), (b"\x05\x00\x00\x00abc", "claims 5 bytes; only 3 remain")],
)
def test_bytes_truncated_contents_are_refused(raw, message):
    with pytest.raises(ValueError, match=message):
        deserialize_bytes(raw)


def test_tables_agree_with_each_other_and_with_the_protocol():
    fields = {field.name for field in pb.InferTensorContents.DESCRIPTOR.fields}
    assert set(CONTENTS_FIELD.values()) <= fields
    assert set(CONTENTS_DTYPES) == set(CONTENTS_FIELD.values()) - {"bytes_contents"}
    assert set(ONNX_TYPES.values()) == set(DATATYPES) == {*NUMPY_DTYPES, "BYTES"}
    assert set(CONTENTS_FIELD) - {"BYTES"} == set(NUMPY_DTYPES) - {"FP16", "BF16"}  # they travel raw only
    for datatype, dtype in NUMPY_DTYPES.items():
        assert dtype.byteorder in ("<", "|", "=") and (dtype.byteorder != "=" or np.little_endian), datatype


def test_bf16_conversion_rounds_to_nearest_even_and_keeps_specials():
    values = np.array([1.0, -2.5, 3.140625, 1 + 2**-8, 1 + 3 * 2**-8, np.inf, -np.inf, 0.0, -0.0], np.float32)
    bits = float32_to_bf16(values)
    assert bits.dtype == np.dtype("<u2")
    # 1 + 2**-8 lies halfway between 1 and 1 + 2**-7: to even (1); 1 + 3 * 2**-8 rounds up to 1 + 2**-6
    np.testing.assert_array_equal(bf16_to_float32(bits), [1.0, -2.5, 3.140625, 1.0, 1 + 2**-6, np.inf, -np.inf, 0, 0])
    assert np.signbit(bf16_to_float32(bits)[-1])
    assert np.isnan(bf16_to_float32(float32_to_bf16(np.array([np.nan], np.float32))))[0]
