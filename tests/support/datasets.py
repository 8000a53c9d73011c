"""Fake data sets in the real on-disk formats (docs/design.md §1): the one writer the tests
share, whatever images they put in (random noise, learnable patterns, known answers).

  write_mnist_split    MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz] (IDX)
  write_cifar_batches  cifar-10-batches-py/<batch> (pickle), and batches.meta when given names
"""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np


def idx_bytes(array: np.ndarray) -> bytes:
    """An IDX file of unsigned bytes: magic (0, 0x08, ndim), the dimensions big-endian, the data."""
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_mnist_split(root: Path, split: str, images: np.ndarray, labels: np.ndarray, *, gz: bool = True,
                      gz_labels: bool | None = None) -> Path:  # fmt: skip
    """`images` uint8 [N, H, W] or [N, H, W, 1] and their labels as one MNIST split ("train" or "test").

    gz: gzip the files (both forms are legal); gz_labels: the labels differently (default: as gz).
    """
    folder = Path(root) / "MNIST" / "raw"
    folder.mkdir(parents=True, exist_ok=True)
    prefix = "train" if split == "train" else "t10k"
    images = images[..., 0] if images.ndim == 4 else images
    for stem, array, zipped in ((f"{prefix}-images-idx3-ubyte", images, gz),
                                (f"{prefix}-labels-idx1-ubyte", labels, gz if gz_labels is None else gz_labels)):  # fmt: skip
        data = idx_bytes(array)
        (folder / (f"{stem}.gz" if zipped else stem)).write_bytes(gzip.compress(data) if zipped else data)
    return Path(root)


def cifar_batch_bytes(images_nhwc: np.ndarray, labels, protocol: int = pickle.DEFAULT_PROTOCOL) -> bytes:
    """One CIFAR-10 batch file: the images as R, G, B planes per row, the labels as a list."""
    data = np.ascontiguousarray(images_nhwc.transpose(0, 3, 1, 2).reshape(len(images_nhwc), -1))
    batch = {"batch_label": "generated", "labels": [int(label) for label in labels], "data": data, "filenames": []}
    return pickle.dumps(batch, protocol=protocol)


def write_cifar_batches(root: Path, batches: dict[str, tuple[np.ndarray, np.ndarray]],
                        label_names: list[str] | None = None, protocol: int = pickle.DEFAULT_PROTOCOL) -> Path:  # fmt: skip
    """{batch file name: (uint8 NHWC images, labels)} under cifar-10-batches-py; batches.meta when named."""
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    for name, (images, labels) in batches.items():
        (folder / name).write_bytes(cifar_batch_bytes(images, labels, protocol))
    if label_names is not None:
        (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": list(label_names)}))
    return Path(root)
