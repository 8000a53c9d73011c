"""Small ONNX graphs built with onnx.helper, for the tests of config auto-complete, of
Triton's messages and of the HTTP JSON codec: an elementwise Add (Triton's `simple`
model's shape of things) and an Identity, of any datatype and shape, written as a model
folder with or without a config.pbtxt. Plus the runner of tritonclient call lists.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from pathlib import Path

import onnx
from onnx import TensorProto, helper

OPSET = 17
SCRIPTS = Path(__file__).parent.parent / "tritonclient_scripts"


def save_model(graph: onnx.GraphProto, path: Path) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=9)
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, path)
    return path


def add_graph(shape: list, element_type: int = TensorProto.FLOAT, names=("INPUT0", "INPUT1", "OUTPUT0")) -> onnx.GraphProto:
    """OUTPUT0 = INPUT0 + INPUT1, every tensor of `shape` (ints, or strings for symbolic dimensions)."""
    first, second, total = names
    return helper.make_graph(
        [helper.make_node("Add", [first, second], [total])], "add",
        [helper.make_tensor_value_info(first, element_type, shape), helper.make_tensor_value_info(second, element_type, shape)],
        [helper.make_tensor_value_info(total, element_type, shape)],
    )


def identity_graph(shape: list, element_type: int = TensorProto.FLOAT) -> onnx.GraphProto:
    return helper.make_graph(
        [helper.make_node("Identity", ["INPUT0"], ["OUTPUT0"])], "identity",
        [helper.make_tensor_value_info("INPUT0", element_type, shape)],
        [helper.make_tensor_value_info("OUTPUT0", element_type, shape)],
    )


def write_model(root: Path, name: str, graph: onnx.GraphProto, config: str | None = None) -> Path:
    """Model folder `name`: 1/model.onnx, and config.pbtxt with `config` unless it is None."""
    save_model(graph, root / name / "1" / "model.onnx")
    if config is not None:
        (root / name / "config.pbtxt").write_text(config, encoding="utf-8")
    return root / name


def model_file_b64(graph: onnx.GraphProto) -> str:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=9)
    return base64.b64encode(model.SerializeToString()).decode()


def triton_calls(protocol: str, url: str, calls: list[dict], folder: Path, timeout: float = 120) -> list[dict]:
    """Make `calls` through tritonclient (in a subprocess: see tritonclient_scripts/triton_calls.py)."""
    path = folder / f"calls-{protocol}.json"
    path.write_text(json.dumps(calls), encoding="utf-8")
    result = subprocess.run([sys.executable, str(SCRIPTS / "triton_calls.py"), "--protocol", protocol, "--url", url,
                             str(path)], capture_output=True, text=True, timeout=timeout)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)
