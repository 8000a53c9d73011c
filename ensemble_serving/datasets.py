"""MNIST and CIFAR-10 in torchvision's on-disk layouts: finding, downloading, checking.

load_dataset() is the entry point; the format parsers (IDX, CIFAR pickles) are in
ensemble_serving.dataset_formats, whose public names are re-exported here. The trainer, the exporter's parity check and the client all read images through this
module, so it must not import torch. Layout under one data directory:

    MNIST/raw/{train,t10k}-images-idx3-ubyte[.gz], {train,t10k}-labels-idx1-ubyte[.gz]
    cifar-10-batches-py/data_batch_1..5, test_batch, batches.meta

Policy on checksums (see ../shared/data/README.md for why): a file we download is
verified against the official md5 before it is used; a file that is already present is
read even if its md5 differs, with one warning per file.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ensemble_serving.dataset_formats import (  # public names re-exported for callers
    CIFAR10_CLASSES,
    MNIST_CLASSES,
    DatasetError,
    _check_labels,
    _read_cifar_batch,
    _read_cifar_class_names,
    _read_idx,
)

__all__ = [
    "DATASET_NAMES",
    "DATA_DIR_ENV",
    "Dataset",
    "DatasetChecksumWarning",
    "DatasetError",
    "default_data_dir",
    "load_dataset",
    "resolve_data_dir",
]

DATASET_NAMES = ("mnist", "cifar10")
SPLITS = ("train", "test")
DATA_DIR_ENV = "ENSEMBLE_SERVING_DATA_DIR"
DOWNLOAD_TIMEOUT_S = 30.0


class DatasetChecksumWarning(UserWarning):
    """A file that was already present has an md5 other than the official release's."""


@dataclass(frozen=True)
class Dataset:
    name: str  # "mnist" | "cifar10"
    split: str  # "train" | "test"
    images: np.ndarray  # uint8 [N, H, W, C]
    labels: np.ndarray  # int64 [N]
    class_names: list[str]

    def __len__(self) -> int:
        return len(self.labels)


# --------------------------------------------------------------------------- data dir


def default_data_dir() -> Path:
    cache_root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache_root) / "ensemble-serving" / "data"


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """Explicit argument > $ENSEMBLE_SERVING_DATA_DIR > ~/.cache/ensemble-serving/data."""
    if data_dir is not None and str(data_dir) != "":
        return Path(data_dir).expanduser()
    from_env = os.environ.get(DATA_DIR_ENV)
    if from_env:
        return Path(from_env).expanduser()
    return default_data_dir()


# --------------------------------------------------------------------------- official releases

MNIST_DIR = Path("MNIST") / "raw"
# Official host first, then the mirror torchvision uses (the official one is often down).
MNIST_URLS = (
    "https://yann.lecun.com/exdb/mnist/",
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
)
MNIST_MD5 = {  # of the .gz files, as published
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}
MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

CIFAR10_DIR = Path("cifar-10-batches-py")
CIFAR10_URLS = ("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",)
CIFAR10_ARCHIVE_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_MD5 = {
    "data_batch_1": "c99cafc152244af753f735de768cd75f",
    "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
    "data_batch_4": "634d18415352ddfa80567beed471001a",
    "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
    "test_batch": "40351d587109b95175f43aff81a1287e",
    "batches.meta": "5ff9c542aee3614f3951f8cda6e48888",
}
CIFAR10_FILES = {
    "train": tuple(f"data_batch_{i}" for i in range(1, 6)),
    "test": ("test_batch",),
}


# --------------------------------------------------------------------------- public entry point


def load_dataset(
    name: str,
    split: str = "test",
    data_dir: str | os.PathLike | None = None,
    download: bool = True,
) -> Dataset:
    """Read one split of a data set, downloading the official files only if they are absent."""
    if name not in DATASET_NAMES:
        raise DatasetError(f"unknown dataset {name!r}: expected one of {', '.join(DATASET_NAMES)}")
    if split not in SPLITS:
        raise DatasetError(f"unknown split {split!r} for {name}: expected one of {', '.join(SPLITS)}")
    root = resolve_data_dir(data_dir)
    if name == "mnist":
        return _load_mnist(root, split, download)
    return _load_cifar10(root, split, download)


# --------------------------------------------------------------------------- MNIST (IDX)


def _load_mnist(root: Path, split: str, download: bool) -> Dataset:
    folder = root / MNIST_DIR
    stems = MNIST_FILES[split]
    paths = [_find_mnist_file(folder, stem) for stem in stems]
    if any(path is None for path in paths):
        if not download:
            raise _missing_files_error("MNIST", split, folder, [f"{s}[.gz]" for s in stems], None)
        _download_mnist(folder, split, stems)
        paths = [folder / f"{stem}.gz" for stem in stems]
    images_path, labels_path = paths
    _warn_checksums(folder, [_checksum_note(p, MNIST_MD5.get(p.name)) for p in paths])
    images = _read_idx(images_path, expected_ndim=3)
    labels = _read_idx(labels_path, expected_ndim=1)
    if len(images) != len(labels):
        raise DatasetError(
            f"{images_path} holds {len(images)} images but {labels_path} holds {len(labels)} labels"
        )
    _check_labels(labels, len(MNIST_CLASSES), labels_path)
    return Dataset(
        name="mnist",
        split=split,
        images=images[..., np.newaxis],  # [N, 28, 28] -> [N, 28, 28, 1]
        labels=labels.astype(np.int64),
        class_names=list(MNIST_CLASSES),
    )


def _find_mnist_file(folder: Path, stem: str) -> Path | None:
    """Prefer the uncompressed file (faster to read); fall back to the .gz."""
    for candidate in (folder / stem, folder / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _download_mnist(folder: Path, split: str, stems: tuple[str, ...]) -> None:
    files = [f"{stem}.gz" for stem in stems]
    for filename in files:
        target = folder / filename
        if target.is_file():
            continue
        urls = [base + filename for base in MNIST_URLS]
        try:
            _download_verified(urls, target, MNIST_MD5[filename])
        except _DownloadFailed as failure:
            raise _missing_files_error("MNIST", split, folder, [f"{s}[.gz]" for s in stems], failure) from None


# --------------------------------------------------------------------------- CIFAR-10 (pickle)


def _load_cifar10(root: Path, split: str, download: bool) -> Dataset:
    folder = root / CIFAR10_DIR
    names = CIFAR10_FILES[split]
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        if not download:
            raise _missing_files_error("CIFAR-10", split, folder, list(names), None)
        _download_cifar10(root, folder, split, list(names))
    meta_path = folder / "batches.meta"
    _warn_checksums(folder, [_checksum_note(folder / n, CIFAR10_MD5[n]) for n in (*names, meta_path.name)
                             if (folder / n).is_file()])
    images, labels = [], []
    for filename in names:
        batch_images, batch_labels = _read_cifar_batch(folder / filename)
        images.append(batch_images)
        labels.append(batch_labels)
    return Dataset(
        name="cifar10",
        split=split,
        images=np.concatenate(images),
        labels=np.concatenate(labels),
        class_names=_read_cifar_class_names(meta_path),
    )


def _download_cifar10(root: Path, folder: Path, split: str, names: list[str]) -> None:
    with tempfile.TemporaryDirectory(prefix="cifar10-download-") as tmp:
        archive = Path(tmp) / "cifar-10-python.tar.gz"
        try:
            _download_verified(list(CIFAR10_URLS), archive, CIFAR10_ARCHIVE_MD5)
        except _DownloadFailed as failure:
            raise _missing_files_error("CIFAR-10", split, folder, names, failure) from None
        _extract_cifar_archive(archive, root, folder)


def _extract_cifar_archive(archive: Path, root: Path, folder: Path) -> None:
    """Extract only the expected regular files, never paths outside the data dir."""
    folder.mkdir(parents=True, exist_ok=True)
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for member in tar.getmembers():
                member_path = Path(member.name)
                if (
                    member.isfile()
                    and member_path.parent == CIFAR10_DIR
                    and member_path.name in CIFAR10_MD5
                ):
                    source = tar.extractfile(member)
                    assert source is not None
                    _atomic_write(root / member_path, source)
    except (tarfile.TarError, OSError, EOFError) as error:
        raise DatasetError(f"{archive} could not be extracted ({error})") from None


# --------------------------------------------------------------------------- shared helpers


def _md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


_checked_paths: set[Path] = set()


def _checksum_note(path: Path, expected_md5: str | None) -> str | None:
    """'<file> md5 X (official Y)' when a present file differs, once per file per process."""
    if expected_md5 is None:
        return None
    resolved = path.resolve()
    if resolved in _checked_paths:  # hashing 180 MB of CIFAR costs ~0.3 s; do it once
        return None
    _checked_paths.add(resolved)
    actual = _md5(path)
    if actual == expected_md5:
        return None
    return f"{path.name} (md5 {actual}, official {expected_md5})"


def _warn_checksums(folder: Path, notes: list[str | None]) -> None:
    """Present files are trusted; a modified copy earns one warning, not an error."""
    notes = [n for n in notes if n]
    if notes:
        warnings.warn(
            f"{folder}: {len(notes)} file(s) differ from the official release: {'; '.join(notes)}. "
            "Reading them anyway (a modified copy, e.g. the JPEG-degraded CIFAR-10 in ../shared/data).",
            DatasetChecksumWarning,
            stacklevel=4,
        )


class _DownloadFailed(Exception):
    pass


def _download_verified(urls: list[str], target: Path, expected_md5: str) -> None:
    """Try each URL in turn; keep the first download whose md5 matches."""
    target.parent.mkdir(parents=True, exist_ok=True)
    reasons = []
    for url in urls:
        try:
            with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response:
                _atomic_write(target, response, expected_md5=expected_md5)
            return
        except (urllib.error.URLError, OSError, ValueError, _ChecksumMismatch) as error:
            reasons.append(f"{url}: {getattr(error, 'reason', error)}")
    raise _DownloadFailed("; ".join(reasons))


class _ChecksumMismatch(Exception):
    pass


def _atomic_write(target: Path, source, expected_md5: str | None = None) -> None:
    """Stream into a temporary file beside the target and rename it into place when complete."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as handle:
            shutil.copyfileobj(source, handle, length=1 << 20)
        if expected_md5 is not None and (actual := _md5(tmp)) != expected_md5:
            raise _ChecksumMismatch(f"downloaded md5 {actual} != expected {expected_md5}")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def _missing_files_error(
    title: str, split: str, folder: Path, expected: list[str], failure: Exception | None
) -> DatasetError:
    why = f"download failed ({failure})" if failure is not None else "download disabled"
    return DatasetError(
        f"{title} {split} files not found in {folder} (expected {', '.join(expected)}) and {why}. "
        f"Put them there, or point --data-dir or ${DATA_DIR_ENV} at a directory that holds them "
        "(e.g. ../shared/data)."
    )
