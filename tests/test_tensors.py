"""ensemble_serving/tensors.py: the BYTES length-prefix codec and the datatype tables."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from ensemble_serving.protocol import grpc_service_pb2 as pb
from ensemble_serving.tensors import (
    CONTENTS_DTYPES,
    CONTENTS_FIELD,
    NUMPY_DTYPES,
    ONNX_TYPES,
    deserialize_bytes,
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
    assert set(ONNX_TYPES.values()) == set(NUMPY_DTYPES)
    assert set(CONTENTS_FIELD) - {"BYTES"} == set(NUMPY_DTYPES) - {"FP16"}  # FP16 travels raw only
    for datatype, dtype in NUMPY_DTYPES.items():
        assert dtype.byteorder in ("<", "|", "=") and (dtype.byteorder != "=" or np.little_endian), datatype
