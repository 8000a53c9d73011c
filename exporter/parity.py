"""The parity proof: onnxruntime on CPU must reproduce PyTorch on the same images.

For each batch size (1 and 64) we run both sides over the same images and record the
largest absolute difference of any probability and the fraction of images whose
argmax (predicted class) agrees. A model passes when every difference is at most
TOLERANCE and every argmax agrees. Images are the dataset's real test images when
the data dir has them, synthetic uniform noise otherwise (the report says which).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable

import numpy as np
import onnxruntime as ort

from ensemble_serving.datasets import DatasetChecksumWarning, DatasetError, load_dataset, resolve_data_dir

TOLERANCE = 1e-4
BATCH_SIZES = (1, 64)
IMAGES_PER_BATCH_SIZE = {1: 64, 64: 512}  # batch size -> how many images are run at it
SYNTHETIC_SEED = 0

Predict = Callable[[np.ndarray], np.ndarray]  # uint8 [N, H, W, C] -> float32 [N, classes]


@dataclass(frozen=True)
class ParityImages:
    images: np.ndarray  # uint8 [N, H, W, C]
    description: dict  # where they came from, for the report


def parity_images(dataset: str, input_shape: tuple[int, int, int], data_dir=None,
                  count: int = max(IMAGES_PER_BATCH_SIZE.values())) -> ParityImages:  # fmt: skip
    """The first `count` real test images if the data dir has them, else seeded noise."""
    root = resolve_data_dir(data_dir)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DatasetChecksumWarning)  # the JPEG CIFAR copy; irrelevant here
            test = load_dataset(dataset, "test", root, download=False)
    except DatasetError as error:
        reason = " ".join(str(error).split())
    else:
        if test.images.shape[1:] == input_shape:
            return ParityImages(
                test.images[:count],
                {"source": "real", "dataset": dataset, "split": "test", "count": min(count, len(test)), "data_dir": str(root)},
            )
        reason = f"test images are {list(test.images.shape[1:])}, the model expects {list(input_shape)}"
    rng = np.random.default_rng(SYNTHETIC_SEED)
    images = rng.integers(0, 256, size=(count, *input_shape), dtype=np.uint8)
    return ParityImages(images, {"source": "synthetic", "distribution": "uniform uint8", "seed": SYNTHETIC_SEED,
                                 "count": count, "why_not_real": reason})  # fmt: skip


def predict_in_batches(predict: Predict, images: np.ndarray, batch_size: int) -> np.ndarray:
    return np.concatenate([predict(images[start : start + batch_size]) for start in range(0, len(images), batch_size)])


def run_at_batch_sizes(predict: Predict, images: np.ndarray) -> dict[int, np.ndarray]:
    """Outputs for the parity images at each batch size (batch 1 on the first 64 images)."""
    return {size: predict_in_batches(predict, images[: IMAGES_PER_BATCH_SIZE[size]], size) for size in BATCH_SIZES}


def compare(reference: np.ndarray, candidate: np.ndarray) -> dict:
    if reference.shape != candidate.shape:
        return {"images": len(reference), "error": f"shape {list(candidate.shape)} != reference {list(reference.shape)}",
                "max_abs_diff": float("inf"), "argmax_agreement": 0.0, "argmax_disagreements": len(reference)}  # fmt: skip
    agree = reference.argmax(axis=1) == candidate.argmax(axis=1)
    return {
        "images": int(len(reference)),
        "max_abs_diff": float(np.abs(reference.astype(np.float64) - candidate).max()),
        "argmax_agreement": float(agree.mean()),
        "argmax_disagreements": int((~agree).sum()),
    }


def parity_report(reference: dict[int, np.ndarray], candidate: dict[int, np.ndarray], *,
                  model: str, reference_name: str, candidate_name: str, images: dict,
                  tolerance: float = TOLERANCE) -> dict:  # fmt: skip
    by_batch = {str(size): compare(reference[size], candidate[size]) for size in reference}
    max_diff = max(entry["max_abs_diff"] for entry in by_batch.values())
    disagreements = sum(entry["argmax_disagreements"] for entry in by_batch.values())
    return {
        "model": model,
        "reference": reference_name,
        "candidate": candidate_name,
        "images": images,
        "tolerance": tolerance,
        "batch_sizes": by_batch,
        "max_abs_diff": max_diff,
        "argmax_agreement": min(entry["argmax_agreement"] for entry in by_batch.values()),
        "argmax_disagreements": disagreements,
        "passed": bool(max_diff <= tolerance and disagreements == 0),
    }


def failure_summary(report: dict) -> str:
    return (
        f"{report['model']}: onnxruntime differs from {report['reference']}: max |diff| "
        f"{report['max_abs_diff']:.3g} (tolerance {report['tolerance']:g}), "
        f"{report['argmax_disagreements']} argmax disagreement(s) on {report['images']['source']} images"
    )


def cpu_session(model_bytes: bytes, threads: int = 0) -> ort.InferenceSession:
    """An onnxruntime session on the CPU provider; threads=0 lets onnxruntime choose."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3  # errors only: no graph-optimizer chatter
    return ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])


def session_predictor(session: ort.InferenceSession, input_name: str = "images") -> Predict:
    return lambda images: session.run(None, {input_name: images})[0]


def runtime_name() -> str:
    return f"onnxruntime {ort.__version__} CPUExecutionProvider"
