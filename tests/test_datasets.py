"""The dataset readers against tiny generated files in torchvision's layouts.

Downloads are exercised against a real HTTP server on localhost (no internet at test
time); the "no network" case points the URLs at a port nothing listens on.
"""

from __future__ import annotations

import hashlib
import http.server
import io
import pickle
import socket
import tarfile
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest

from ensemble_serving import datasets
from ensemble_serving.datasets import (
    DATA_DIR_ENV,
    DatasetChecksumWarning,
    DatasetError,
    load_dataset,
    resolve_data_dir,
)
from tests.support.datasets import idx_bytes, write_cifar_batches, write_mnist_split

# Generated files never match the official md5s; tests that care about the warning check it
# with pytest.warns or turn it into an error locally.
pytestmark = pytest.mark.filterwarnings("ignore::ensemble_serving.datasets.DatasetChecksumWarning")

REAL_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


# --------------------------------------------------------------------------- file writers


def write_mnist(root: Path, split: str, n: int, *, gz: bool, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n, dtype=np.uint8)
    write_mnist_split(root, split, images, labels, gz=gz)
    return images, labels


def write_cifar(root: Path, n_per_batch: int = 4, seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    written = {name: (rng.integers(0, 256, size=(n_per_batch, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, size=n_per_batch))
               for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]}  # fmt: skip
    write_cifar_batches(root, written, label_names=[f"class{i}" for i in range(10)])
    return written


@pytest.fixture(autouse=True)
def fresh_checksum_memory(monkeypatch):
    """Each test sees the 'warn once' bookkeeping from scratch."""
    monkeypatch.setattr(datasets, "_checked_paths", set())


# --------------------------------------------------------------------------- data dir


def test_resolve_data_dir_prefers_argument_then_env_then_cache(monkeypatch, tmp_path):
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path / "from-env"))
    assert resolve_data_dir(tmp_path / "explicit") == tmp_path / "explicit"
    assert resolve_data_dir() == tmp_path / "from-env"
    monkeypatch.delenv(DATA_DIR_ENV)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert resolve_data_dir() == tmp_path / "home" / ".cache" / "ensemble-serving" / "data"


def test_env_variable_is_used_by_load_dataset(monkeypatch, tmp_path):
    images, _ = write_mnist(tmp_path, "test", 3, gz=True)
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path))
    assert np.array_equal(load_dataset("mnist", "test", download=False).images[..., 0], images)


# --------------------------------------------------------------------------- MNIST


@pytest.mark.parametrize("gz", [True, False], ids=["gzip", "raw"])
@pytest.mark.parametrize("split", ["train", "test"])
def test_mnist_reads_idx_files(tmp_path, gz, split):
    images, labels = write_mnist(tmp_path, split, 7, gz=gz)
    dataset = load_dataset("mnist", split, tmp_path, download=False)
    assert dataset.name == "mnist" and dataset.split == split
    assert dataset.images.shape == (7, 28, 28, 1) and dataset.images.dtype == np.uint8
    assert dataset.labels.dtype == np.int64
    assert np.array_equal(dataset.images[..., 0], images)
    assert np.array_equal(dataset.labels, labels)
    assert dataset.class_names == [str(d) for d in range(10)]


def test_mnist_truncated_gzip_names_the_file(tmp_path):
    write_mnist(tmp_path, "test", 5, gz=True)
    path = tmp_path / "MNIST" / "raw" / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(DatasetError, match="t10k-images-idx3-ubyte.gz.*(corrupt|truncated)"):
        load_dataset("mnist", "test", tmp_path, download=False)


def test_mnist_truncated_raw_idx_names_the_file(tmp_path):
    write_mnist(tmp_path, "test", 5, gz=False)
    path = tmp_path / "MNIST" / "raw" / "t10k-labels-idx1-ubyte"
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(DatasetError, match="t10k-labels-idx1-ubyte is corrupt or truncated"):
        load_dataset("mnist", "test", tmp_path, download=False)


def test_mnist_garbage_file_is_a_dataset_error(tmp_path):
    write_mnist(tmp_path, "test", 5, gz=False)
    (tmp_path / "MNIST" / "raw" / "t10k-images-idx3-ubyte").write_bytes(b"this is not an idx file at all")
    with pytest.raises(DatasetError, match="t10k-images-idx3-ubyte is not an IDX file"):
        load_dataset("mnist", "test", tmp_path, download=False)


def test_mnist_image_and_label_counts_must_agree(tmp_path):
    write_mnist(tmp_path, "test", 5, gz=False)
    labels = np.zeros(4, dtype=np.uint8)
    (tmp_path / "MNIST" / "raw" / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(labels))
    with pytest.raises(DatasetError, match="5 images but .* 4 labels"):
        load_dataset("mnist", "test", tmp_path, download=False)


def test_present_file_with_other_md5_is_read_with_one_warning(tmp_path):
    images, _ = write_mnist(tmp_path, "test", 3, gz=True)
    with pytest.warns(DatasetChecksumWarning, match="t10k-images-idx3-ubyte.gz.*official 9fb629c4") as caught:
        dataset = load_dataset("mnist", "test", tmp_path, download=False)
    assert len([w for w in caught if w.category is DatasetChecksumWarning]) == 1
    assert np.array_equal(dataset.images[..., 0], images)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DatasetChecksumWarning)  # a second read stays quiet
        load_dataset("mnist", "test", tmp_path, download=False)


# --------------------------------------------------------------------------- CIFAR-10


def test_cifar10_reads_pickle_batches(tmp_path):
    written = write_cifar(tmp_path, n_per_batch=4)
    with pytest.warns(DatasetChecksumWarning):
        train = load_dataset("cifar10", "train", tmp_path, download=False)
    test = load_dataset("cifar10", "test", tmp_path, download=False)
    assert train.images.shape == (20, 32, 32, 3) and train.images.dtype == np.uint8
    assert test.images.shape == (4, 32, 32, 3)
    expected_train = np.concatenate([written[f"data_batch_{i}"][0] for i in range(1, 6)])
    assert np.array_equal(train.images, expected_train)  # the plane layout decodes to NHWC
    assert np.array_equal(test.labels, written["test_batch"][1])
    assert train.labels.dtype == np.int64
    assert test.class_names == [f"class{i}" for i in range(10)]


def test_cifar10_corrupt_batch_names_the_file(tmp_path):
    write_cifar(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / "test_batch"
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    with pytest.raises(DatasetError, match="test_batch is corrupt or truncated"):
        load_dataset("cifar10", "test", tmp_path, download=False)


def test_cifar10_batch_of_wrong_shape_is_rejected(tmp_path):
    write_cifar(tmp_path)
    bad = {"labels": [0, 1], "data": np.zeros((2, 100), dtype=np.uint8)}
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(pickle.dumps(bad))
    with pytest.raises(DatasetError, match=r"test_batch is corrupt: 'data' .* expected uint8 \[N, 3072\]"):
        load_dataset("cifar10", "test", tmp_path, download=False)


class _Boom:
    def __reduce__(self):
        return (print, ("pickle code ran",))


def test_cifar10_pickle_cannot_run_code(tmp_path, capsys):
    write_cifar(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(pickle.dumps({"data": _Boom(), "labels": []}))
    with pytest.raises(DatasetError, match="refusing to load global builtins.print"):
        load_dataset("cifar10", "test", tmp_path, download=False)
    assert "pickle code ran" not in capsys.readouterr().out


# --------------------------------------------------------------------------- missing files and downloads


def test_bad_name_and_split_are_one_line_errors(tmp_path):
    with pytest.raises(DatasetError, match="unknown dataset 'svhn': expected one of mnist, cifar10"):
        load_dataset("svhn", "test", tmp_path)
    with pytest.raises(DatasetError, match="unknown split 'valid'"):
        load_dataset("mnist", "valid", tmp_path)


def test_missing_files_without_download_say_what_and_where(tmp_path):
    with pytest.raises(DatasetError) as caught:
        load_dataset("cifar10", "test", tmp_path, download=False)
    message = str(caught.value)
    assert str(tmp_path / "cifar-10-batches-py") in message
    assert "test_batch" in message and "--data-dir" in message and DATA_DIR_ENV in message


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_no_network_gives_one_clear_error(tmp_path, monkeypatch):
    port = _closed_port()
    monkeypatch.setattr(datasets, "MNIST_URLS", (f"http://127.0.0.1:{port}/a/", f"http://127.0.0.1:{port}/b/"))
    with pytest.raises(DatasetError) as caught:
        load_dataset("mnist", "test", tmp_path)
    message = str(caught.value)
    assert "\n" not in message
    assert "t10k-images-idx3-ubyte[.gz]" in message and str(tmp_path / "MNIST" / "raw") in message
    assert "download failed" in message and "--data-dir" in message and DATA_DIR_ENV in message
    assert not list((tmp_path / "MNIST" / "raw").glob("*")), "no partial files are left behind"


@pytest.fixture
def file_server(tmp_path):
    """A real HTTP server on localhost serving the folder it returns."""
    served = tmp_path / "served"
    served.mkdir()

    class QuietHandler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(served), **kwargs)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), QuietHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield served, f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


def _md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def test_mnist_download_falls_back_to_mirror_and_verifies_md5(tmp_path, monkeypatch, file_server):
    served, base = file_server
    source = tmp_path / "source"
    images, labels = write_mnist(source, "test", 4, gz=True)
    (served / "mirror").mkdir()
    md5s = {}
    for path in (source / "MNIST" / "raw").iterdir():
        (served / "mirror" / path.name).write_bytes(path.read_bytes())
        md5s[path.name] = _md5(path.read_bytes())
    monkeypatch.setattr(datasets, "MNIST_URLS", (base + "missing/", base + "mirror/"))
    monkeypatch.setattr(datasets, "MNIST_MD5", md5s)
    target = tmp_path / "data"
    with warnings.catch_warnings():
        warnings.simplefilter("error", DatasetChecksumWarning)  # verified downloads never warn
        dataset = load_dataset("mnist", "test", target)
    assert np.array_equal(dataset.images[..., 0], images) and np.array_equal(dataset.labels, labels)
    assert (target / "MNIST" / "raw" / "t10k-images-idx3-ubyte.gz").is_file()


def test_download_with_wrong_md5_is_refused_and_not_kept(tmp_path, monkeypatch, file_server):
    served, base = file_server
    write_mnist(served, "test", 2, gz=True)
    monkeypatch.setattr(datasets, "MNIST_URLS", (base + "MNIST/raw/",))  # md5s stay the official ones
    with pytest.raises(DatasetError, match="downloaded md5 .* != expected 9fb629c4"):
        load_dataset("mnist", "test", tmp_path / "data")
    assert not list((tmp_path / "data" / "MNIST" / "raw").glob("*"))


def test_cifar10_download_extracts_archive(tmp_path, monkeypatch, file_server):
    served, base = file_server
    source = tmp_path / "source"
    written = write_cifar(source)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        tar.add(source / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    (served / "cifar-10-python.tar.gz").write_bytes(buffer.getvalue())
    member_md5 = {p.name: _md5(p.read_bytes()) for p in (source / "cifar-10-batches-py").iterdir()}
    monkeypatch.setattr(datasets, "CIFAR10_URLS", (base + "cifar-10-python.tar.gz",))
    monkeypatch.setattr(datasets, "CIFAR10_ARCHIVE_MD5", _md5(buffer.getvalue()))
    monkeypatch.setattr(datasets, "CIFAR10_MD5", member_md5)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DatasetChecksumWarning)
        test = load_dataset("cifar10", "test", tmp_path / "data")
    assert np.array_equal(test.images, written["test_batch"][0])
    assert (tmp_path / "data" / "cifar-10-batches-py" / "data_batch_5").is_file()


# --------------------------------------------------------------------------- real data


@pytest.mark.realdata
@pytest.mark.skipif(not REAL_DATA.is_dir(), reason="../shared/data not present")
def test_real_datasets_have_the_published_sizes():
    mnist = load_dataset("mnist", "test", REAL_DATA, download=False)
    assert mnist.images.shape == (10000, 28, 28, 1)
    with pytest.warns(DatasetChecksumWarning):  # the JPEG-degraded copy
        cifar = load_dataset("cifar10", "train", REAL_DATA, download=False)
    assert cifar.images.shape == (50000, 32, 32, 3)
    assert np.bincount(cifar.labels).tolist() == [5000] * 10
    assert cifar.class_names[0] == "airplane"
