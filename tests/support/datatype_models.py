"""A repository with one identity model per datatype the server serves, and an ensemble of
two of them per datatype, built with onnx.helper; plus sample values for each datatype.

  id_<dt>    INPUT0 -> Identity -> OUTPUT0, dims [2], max_batch_size 8, dynamic batching
             (a short queue delay, so that concurrent requests are concatenated)
  ens_<dt>   INPUT0 -> id_<dt> -> id_<dt> -> OUTPUT0: a tensor handed from member to member

`samples(datatype)` gives a [3, 2] batch as the server must answer it back: numpy arrays,
BF16 as its uint16 bit patterns, BYTES as an object array of bytes (NULs and non-ASCII
UTF-8 among them). Used by tests/test_datatypes.py and its tritonclient script.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from ensemble_serving.model_config import parse_model_config, save_model_config
from ensemble_serving.tensors import NUMPY_DTYPES

ONNX_ELEMENT = {
    "BOOL": TensorProto.BOOL, "UINT8": TensorProto.UINT8, "UINT16": TensorProto.UINT16,
    "UINT32": TensorProto.UINT32, "UINT64": TensorProto.UINT64, "INT8": TensorProto.INT8,
    "INT16": TensorProto.INT16, "INT32": TensorProto.INT32, "INT64": TensorProto.INT64,
    "FP16": TensorProto.FLOAT16, "FP32": TensorProto.FLOAT, "FP64": TensorProto.DOUBLE,
    "BF16": TensorProto.BFLOAT16, "BYTES": TensorProto.STRING,
}  # fmt: skip
DATATYPES = tuple(ONNX_ELEMENT)
CONFIG_TYPE = {datatype: "TYPE_STRING" if datatype == "BYTES" else f"TYPE_{datatype}" for datatype in DATATYPES}
MAX_BATCH_SIZE = 8
BYTES_SAMPLES = [b"", b"a\x00b", "\u00e9t\u00e9".encode(), b"\x00", b"x" * 40, b"\x00\x00tail"]


def identity_name(datatype: str) -> str:
    return f"id_{datatype.lower()}"


def ensemble_name(datatype: str) -> str:
    return f"ens_{datatype.lower()}"


def samples(datatype: str, batch: int = 3, seed: int = 0) -> np.ndarray:
    """A [batch, 2] tensor of `datatype` (see the module docstring for BF16 and BYTES)."""
    rng = np.random.default_rng(seed)
    count = batch * 2
    if datatype == "BYTES":
        items = [BYTES_SAMPLES[(seed + i) % len(BYTES_SAMPLES)] for i in range(count)]
        return np.array(items, dtype=object).reshape(batch, 2)
    if datatype == "BOOL":
        return rng.integers(0, 2, (batch, 2)).astype(bool)
    if datatype == "BF16":  # values a BF16 holds exactly: their top 16 bits
        values = rng.choice(np.array([1.5, -2.0, 0.25, 1024.0, -0.0078125, 3.0], np.float32), count)
        return (values.view(np.uint32) >> 16).astype("<u2").reshape(batch, 2)
    if datatype.startswith("FP"):
        return (rng.standard_normal((batch, 2)) * 100).astype(NUMPY_DTYPES[datatype])
    dtype = NUMPY_DTYPES[datatype]
    info = np.iinfo(dtype)
    # the extremes of the range travel too (int_contents widening, JSON integers)
    values = np.array([info.min, info.max, *rng.integers(info.min // 2, info.max // 2, count - 2, dtype=dtype)], dtype)
    return values.reshape(batch, 2)


def _identity_model(datatype: str, path: Path) -> None:
    element = ONNX_ELEMENT[datatype]
    graph = helper.make_graph([helper.make_node("Identity", ["INPUT0"], ["OUTPUT0"])], identity_name(datatype),
                              [helper.make_tensor_value_info("INPUT0", element, ["batch", 2])],
                              [helper.make_tensor_value_info("OUTPUT0", element, ["batch", 2])])  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, path)


def _tensor(name: str, datatype: str) -> str:
    return f'{{ name: "{name}" data_type: {CONFIG_TYPE[datatype]} dims: [ 2 ] }}'


def write_identity_model(root: Path, datatype: str) -> str:
    """id_<dt> in `root`; returns its name."""
    name = identity_name(datatype)
    _identity_model(datatype, root / name / "1" / "model.onnx")
    save_model_config(parse_model_config(
        f'name: "{name}" platform: "onnxruntime_onnx" max_batch_size: {MAX_BATCH_SIZE} '
        f'input [ {_tensor("INPUT0", datatype)} ] output [ {_tensor("OUTPUT0", datatype)} ] '
        f'dynamic_batching {{ max_queue_delay_microseconds: 30000 }} '
        f'instance_group [ {{ count: 1 kind: KIND_CPU }} ]'), root / name / "config.pbtxt")
    return name


PARSE_NUMBERS = "parse_numbers"


def write_parse_numbers_model(root: Path) -> str:
    """BYTES in, INT32 out: Cast reads each element as a decimal number. An empty string is not
    one, so the model only loads if the automatic warm-up leaves BYTES inputs alone."""
    graph = helper.make_graph([helper.make_node("Cast", ["INPUT0"], ["OUTPUT0"], to=TensorProto.INT32)],
                              PARSE_NUMBERS,
                              [helper.make_tensor_value_info("INPUT0", TensorProto.STRING, ["batch", 2])],
                              [helper.make_tensor_value_info("OUTPUT0", TensorProto.INT32, ["batch", 2])])  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    (root / PARSE_NUMBERS / "1").mkdir(parents=True, exist_ok=True)
    onnx.save(model, root / PARSE_NUMBERS / "1" / "model.onnx")
    save_model_config(parse_model_config(
        f'name: "{PARSE_NUMBERS}" platform: "onnxruntime_onnx" max_batch_size: {MAX_BATCH_SIZE} '
        f'input [ {_tensor("INPUT0", "BYTES")} ] output [ {_tensor("OUTPUT0", "INT32")} ]'),
        root / PARSE_NUMBERS / "config.pbtxt")
    return PARSE_NUMBERS


def write_repository(root: Path) -> Path:
    write_parse_numbers_model(root)
    for datatype in DATATYPES:
        name = write_identity_model(root, datatype)
        ensemble = ensemble_name(datatype)
        (root / ensemble / "1").mkdir(parents=True, exist_ok=True)
        step = ('{{ model_name: "{m}" model_version: -1 input_map {{ key: "INPUT0" value: "{i}" }} '
                'output_map {{ key: "OUTPUT0" value: "{o}" }} }}')
        save_model_config(parse_model_config(
            f'name: "{ensemble}" platform: "ensemble" max_batch_size: {MAX_BATCH_SIZE} '
            f'input [ {_tensor("INPUT0", datatype)} ] output [ {_tensor("OUTPUT0", datatype)} ] '
            f'ensemble_scheduling {{ step [ {step.format(m=name, i="INPUT0", o="middle")}, '
            f'{step.format(m=name, i="middle", o="OUTPUT0")} ] }}'), root / ensemble / "config.pbtxt")
    return root
