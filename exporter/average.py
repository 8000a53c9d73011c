"""The averaging model of an ensemble, written directly with onnx.helper.

N inputs `probabilities_0..N-1` (FP32 [batch, classes]) -> output `probabilities`,
the weighted mean sum_i w_i * p_i with the weights normalized to sum to 1, so the
output is again a probability distribution. The weights are constants in the graph.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from exporter.onnx_export import BATCH_DIM, OPSET, OUTPUT_NAME, check_model


def member_output_name(index: int) -> str:
    return f"{OUTPUT_NAME}_{index}"


def build_average_model(weights: list[float], num_classes: int) -> onnx.ModelProto:
    """Weighted mean of len(weights) probability tensors; `weights` must already sum to 1."""
    inputs, scaled, initializers, nodes = [], [], [], []
    for index, weight in enumerate(weights):
        name = member_output_name(index)
        inputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, [BATCH_DIM, num_classes]))
        initializers.append(numpy_helper.from_array(np.array(weight, dtype=np.float32), f"weight_{index}"))
        nodes.append(helper.make_node("Mul", [name, f"weight_{index}"], [f"weighted_{index}"], name=f"scale_{index}"))
        scaled.append(f"weighted_{index}")
    nodes.append(helper.make_node("Sum", scaled, [OUTPUT_NAME], name="weighted_sum"))
    output = helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, [BATCH_DIM, num_classes])
    graph = helper.make_graph(nodes, "weighted_average", inputs, [output], initializer=initializers)
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="ensemble-serving exporter",
        doc_string="Weighted mean of the ensemble members' probabilities.",
    )
    # make_model stamps the newest IR version this onnx knows; keep one every
    # onnxruntime from our supported range loads.
    model.ir_version = min(model.ir_version, 10)
    check_model(model)
    return model


def average_numpy(probabilities: list[np.ndarray], weights: list[float]) -> np.ndarray:
    """The reference the averaging graph is checked against."""
    return sum(weight * p.astype(np.float64) for weight, p in zip(weights, probabilities)).astype(np.float32)
