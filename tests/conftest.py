"""Shared fixtures: a tiny model repository and real server subprocesses.

Fixtures (use them from any test file):

  tiny_repository   session-scoped `TinyRepository`: a Triton-layout repository made by
                    the exporter from two tiny trained runs (tests/tiny_pipeline.py; without
                    torch, an onnx.helper stand-in, tests/tiny_models.py): members tiny-m0,
                    tiny-m1, the averaging model tiny-average and the ensemble tiny, all
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

Servers run as real subprocesses (our protocol modules and tritonclient cannot share a
process: see the team brief), with one onnxruntime thread each to spare the shared CPU.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import pytest

from ensemble_serving.protocol import grpc_service_pb2 as pb
from ensemble_serving.protocol import grpc_service_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parents[1]
SERVER_START_TIMEOUT_S = 90.0


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
        from tests.tiny_models import write_tiny_repository
    else:
        from tests.tiny_pipeline import write_tiny_repository
    return TinyRepository(**write_tiny_repository(root))


@pytest.fixture(scope="session")
def tiny_repository(tmp_path_factory) -> TinyRepository:
    return _build_tiny_repository(tmp_path_factory.mktemp("tiny_pipeline"))


# ---------------------------------------------------------------------------------------
# Server subprocesses
# ---------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class RunningServer:
    process: subprocess.Popen
    grpc_port: int
    metrics_port: int
    log_path: Path
    _channels: list = field(default_factory=list)

    @property
    def grpc_address(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def channel(self) -> grpc.Channel:
        channel = grpc.insecure_channel(self.grpc_address)
        self._channels.append(channel)
        return channel

    def stub(self) -> pb_grpc.GRPCInferenceServiceStub:
        return pb_grpc.GRPCInferenceServiceStub(self.channel())

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def send_signal(self, signum: int = signal.SIGTERM) -> None:
        self.process.send_signal(signum)

    def stop(self, timeout: float = 30.0) -> int:
        for channel in self._channels:
            channel.close()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def server_command(repository: Path, grpc_port: int, metrics_port: int, *flags: str) -> list[str]:
    return [sys.executable, "-m", "server", "--model-repository", str(repository),
            "--host", "127.0.0.1", "--grpc-port", str(grpc_port), "--metrics-port", str(metrics_port),
            "--intra-op-threads", "1", "--inter-op-threads", "1", *flags]  # fmt: skip


def wait_until_ready(server: RunningServer, timeout: float = SERVER_START_TIMEOUT_S) -> None:
    stub = server.stub()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"server exited with status {server.process.returncode} before it was ready:\n"
                               f"{server.log()[-4000:]}")
        try:
            if stub.ServerReady(pb.ServerReadyRequest(), timeout=1.0).ready:
                return
        except grpc.RpcError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"server not ready after {timeout} s:\n{server.log()[-4000:]}")


@pytest.fixture(scope="session")
def start_server(tmp_path_factory):
    started: list[RunningServer] = []
    logs = tmp_path_factory.mktemp("server_logs")

    def start(repository: Path | TinyRepository, *flags: str, wait: bool = True,
              env: dict[str, str] | None = None) -> RunningServer:
        path = repository.path if isinstance(repository, TinyRepository) else Path(repository)
        grpc_port, metrics_port = free_port(), free_port()
        log_path = logs / f"server-{len(started)}.log"
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        with open(log_path, "wb") as log_file:
            process = subprocess.Popen(server_command(path, grpc_port, metrics_port, *flags), cwd=ROOT, env=env,
                                       stdout=log_file, stderr=subprocess.STDOUT)
        server = RunningServer(process, grpc_port, metrics_port, log_path)
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
