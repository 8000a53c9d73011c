"""Classify image files (PNG, JPEG, anything Pillow reads) with a served model.

Each file is converted to the model's channel count (grayscale or RGB) and resized to
its H x W when they differ, then sent as one UINT8 [1, H, W, C] request.

Class names: the v2 protocol carries them only through the classification extension
(Triton's `classification` output parameter, answered with "score:index:label"
strings built from the model's label_filename). That is what we ask for first. A
server without the extension refuses the request (ServerError.refused); then the client asks for the
plain probabilities, ranks them itself and takes names from --labels (one per line),
or shows class indices.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from client.transport import ClientError, ImageModel, ServerError, Transport

RESAMPLE = "BILINEAR"  # smooth enough for downscaling photos, exact for same-size images


@dataclass(frozen=True)
class Prediction:
    class_index: int
    label: str
    score: float


@dataclass
class ImagePredictions:
    path: str
    notes: list[str] = field(default_factory=list)  # what was done to fit the model (resized, converted)
    top: list[Prediction] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"image": self.path, "notes": self.notes,
                "top": [{"index": p.class_index, "label": p.label, "score": p.score} for p in self.top]}  # fmt: skip


def load_image(path: str | Path, model: ImageModel) -> tuple[np.ndarray, list[str]]:
    """uint8 [H, W, C] shaped for `model`, plus notes on any conversion made."""
    from PIL import Image, UnidentifiedImageError

    height, width, channels = model.image_shape
    try:
        with Image.open(path) as opened:
            image = opened.copy()
    except FileNotFoundError:
        raise ClientError(f"image {path} does not exist") from None
    except (UnidentifiedImageError, OSError) as error:
        raise ClientError(f"cannot read image {path}: {error} (expected a PNG or JPEG file)") from None
    notes = []
    mode = {1: "L", 3: "RGB"}.get(channels)
    if mode is None:
        raise ClientError(f"model {model.name!r} takes {channels}-channel images; this client reads 1 (L) or 3 (RGB)")
    if image.mode != mode:
        notes.append(f"converted {image.mode} -> {mode}")
        image = image.convert(mode)
    target = (image.width if width == -1 else width, image.height if height == -1 else height)
    if image.size != target:
        notes.append(f"resized {image.width}x{image.height} -> {target[0]}x{target[1]}")
        image = image.resize(target, getattr(Image.Resampling, RESAMPLE))
    pixels = np.asarray(image, dtype=np.uint8)
    return pixels.reshape(pixels.shape[0], pixels.shape[1], channels), notes


def predict_images(
    connection: Transport,
    model: ImageModel,
    paths: list[str],
    top_k: int = 5,
    labels: list[str] | None = None,
) -> list[ImagePredictions]:
    k = top_k if model.num_classes == -1 else min(top_k, model.num_classes)
    results = []
    use_extension = labels is None
    for path in paths:
        pixels, notes = load_image(path, model)
        batch = pixels[np.newaxis]
        top = None
        if use_extension:
            top = _top_k_by_extension(connection, model, batch, k)
            use_extension = top is not None  # no extension on this server: stop asking
        if top is None:
            top = _top_k_from_probabilities(connection, model, batch, k, labels)
        results.append(ImagePredictions(path=str(path), notes=notes, top=top))
    return results


def _top_k_by_extension(connection, model, batch, k) -> list[Prediction] | None:
    """Ask for 'score:index:label' strings; None when the server lacks the extension."""
    try:
        entries = connection.infer(model, batch, class_count=k).reshape(-1)
    except ServerError as error:
        if error.refused:
            return None
        raise
    return [parse_classification(entry) for entry in entries]


def _top_k_from_probabilities(connection, model, batch, k, labels) -> list[Prediction]:
    scores = connection.infer(model, batch).reshape(-1).astype(np.float64)
    order = np.argsort(-scores, kind="stable")[:k]
    return [
        Prediction(int(i), labels[i] if labels and i < len(labels) else str(int(i)), float(scores[i]))
        for i in order
    ]


def parse_classification(entry: bytes | str) -> Prediction:
    """'0.981:7:seven' (or '0.981:7' without a label file) -> Prediction."""
    text = entry.decode("utf-8") if isinstance(entry, bytes) else str(entry)
    parts = text.split(":", 2)
    try:
        score, index = float(parts[0]), int(parts[1])
    except (ValueError, IndexError):
        raise ClientError(f"server returned a malformed classification {text!r} (expected score:index[:label])") from None
    return Prediction(index, parts[2] if len(parts) == 3 else str(index), score)


def read_labels(path: str | Path) -> list[str]:
    try:
        return [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    except OSError as error:
        raise ClientError(f"cannot read --labels {path}: {error}") from None
