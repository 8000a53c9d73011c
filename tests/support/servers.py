"""Server subprocesses for the tests: the command line, free ports, the one ready-wait loop."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import psutil

from ensemble_serving.protocol import grpc_service_pb2 as pb
from ensemble_serving.protocol import grpc_service_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parents[2]
SERVER_START_TIMEOUT_S = 90.0


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
    http_port: int = 0  # 0: started without HTTP
    _channels: list = field(default_factory=list)

    @property
    def grpc_address(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

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


def server_command(repository: Path, grpc_port: int, metrics_port: int, *flags: str, http_port: int = 0) -> list[str]:
    """The server on these ports; HTTP only when `http_port` is given (its default, 8000, is
    shared by every test server)."""
    return [sys.executable, "-m", "server", "--model-repository", str(repository),
            "--host", "127.0.0.1", "--grpc-port", str(grpc_port), "--metrics-port", str(metrics_port),
            "--http-port", str(http_port), "--intra-op-threads", "1", "--inter-op-threads", "1", *flags]  # fmt: skip


def wait_until(server: RunningServer, ready: Callable[[], bool], timeout: float = SERVER_START_TIMEOUT_S,
               what: str = "ready") -> None:  # fmt: skip
    """Poll `ready()` (an RPC; gRPC errors count as not yet) until it says True, the server exits, or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"server exited with status {server.process.returncode} before it was {what}:\n"
                               f"{server.log()[-4000:]}")
        try:
            if ready():
                return
        except grpc.RpcError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"server not {what} after {timeout} s:\n{server.log()[-4000:]}")


def wait_until_ready(server: RunningServer, timeout: float = SERVER_START_TIMEOUT_S) -> None:
    """ServerReady over a plaintext, token-less channel (a secured server needs its own probe)."""
    stub = server.stub()
    wait_until(server, lambda: stub.ServerReady(pb.ServerReadyRequest(), timeout=1.0).ready, timeout)


def listening_workers(server) -> list[psutil.Process]:
    """A --workers N server's worker processes: the supervisor's children that listen on the
    gRPC port (a restarted one once it has loaded its models, since it opens the port after)."""
    def listens(process: psutil.Process) -> bool:
        try:
            return any(c.laddr.port == server.grpc_port and c.status == psutil.CONN_LISTEN
                       for c in process.net_connections("tcp"))  # fmt: skip
        except psutil.NoSuchProcess:
            return False

    return [child for child in psutil.Process(server.process.pid).children() if listens(child)]
