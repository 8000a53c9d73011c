"""A classification case whose every metric is worked out by hand, for the client's tests.

Twenty images, two per digit class. Each image's first ten pixels hold integer class
weights that sum to 100: 71 for the predicted class, 21 for a runner-up, 1 for each of
the other eight. The tiny ONNX model built by `known_answer_onnx` turns those pixels
into probabilities (weights / their sum), so the served model predicts exactly what
this table says: confidence 0.71 everywhere.

Four mistakes (index: true -> predicted, runner-up):
    7:  3 -> 5, runner-up 2   (top-2 miss)
    17: 8 -> 9, runner-up 8   (top-2 hit)
    18: 9 -> 8, runner-up 9   (top-2 hit)
    19: 9 -> 0, runner-up 5   (top-2 miss)

Hand-computed answers:
    accuracy 16/20 = 0.8; top-2 accuracy 18/20 = 0.9
    mean confidence 0.71; ECE (all in one bin) |0.8 - 0.71| = 0.09
    precision: class 0 2/3 (the 9 predicted as 0), class 5 2/3, class 8 1/2, class 9 0
    recall:    class 3 1/2, class 8 1/2, class 9 0; all others 1
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tests.support.datasets import write_mnist_split

NUM_CLASSES = 10
CLASS_NAMES = [str(i) for i in range(NUM_CLASSES)]
LABELS = np.repeat(np.arange(NUM_CLASSES), 2)  # 0,0,1,1,...,9,9
PREDICTED = LABELS.copy()
RUNNER_UP = (LABELS + 1) % NUM_CLASSES
for index, predicted, runner_up in ((7, 5, 2), (17, 9, 8), (18, 8, 9), (19, 0, 5)):
    PREDICTED[index], RUNNER_UP[index] = predicted, runner_up

WEIGHT_PREDICTED, WEIGHT_RUNNER_UP, WEIGHT_OTHER = 71, 21, 1

EXPECTED_ACCURACY = 0.8
EXPECTED_TOP2 = 0.9
EXPECTED_CONFIDENCE = 0.71
EXPECTED_ECE = 0.09
EXPECTED_CONFUSION = np.diag([2, 2, 2, 1, 2, 2, 2, 2, 1, 0])
EXPECTED_CONFUSION[3, 5] = EXPECTED_CONFUSION[8, 9] = EXPECTED_CONFUSION[9, 8] = EXPECTED_CONFUSION[9, 0] = 1
EXPECTED_PRECISION = {0: 2 / 3, 3: 1.0, 5: 2 / 3, 8: 1 / 2, 9: 0.0}
EXPECTED_RECALL = {0: 1.0, 3: 1 / 2, 5: 1.0, 8: 1 / 2, 9: 0.0}
EXPECTED_F1 = {0: 0.8, 3: 2 / 3, 5: 0.8, 8: 0.5, 9: 0.0}


def class_weights() -> np.ndarray:
    """uint8 [20, 10]: the pixel weights, also the probabilities x 100."""
    weights = np.full((len(LABELS), NUM_CLASSES), WEIGHT_OTHER, dtype=np.uint8)
    rows = np.arange(len(LABELS))
    weights[rows, PREDICTED] = WEIGHT_PREDICTED
    weights[rows, RUNNER_UP] = WEIGHT_RUNNER_UP
    assert (weights.astype(int).sum(axis=1) == 100).all()
    return weights


def probabilities() -> np.ndarray:
    return class_weights().astype(np.float32) / 100.0


def images(height: int = 28, width: int = 28, channels: int = 1) -> np.ndarray:
    """uint8 [20, H, W, C]: zeros except the first ten values (row-major) = the weights."""
    flat = np.zeros((len(LABELS), height * width * channels), dtype=np.uint8)
    flat[:, :NUM_CLASSES] = class_weights()
    return flat.reshape(len(LABELS), height, width, channels)


def write_mnist_test_split(data_dir: Path, images_nhwc: np.ndarray, labels: np.ndarray) -> Path:
    """Write MNIST/raw/t10k-*-ubyte.gz (IDX) so that load_dataset('mnist') reads these images."""
    return write_mnist_split(data_dir, "test", images_nhwc, labels)


def known_answer_onnx(height: int = 28, width: int = 28, channels: int = 1):
    """ONNX model: uint8 images [N, H, W, C] -> probabilities = first ten pixels / their sum."""
    from onnx import TensorProto, helper

    def constant(name, values):
        return helper.make_node("Constant", [], [name], value=helper.make_tensor(
            name + "_value", TensorProto.INT64, [len(values)], values))  # fmt: skip

    nodes = [
        helper.make_node("Cast", ["images"], ["pixels"], to=TensorProto.FLOAT),
        constant("flat_shape", [-1, height * width * channels]),
        helper.make_node("Reshape", ["pixels", "flat_shape"], ["flat"]),
        constant("starts", [0]),
        constant("ends", [NUM_CLASSES]),
        constant("axes", [1]),
        helper.make_node("Slice", ["flat", "starts", "ends", "axes"], ["weights"]),
        helper.make_node("ReduceSum", ["weights", "axes"], ["total"], keepdims=1),
        helper.make_node("Div", ["weights", "total"], ["probabilities"]),
    ]
    graph = helper.make_graph(
        nodes,
        "known_answer",
        [helper.make_tensor_value_info("images", TensorProto.UINT8, ["N", height, width, channels])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", NUM_CLASSES])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # readable by every onnxruntime we support
    return model


def write_model_repository(root: Path, name: str = "known", height: int = 28, width: int = 28,
                           channels: int = 1, max_batch_size: int = 8) -> Path:  # fmt: skip
    """A Triton-layout repository holding the known-answer model, written through the proto classes."""
    import onnx

    from ensemble_serving.model_config import datatype_enum, save_model_config
    from ensemble_serving.protocol import model_config_pb2

    model_dir = Path(root) / name
    (model_dir / "1").mkdir(parents=True, exist_ok=True)
    onnx.save(known_answer_onnx(height, width, channels), model_dir / "1" / "model.onnx")
    (model_dir / "labels.txt").write_text("".join(f"digit-{c}\n" for c in CLASS_NAMES), encoding="utf-8")
    config = model_config_pb2.ModelConfig(name=name, platform="onnxruntime_onnx", max_batch_size=max_batch_size)
    config.input.add(name="images", data_type=datatype_enum("UINT8"), dims=[height, width, channels])
    config.output.add(name="probabilities", data_type=datatype_enum("FP32"), dims=[NUM_CLASSES],
                      label_filename="labels.txt")  # fmt: skip
    save_model_config(config, model_dir)
    return Path(root)
