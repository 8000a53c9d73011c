"""A tiny model repository built with onnx.helper (no torch, no training).

The models have the project's serving signature (docs/design.md §3): members take
`images` UINT8 [N, H, W, C] and return `probabilities` FP32 [N, classes] (scale to
0..1, one linear layer, softmax); the averaging model takes `probabilities_0..k-1`
and returns their mean; the ensemble wires them together. Small enough that a server
loads it in well under a second, real enough that every code path runs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ensemble_serving.datasets import MNIST_CLASSES
from ensemble_serving.model_config import parse_model_config, save_model_config

NAME = "tiny"
# The signature of tiny_pipeline's repository (MNIST-layout, digit classes), so that tests
# run the same with and without torch, data-set ones included.
HEIGHT, WIDTH, CHANNELS = 28, 28, 1
CLASS_NAMES = tuple(MNIST_CLASSES)
MEMBERS = 2
MAX_BATCH_SIZE = 16
OPSET = 17


def _save(graph: onnx.GraphProto, path: Path) -> None:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=9)
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, path)


def member_graph(seed: int, classes: int = len(CLASS_NAMES)) -> onnx.GraphProto:
    features = HEIGHT * WIDTH * CHANNELS
    rng = np.random.default_rng(seed)
    # Logits of a few units for 0..1 pixels: confident, not saturated, predictions.
    weight = rng.normal(0, 0.5 * np.sqrt(192 / features), (features, classes)).astype(np.float32)
    bias = rng.normal(0, 0.1, classes).astype(np.float32)
    nodes = [
        helper.make_node("Cast", ["images"], ["pixels"], to=TensorProto.FLOAT),
        helper.make_node("Reshape", ["pixels", "flat_shape"], ["flat"]),
        helper.make_node("Mul", ["flat", "scale"], ["scaled"]),
        helper.make_node("MatMul", ["scaled", "weight"], ["product"]),
        helper.make_node("Add", ["product", "bias"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=-1),
    ]
    initializers = [
        numpy_helper.from_array(np.array([-1, features], dtype=np.int64), "flat_shape"),
        numpy_helper.from_array(np.array(1 / 255, dtype=np.float32), "scale"),
        numpy_helper.from_array(weight, "weight"),
        numpy_helper.from_array(bias, "bias"),
    ]
    return helper.make_graph(
        nodes, f"member{seed}",
        [helper.make_tensor_value_info("images", TensorProto.UINT8, ["batch", HEIGHT, WIDTH, CHANNELS])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", classes])],
        initializers,
    )


def average_graph(count: int, classes: int = len(CLASS_NAMES)) -> onnx.GraphProto:
    inputs = [f"probabilities_{i}" for i in range(count)]
    nodes = [
        helper.make_node("Sum", inputs, ["total"]),
        helper.make_node("Mul", ["total", "weight"], ["probabilities"]),
    ]
    return helper.make_graph(
        nodes, "average",
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", classes]) for name in inputs],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", classes])],
        [numpy_helper.from_array(np.array(1 / count, dtype=np.float32), "weight")],
    )


_IMAGES_INPUT = (f'input {{ name: "images" data_type: TYPE_UINT8 format: FORMAT_NHWC '
                 f'dims: [{HEIGHT}, {WIDTH}, {CHANNELS}] }}')


def _config_head(name: str, platform: str, inputs: str) -> str:
    """What every config.pbtxt of the tiny repository starts with: name, platform, inputs, output."""
    return f"""
name: "{name}"
platform: "{platform}"
max_batch_size: {MAX_BATCH_SIZE}
{inputs}
output {{ name: "probabilities" data_type: TYPE_FP32 dims: [{len(CLASS_NAMES)}] label_filename: "labels.txt" }}
"""


def _onnx_config(name: str, inputs: str) -> str:
    return _config_head(name, "onnxruntime_onnx", inputs) + """dynamic_batching { max_queue_delay_microseconds: 1000 }
instance_group { kind: KIND_CPU count: 1 }
"""


def _member_config(name: str) -> str:
    return _onnx_config(name, _IMAGES_INPUT)


def _average_config(name: str, count: int) -> str:
    return _onnx_config(name, "\n".join(
        f'input {{ name: "probabilities_{i}" data_type: TYPE_FP32 dims: [{len(CLASS_NAMES)}] }}' for i in range(count)))


def _ensemble_config(name: str, members: list[str], average: str) -> str:
    steps = "\n".join(
        f'step {{ model_name: "{member}" model_version: -1 input_map {{ key: "images" value: "images" }} '
        f'output_map {{ key: "probabilities" value: "probabilities_{i}" }} }}'
        for i, member in enumerate(members)
    )
    average_inputs = " ".join(
        f'input_map {{ key: "probabilities_{i}" value: "probabilities_{i}" }}' for i in range(len(members))
    )
    return _config_head(name, "ensemble", _IMAGES_INPUT) + f"""ensemble_scheduling {{
{steps}
step {{ model_name: "{average}" model_version: -1 {average_inputs}
       output_map {{ key: "probabilities" value: "probabilities" }} }}
}}
"""


def _write_model(root: Path, name: str, config_text: str, graph: onnx.GraphProto | None) -> None:
    directory = root / name
    (directory / "1").mkdir(parents=True, exist_ok=True)
    save_model_config(parse_model_config(config_text, name), directory / "config.pbtxt")
    (directory / "labels.txt").write_text("\n".join(CLASS_NAMES) + "\n")
    if graph is not None:
        _save(graph, directory / "1" / "model.onnx")


def write_tiny_repository(root: Path) -> dict:
    """Write the repository under `root`; returns the facts tests need about it."""
    members = [f"{NAME}-m{i}" for i in range(MEMBERS)]
    average = f"{NAME}-average"
    for seed, member in enumerate(members):
        _write_model(root, member, _member_config(member), member_graph(seed))
    _write_model(root, average, _average_config(average, MEMBERS), average_graph(MEMBERS))
    _write_model(root, NAME, _ensemble_config(NAME, members, average), None)
    return dict(path=root, ensemble=NAME, members=tuple(members), average=average, height=HEIGHT, width=WIDTH,
                channels=CHANNELS, class_names=CLASS_NAMES, max_batch_size=MAX_BATCH_SIZE)


# ---------------------------------------------------------------------------------------
# Versions, for model control: one member model whose versions answer differently
# ---------------------------------------------------------------------------------------
def write_member_model(root: Path, name: str, seed: int, config_extra: str = "") -> Path:
    """Model `name`, version 1 = member_graph(seed); `config_extra` is appended to its
    config.pbtxt (a version_policy, a model_warmup)."""
    _write_model(root, name, _member_config(name) + config_extra, member_graph(seed))
    return root / name


def member_model_bytes(seed: int) -> bytes:
    """member_graph(seed) as an ONNX file's bytes (for expected outputs and published versions)."""
    model = helper.make_model(member_graph(seed), opset_imports=[helper.make_opsetid("", OPSET)], ir_version=9)
    return model.SerializeToString()


def publish_member_version(root: Path, name: str, version: int, seed: int | None = None,
                           model_bytes: bytes | None = None) -> Path:  # fmt: skip
    """Add version `version` (member_graph(seed), or `model_bytes` as its model.onnx) to
    model `name` as the exporter does: built in a hidden staging folder of the repository,
    then renamed into place, so a polling server sees all of it or nothing."""
    from exporter.repository import publish_version

    staging = root / f".staging-{name}-{version}"
    if model_bytes is None:
        _save(member_graph(seed), staging / "model.onnx")
    else:
        staging.mkdir(parents=True)
        (staging / "model.onnx").write_bytes(model_bytes)
    return publish_version(staging, root / name, str(version))


def cifar_size_graph(seed: int, hidden: int = 640, classes: int = 10) -> onnx.GraphProto:
    """A CIFAR-10 signature (uint8 [N, 32, 32, 3]) with about as many weights as the
    exported airbench member (~2 M floats, ~8 MB): scale, two linear layers, softmax."""
    features = 32 * 32 * 3
    rng = np.random.default_rng(seed)
    nodes = [
        helper.make_node("Cast", ["images"], ["pixels"], to=TensorProto.FLOAT),
        helper.make_node("Reshape", ["pixels", "flat_shape"], ["flat"]),
        helper.make_node("Mul", ["flat", "scale"], ["scaled"]),
        helper.make_node("MatMul", ["scaled", "w1"], ["hidden"]),
        helper.make_node("Relu", ["hidden"], ["activated"]),
        helper.make_node("MatMul", ["activated", "w2"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=-1),
    ]
    initializers = [
        numpy_helper.from_array(np.array([-1, features], dtype=np.int64), "flat_shape"),
        numpy_helper.from_array(np.array(1 / 255, dtype=np.float32), "scale"),
        numpy_helper.from_array(rng.normal(0, 0.02, (features, hidden)).astype(np.float32), "w1"),
        numpy_helper.from_array(rng.normal(0, 0.05, (hidden, classes)).astype(np.float32), "w2"),
    ]
    return helper.make_graph(
        nodes, f"cifar{seed}",
        [helper.make_tensor_value_info("images", TensorProto.UINT8, ["batch", 32, 32, 3])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", classes])],
        initializers,
    )


def write_cifar_size_model(root: Path, name: str, seed: int = 0) -> Path:
    config = f"""
name: "{name}"
platform: "onnxruntime_onnx"
max_batch_size: {MAX_BATCH_SIZE}
input {{ name: "images" data_type: TYPE_UINT8 format: FORMAT_NHWC dims: [32, 32, 3] }}
output {{ name: "probabilities" data_type: TYPE_FP32 dims: [10] }}
dynamic_batching {{ max_queue_delay_microseconds: 1000 }}
instance_group {{ kind: KIND_CPU count: 1 }}
"""
    directory = root / name
    (directory / "1").mkdir(parents=True, exist_ok=True)
    save_model_config(parse_model_config(config, name), directory / "config.pbtxt")
    _save(cifar_size_graph(seed), directory / "1" / "model.onnx")
    return directory
