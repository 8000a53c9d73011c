"""Parsers for the two on-disk formats the data sets come in, numpy only.

IDX (MNIST, gzip or not) and the CIFAR-10 python pickles, read with an unpickler that
refuses every global but numpy's array constructors. Each reader checks shapes and
label ranges and raises DatasetError naming the file. Finding, downloading and
checksumming the files is ensemble_serving.datasets, which re-exports the public names
defined here.
"""

from __future__ import annotations

import gzip
import io
import pickle
import struct
from pathlib import Path

import numpy as np

class DatasetError(Exception):
    """A data set cannot be read or fetched; the message says which file and what to do."""


MNIST_CLASSES = [str(digit) for digit in range(10)]
CIFAR10_CLASSES = [
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
]  # fmt: skip


# --------------------------------------------------------------------------- MNIST (IDX)


_IDX_DTYPES = {0x08: np.uint8}  # MNIST uses only unsigned bytes


def _read_idx(path: Path, expected_ndim: int) -> np.ndarray:
    """Parse an IDX file (gzip or not): 4-byte magic, big-endian dims, then the data."""
    try:
        raw = _read_maybe_gzip(path)
    except (OSError, EOFError, gzip.BadGzipFile) as error:
        raise DatasetError(f"{path} is corrupt or truncated ({error}); delete it to re-download") from None
    if len(raw) < 4:
        raise DatasetError(f"{path} is truncated: {len(raw)} bytes, not even an IDX header")
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code not in _IDX_DTYPES or ndim != expected_ndim:
        raise DatasetError(
            f"{path} is not an IDX file of {expected_ndim}-d unsigned bytes "
            f"(header {raw[:4].hex()}); is it the right file?"
        )
    header_len = 4 + 4 * ndim
    if len(raw) < header_len:
        raise DatasetError(f"{path} is truncated inside its header")
    shape = struct.unpack(f">{ndim}I", raw[4:header_len])
    expected_len = header_len + int(np.prod(shape))
    if len(raw) != expected_len:
        raise DatasetError(
            f"{path} is corrupt or truncated: header says shape {shape} "
            f"({expected_len} bytes) but the file holds {len(raw)} bytes"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header_len).reshape(shape).copy()


def _read_maybe_gzip(path: Path) -> bytes:
    with open(path, "rb") as handle:
        magic = handle.read(2)
    if magic == b"\x1f\x8b":
        with gzip.open(path, "rb") as handle:
            return handle.read()
    if path.suffix == ".gz":
        raise OSError("not a gzip file")
    return path.read_bytes()


# --------------------------------------------------------------------------- CIFAR-10 (pickle)


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    batch = _unpickle(path)
    if not isinstance(batch, dict) or "data" not in batch or "labels" not in batch:
        raise DatasetError(f"{path} is not a CIFAR-10 batch: expected a dict with 'data' and 'labels'")
    data = np.asarray(batch["data"])
    labels = np.asarray(batch["labels"])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DatasetError(
            f"{path} is corrupt: 'data' has dtype {data.dtype} shape {data.shape}, expected uint8 [N, 3072]"
        )
    if labels.shape != (data.shape[0],):
        raise DatasetError(f"{path} is corrupt: {data.shape[0]} images but {labels.size} labels")
    _check_labels(labels, len(CIFAR10_CLASSES), path)
    # Rows are R, G, B planes of 32x32, row-major: [N, 3, 32, 32] -> NHWC.
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), labels.astype(np.int64)


def _read_cifar_class_names(path: Path) -> list[str]:
    """batches.meta holds label_names; without it, the official names (they never change)."""
    if not path.is_file():
        return list(CIFAR10_CLASSES)
    meta = _unpickle(path)
    names = meta.get("label_names") if isinstance(meta, dict) else None
    if not isinstance(names, list) or len(names) != len(CIFAR10_CLASSES):
        raise DatasetError(f"{path} is corrupt: expected 'label_names' with {len(CIFAR10_CLASSES)} entries")
    return [str(n) for n in names]


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Refuse every global except the few numpy needs to rebuild an array.

    The CIFAR batches are pickles; a plain pickle.load would run whatever code a
    tampered file names. Arrays need only these constructors.
    """

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")


def _unpickle(path: Path):
    try:
        with open(path, "rb") as handle:
            return _NumpyOnlyUnpickler(io.BytesIO(handle.read()), encoding="latin1").load()
    except Exception as error:  # pickle raises many types on bad bytes; all mean "corrupt"
        raise DatasetError(
            f"{path} is corrupt or truncated ({type(error).__name__}: {error}); delete it to re-download"
        ) from None


def _check_labels(labels: np.ndarray, num_classes: int, path: Path) -> None:
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise DatasetError(
            f"{path} is corrupt: labels range {labels.min()}..{labels.max()}, expected 0..{num_classes - 1}"
        )
