"""Shared fixtures: a tiny model repository and real server subprocesses.

Fixtures (use them from any test file):

  tiny_repository   session-scoped `TinyRepository`: a Triton-layout repository made by
                    the exporter from two tiny trained runs (tests/support/tiny_pipeline.py;
                    without torch, an onnx.helper stand-in, tests/support/tiny_models.py):
                    members tiny-m0, tiny-m1, the averaging model tiny-average and the
                    ensemble tiny, all
                    with the project's signature (input `images` UINT8 [-1, H, W, C],
                    output `probabilities` FP32 [-1, classes], labels.txt). Its fields
                    (names, image shape, class names, max_batch_size, images()) are what
                    tests should use instead of hard-coded values.
  start_server      session-scoped factory: `start_server(repository, *extra_flags,
                    wait=True, env=None)` starts `python -m server` on free ports (extra
                    environment variables in `env`) and waits until it is ready;
                    returns a `RunningServer` (grpc_address, metrics_url, stub(), log()).
                    Every server it started is stopped at the end of the session.
  server            session-scoped `RunningServer` on `tiny_repository` (default flags).
  inference_stub    a GRPCInferenceService stub connected to `server`.
  few_threads       torch on 2 intra-op threads for the test (mark a module or test
                    `torch_threads(n)` for n), restored afterwards.

What tests share beyond fixtures lives in tests/support/ (see its __init__); no test
file imports from another test file.

Servers run as real subprocesses (our protocol modules and tritonclient cannot share a
process: see the team brief), with one onnxruntime thread each to spare the shared CPU.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from ensemble_serving.protocol import grpc_service_pb2_grpc as pb_grpc
from tests.support import known_answer as known
from tests.support.servers import ROOT, RunningServer, free_port, server_command, wait_until_ready


def pytest_configure(config):
    config.addinivalue_line("markers", "torch_threads(n): the few_threads fixture sets torch to n threads")


@pytest.fixture
def few_threads(request):
    """The shared 2-core machine: torch tests keep to a few threads (spinning extra ones slow everyone)."""
    torch = pytest.importorskip("torch")
    marker = request.node.get_closest_marker("torch_threads")
    previous = torch.get_num_threads()
    torch.set_num_threads(marker.args[0] if marker else 2)
    yield
    torch.set_num_threads(previous)


# ---------------------------------------------------------------------------------------
# The tiny repository
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TinyRepository:
    path: Path
    ensemble: str  # the ensemble model's name
    members: tuple[str, ...]  # member model names
    average: str  # the averaging model's name
    height: int
    width: int
    channels: int
    class_names: tuple[str, ...]
    max_batch_size: int

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.height, self.width, self.channels)

    def images(self, count: int, seed: int = 0) -> np.ndarray:
        """Random uint8 images [count, H, W, C] for this repository's models."""
        return np.random.default_rng(seed).integers(0, 256, (count, *self.image_shape), dtype=np.uint8)

    def expected_probabilities(self, model: str, images: np.ndarray) -> np.ndarray:
        """What `model` must answer for `images`, computed by onnxruntime in this process
        (the ensemble: the mean of its members)."""
        import onnxruntime as ort

        if model == self.ensemble:
            return np.mean([self.expected_probabilities(member, images) for member in self.members], axis=0)
        session = ort.InferenceSession(str(self.path / model / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
        return session.run(["probabilities"], {"images": images})[0]


def _build_tiny_repository(root: Path) -> TinyRepository:
    """The real pipeline (trainer on generated data, then exporter) when torch is installed;
    otherwise (a server-only install) the same layout built with onnx.helper."""
    if importlib.util.find_spec("torch") is None:
        from tests.support.tiny_models import write_tiny_repository
    else:
        from tests.support.tiny_pipeline import write_tiny_repository
    return TinyRepository(**write_tiny_repository(root))


@pytest.fixture(scope="session")
def tiny_repository(tmp_path_factory) -> TinyRepository:
    return _build_tiny_repository(tmp_path_factory.mktemp("tiny_pipeline"))


# ---------------------------------------------------------------------------------------
# Server subprocesses
# ---------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def start_server(tmp_path_factory):
    started: list[RunningServer] = []
    logs = tmp_path_factory.mktemp("server_logs")

    def start(repository: Path | TinyRepository, *flags: str, wait: bool = True,
              env: dict[str, str] | None = None) -> RunningServer:
        path = repository.path if isinstance(repository, TinyRepository) else Path(repository)
        grpc_port, metrics_port, http_port = free_port(), free_port(), free_port()
        log_path = logs / f"server-{len(started)}.log"
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        command = server_command(path, grpc_port, metrics_port, *flags, http_port=http_port)
        with open(log_path, "wb") as log_file:
            process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT)
        server = RunningServer(process, grpc_port, metrics_port, log_path, http_port)
        started.append(server)
        if wait:
            wait_until_ready(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture(scope="session")
def server(start_server, tiny_repository) -> RunningServer:
    return start_server(tiny_repository)


@pytest.fixture
def inference_stub(server) -> pb_grpc.GRPCInferenceServiceStub:
    return server.stub()


# ---------------------------------------------------------------------------------------
# The known-answer model (tests/support/known_answer.py), for the client tests
# ---------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def known_server(start_server, tmp_path_factory):
    """The known-answer model loaded; a second model `other` in the repository but not loaded."""
    repository = tmp_path_factory.mktemp("known_repository")
    known.write_model_repository(repository, name="known")
    known.write_model_repository(repository, name="other")
    return start_server(repository, "--model", "known")


@pytest.fixture(scope="session")
def known_data_dir(tmp_path_factory):
    return known.write_mnist_test_split(tmp_path_factory.mktemp("known_data"), known.images(), known.LABELS)
