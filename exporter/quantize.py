"""int8 variants: onnxruntime static QDQ quantization with an accuracy gate and a speed figure.

Calibration reads real training images (the ones the trainer trained on, never its
validation images); the accuracy change is measured on the trainer's own validation
split (same seed and fraction, recomputed by exporter.validation), or on the test
split for a run trained without one (the report says which). Only the compute-heavy
ops (Conv, Gemm, MatMul) are quantized: the uint8->float preprocessing and the softmax
stay in float, so the output is still a smooth FP32 probability vector.
"""

from __future__ import annotations

import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from exporter.errors import ExportError, QuantizationError, one_line
from exporter.onnx_export import INPUT_NAME, check_model
from exporter.parity import cpu_session, predict_in_batches, session_predictor
from exporter.validation import load_real, trainer_split

QUANTIZED_OP_TYPES = ["Conv", "Gemm", "MatMul"]
CALIBRATION_IMAGES = 1024
CALIBRATION_BATCH = 64
CALIBRATION_SEED = 0
EVAL_BATCH = 256
TIMING_THREADS = 1  # one thread: the figure is about the kernels, not about who else uses the CPU
TIMING_BATCH_SIZES = (1, 64)


@dataclass(frozen=True)
class QuantizationData:
    calibration: np.ndarray  # uint8 [N, H, W, C], from the training part of the split
    eval_images: np.ndarray
    eval_labels: np.ndarray
    description: dict


def quantization_data(config: dict, data_dir=None) -> QuantizationData:
    """Calibration images and the images the accuracy change is measured on.

    Normally the trainer's validation split, recomputed exactly (same seed and fraction).
    A run trained on the whole training set has no held-out training images, so the
    change is then measured on the test split, and the report says so.
    """
    split = trainer_split(config, data_dir, needed_by="--quantize")
    dataset, root, train = config["dataset"], split.data_dir, split.train
    train_idx, val_idx, val_fraction, split_seed = split.train_idx, split.val_idx, split.val_fraction, split.split_seed
    rng = np.random.default_rng(CALIBRATION_SEED)
    calibration_idx = np.sort(rng.choice(train_idx, size=min(CALIBRATION_IMAGES, len(train_idx)), replace=False))
    if len(val_idx):
        eval_images, eval_labels = train.images[val_idx], train.labels[val_idx]
        evaluated_on = f"validation split of the training set (val_fraction {val_fraction}, split_seed {split_seed})"
    else:
        test = load_real(dataset, "test", root, needed_by="--quantize")
        eval_images, eval_labels = test.images, test.labels
        evaluated_on = "test split (the run was trained without a validation split: val_fraction 0)"
    return QuantizationData(
        calibration=train.images[calibration_idx],
        eval_images=eval_images,
        eval_labels=eval_labels,
        description={
            "dataset": dataset, "data_dir": str(root), "evaluated_on": evaluated_on,
            "evaluation_images": int(len(eval_labels)), "calibration_images": int(len(calibration_idx)),
            "calibration_from": "training images the run trained on (never its validation images)",
        },
    )  # fmt: skip


def quantize_int8(model_bytes: bytes, calibration: np.ndarray) -> bytes:
    """Static QDQ quantization (per-channel int8 weights, uint8 activations, MinMax calibration)."""
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Batches(CalibrationDataReader):
        def __init__(self):
            self._batches = iter(calibration[i : i + CALIBRATION_BATCH] for i in range(0, len(calibration), CALIBRATION_BATCH))

        def get_next(self):
            batch = next(self._batches, None)
            return None if batch is None else {INPUT_NAME: batch}

    with tempfile.TemporaryDirectory(prefix="exporter-quantize-") as work, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        work = Path(work)
        (work / "float.onnx").write_bytes(model_bytes)
        try:
            quant_pre_process(str(work / "float.onnx"), str(work / "prepared.onnx"), skip_symbolic_shape=True)
            quantize_static(
                str(work / "prepared.onnx"), str(work / "int8.onnx"), Batches(),
                quant_format=QuantFormat.QDQ, op_types_to_quantize=QUANTIZED_OP_TYPES,
                per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod.MinMax,
            )  # fmt: skip
        except Exception as error:  # noqa: BLE001
            raise ExportError(f"onnxruntime quantization failed: {one_line(error)}") from None
        model = onnx.load(str(work / "int8.onnx"))
    check_model(model)
    return model.SerializeToString()


def probabilities(model_bytes: bytes, images: np.ndarray) -> np.ndarray:
    return predict_in_batches(session_predictor(cpu_session(model_bytes)), images, EVAL_BATCH)


def seconds_per_batch(models: dict[str, bytes], images: np.ndarray, batch_size: int,
                      budget_s: float = 3.0) -> dict[str, float]:  # fmt: skip
    """Median wall time of one run at `batch_size` for each model, single-threaded.

    The models take turns, round after round, so that whatever else the machine is
    doing meanwhile slows them alike and the ratio stays fair.
    """
    predictors = {name: session_predictor(cpu_session(model, threads=TIMING_THREADS)) for name, model in models.items()}
    batch = np.ascontiguousarray(images[:batch_size])
    for predict in predictors.values():
        predict(batch)  # warm-up: first runs allocate
    times: dict[str, list[float]] = {name: [] for name in predictors}
    deadline, rounds = time.perf_counter() + budget_s, 0
    while rounds < 5 or (time.perf_counter() < deadline and rounds < 200):
        for name, predict in predictors.items():
            start = time.perf_counter()
            predict(batch)
            times[name].append(time.perf_counter() - start)
        rounds += 1
    return {name: float(np.median(values)) for name, values in times.items()}


def evaluate_int8(float_bytes: bytes, int8_bytes: bytes, data: QuantizationData, max_accuracy_drop: float,
                  model: str) -> tuple[dict, np.ndarray, np.ndarray]:  # fmt: skip
    """Accuracy change (validation split, else test) and the onnxruntime speed-up, both in this run.

    Returns the report and both models' validation probabilities (for ensemble figures).
    """
    float_probs = probabilities(float_bytes, data.eval_images)
    int8_probs = probabilities(int8_bytes, data.eval_images)
    timing = {}
    for batch_size in TIMING_BATCH_SIZES:
        seconds = seconds_per_batch({"fp32": float_bytes, "int8": int8_bytes}, data.eval_images, batch_size)
        timing[str(batch_size)] = {"fp32_ms": seconds["fp32"] * 1e3, "int8_ms": seconds["int8"] * 1e3,
                                   "speedup": seconds["fp32"] / seconds["int8"]}  # fmt: skip
    report = accuracy_report(model, float_probs, int8_probs, data, max_accuracy_drop)
    report["timing"] = {"runtime": "onnxruntime CPUExecutionProvider", "threads": TIMING_THREADS, "batch_sizes": timing}
    return report, float_probs, int8_probs


def accuracy_report(model: str, float_probs: np.ndarray, int8_probs: np.ndarray, data: QuantizationData,
                    max_accuracy_drop: float) -> dict:  # fmt: skip
    float_acc = float((float_probs.argmax(axis=1) == data.eval_labels).mean())
    int8_acc = float((int8_probs.argmax(axis=1) == data.eval_labels).mean())
    drop_points = (float_acc - int8_acc) * 100 + 0.0  # + 0.0: no "-0.00" when nothing changed
    return {
        "model": model,
        "method": "onnxruntime static quantization, QDQ, per-channel int8 weights, uint8 activations, MinMax",
        "quantized_op_types": QUANTIZED_OP_TYPES,
        "data": data.description,
        "evaluated_on": data.description["evaluated_on"],
        "accuracy_fp32": float_acc,
        "accuracy_int8": int8_acc,
        "accuracy_change_points": 0.0 - drop_points,
        "max_accuracy_drop_points": max_accuracy_drop,
        "argmax_agreement_with_fp32": float((float_probs.argmax(1) == int8_probs.argmax(1)).mean()),
        "max_abs_diff_vs_fp32": float(np.abs(float_probs - int8_probs).max()),
        "passed": bool(drop_points <= max_accuracy_drop),
    }


def refuse_if_too_inaccurate(report: dict) -> None:
    if not report["passed"]:
        raise QuantizationError(
            f"{report['model']}: int8 loses {-report['accuracy_change_points']:.2f} accuracy points on the "
            f"{report['evaluated_on'].split(' (')[0]} ({report['accuracy_fp32']:.2%} -> {report['accuracy_int8']:.2%}), "
            f"more than --max-accuracy-drop {report['max_accuracy_drop_points']}"
        )
