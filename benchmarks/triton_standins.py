"""ONNX stand-ins for the models Triton's Python client examples call, as a model repository.

Triton's examples (triton-inference-server/client, src/python/examples) are written against
models of Triton's own QA set: `simple` (two INT32 [16] inputs, their sum and difference),
`simple_int8`, `simple_string` (the same on numbers written as strings), `simple_identity`
(a string identity), `custom_identity_int32` and `densenet_onnx` (an image classifier). This
module builds one small ONNX graph with the same names, datatypes and shapes for each, so
that the examples run unmodified against any server that loads the repository: ours and
Triton alike. The classifier is not trained: it exists to have Triton's input and output
layout ([3, 224, 224] FP32 in, 1,000 scores out), which also makes it the large-input model
for the shared-memory measurement.

    python benchmarks/triton_standins.py OUT_DIR [--without-configs]

--without-configs writes only NAME/1/model.onnx (and the labels file), for the auto-complete
comparison: both servers must then fill in the configuration from the graph.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
TYPE_NAMES = {TensorProto.INT32: "TYPE_INT32", TensorProto.INT8: "TYPE_INT8", TensorProto.STRING: "TYPE_STRING",
              TensorProto.FLOAT: "TYPE_FP32"}


def _model(nodes, inputs, outputs, initializers=()) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "standin", inputs, outputs, list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8  # onnxruntime builds older than the onnx package still read it
    onnx.checker.check_model(model)
    return model


def _batched(name: str, elem_type: int, width: int = 16):
    return helper.make_tensor_value_info(name, elem_type, ["batch", width])


def add_sub(elem_type: int) -> onnx.ModelProto:
    """INPUT0, INPUT1 [batch, 16] -> OUTPUT0 = INPUT0 + INPUT1, OUTPUT1 = INPUT0 - INPUT1 (Triton's `simple`)."""
    nodes = [helper.make_node("Add", ["INPUT0", "INPUT1"], ["OUTPUT0"]),
             helper.make_node("Sub", ["INPUT0", "INPUT1"], ["OUTPUT1"])]
    io = [_batched(name, elem_type) for name in ("INPUT0", "INPUT1")]
    return _model(nodes, io, [_batched(name, elem_type) for name in ("OUTPUT0", "OUTPUT1")])


def string_add_sub() -> onnx.ModelProto:
    """`simple_string`: the numbers travel as decimal strings; Cast reads and writes them."""
    nodes = [helper.make_node("Cast", [f"INPUT{i}"], [f"n{i}"], to=TensorProto.INT32) for i in (0, 1)]
    nodes += [helper.make_node("Add", ["n0", "n1"], ["sum"]), helper.make_node("Sub", ["n0", "n1"], ["diff"]),
              helper.make_node("Cast", ["sum"], ["OUTPUT0"], to=TensorProto.STRING),
              helper.make_node("Cast", ["diff"], ["OUTPUT1"], to=TensorProto.STRING)]
    io = [_batched(name, TensorProto.STRING) for name in ("INPUT0", "INPUT1")]
    return _model(nodes, io, [_batched(name, TensorProto.STRING) for name in ("OUTPUT0", "OUTPUT1")])


def identity(elem_type: int) -> onnx.ModelProto:
    nodes = [helper.make_node("Identity", ["INPUT0"], ["OUTPUT0"])]
    return _model(nodes, [_batched("INPUT0", elem_type)], [_batched("OUTPUT0", elem_type)])


def image_classifier(classes: int = 1000, seed: int = 0) -> onnx.ModelProto:
    """`densenet_onnx`'s layout: data_0 [3, 224, 224] FP32 (no batch dimension) -> fc6_1 [1000].
    A strided convolution, a global pool and a dense layer: small, but it reads every pixel."""
    rng = np.random.default_rng(seed)
    weights = {"conv_w": rng.normal(0, 0.1, (16, 3, 8, 8)).astype(np.float32),
               "fc_w": rng.normal(0, 0.1, (16, classes)).astype(np.float32),
               "axes0": np.array([0], dtype=np.int64)}
    nodes = [helper.make_node("Unsqueeze", ["data_0", "axes0"], ["batched"]),
             helper.make_node("Conv", ["batched", "conv_w"], ["features"], strides=[8, 8]),
             helper.make_node("Relu", ["features"], ["active"]),
             helper.make_node("GlobalAveragePool", ["active"], ["pooled"]),
             helper.make_node("Flatten", ["pooled"], ["flat"]),
             helper.make_node("MatMul", ["flat", "fc_w"], ["scores"]),
             helper.make_node("Squeeze", ["scores", "axes0"], ["fc6_1"])]
    inputs = [helper.make_tensor_value_info("data_0", TensorProto.FLOAT, [3, 224, 224])]
    outputs = [helper.make_tensor_value_info("fc6_1", TensorProto.FLOAT, [classes])]
    return _model(nodes, inputs, outputs, [numpy_helper.from_array(v, k) for k, v in weights.items()])


def _tensor_config(kind: str, name: str, elem_type: int, dims: list[int], extra: str = "") -> str:
    return f'{kind} {{ name: "{name}" data_type: {TYPE_NAMES[elem_type]} dims: {dims}{extra} }}'


def _config(name: str, model: onnx.ModelProto, max_batch_size: int, extra: dict[str, str] = {}) -> str:
    """A full config.pbtxt for `model`, as Triton's QA repository writes them."""
    lines = [f'name: "{name}"', 'platform: "onnxruntime_onnx"', f"max_batch_size: {max_batch_size}"]
    for kind, tensors in (("input", model.graph.input), ("output", model.graph.output)):
        for tensor in tensors:
            shape = [d.dim_value or -1 for d in tensor.type.tensor_type.shape.dim]
            dims = shape[1:] if max_batch_size else shape
            lines.append(_tensor_config(kind, tensor.name, tensor.type.tensor_type.elem_type, dims,
                                        extra.get(tensor.name, "")))
    return "\n".join(lines) + "\n"


def standin_models() -> dict[str, tuple[onnx.ModelProto, int, dict[str, str]]]:
    """name -> (graph, max_batch_size, extra text per tensor config)."""
    return {
        "simple": (add_sub(TensorProto.INT32), 8, {}),
        "simple_int8": (add_sub(TensorProto.INT8), 8, {}),
        "simple_string": (string_add_sub(), 8, {}),
        "simple_identity": (identity(TensorProto.STRING), 8, {}),
        "custom_identity_int32": (identity(TensorProto.INT32), 8, {}),
        # Two more, because the model-control examples check that the repository holds eight.
        "simple_fp32": (add_sub(TensorProto.FLOAT), 8, {}),
        "identity_fp32": (identity(TensorProto.FLOAT), 8, {}),
        "densenet_onnx": (image_classifier(), 0, {"data_0": " format: FORMAT_NCHW",
                                                  "fc6_1": ' label_filename: "densenet_labels.txt"'}),
    }


def write_repository(root: Path, with_configs: bool = True, without: tuple[str, ...] = ()) -> list[str]:
    """Writes every stand-in under `root` but those in `without`; returns the model names."""
    models = {name: entry for name, entry in standin_models().items() if name not in without}
    for name, (model, max_batch_size, extra) in models.items():
        version = root / name / "1"
        version.mkdir(parents=True, exist_ok=True)
        onnx.save(model, version / "model.onnx")
        if with_configs:
            (root / name / "config.pbtxt").write_text(_config(name, model, max_batch_size, extra))
    labels = "\n".join(f"CLASS_{i:04d}" for i in range(1000)) + "\n"
    (root / "densenet_onnx" / "densenet_labels.txt").write_text(labels)
    return list(models)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="the model repository to write")
    parser.add_argument("--without-configs", action="store_true", help="only the ONNX files (auto-complete)")
    args = parser.parse_args()
    names = write_repository(args.out, with_configs=not args.without_configs)
    print(f"wrote {', '.join(names)} under {args.out}")


if __name__ == "__main__":
    main()
