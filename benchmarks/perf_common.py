"""What the perf benchmarks share: a server process on free ports, its CPU time, perf_analyzer.

`ServerProcess` runs any server that speaks the KServe v2 gRPC protocol (ours, or NVIDIA
Triton through ../shared/tools/triton/serve), waits until it is ready, reads its
ModelStatistics and the CPU seconds it has used (its child processes included: a server
with --workers N). `run_perf_analyzer` measures one model at one concurrency.
"""

from __future__ import annotations

import csv
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import grpc
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ensemble_serving.protocol import grpc_service_pb2 as pb  # noqa: E402
from ensemble_serving.protocol import grpc_service_pb2_grpc as pb_grpc  # noqa: E402

# The installer's wrapper first: tritonclient's wheel also drops a perf_analyzer into the
# venv's bin/, which cannot start without libcudart.
_INSTALLED_PERF_ANALYZER = Path.home() / ".cache" / "perf-analyzer" / "perf_analyzer"
DEFAULT_PERF_ANALYZER = (_INSTALLED_PERF_ANALYZER if _INSTALLED_PERF_ANALYZER.exists()
                         else Path(shutil.which("perf_analyzer") or _INSTALLED_PERF_ANALYZER))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and its children, all threads."""
    process = psutil.Process(pid)
    total = 0.0
    for member in [process, *process.children(recursive=True)]:
        try:
            times = member.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


def serves_http(root: Path) -> bool:
    """Whether the server of the checkout at `root` has the HTTP endpoint (takes --http-port):
    a worktree of an older commit may predate it."""
    usage = subprocess.run([sys.executable, "-m", "server", "--help"], cwd=root, capture_output=True, text=True)
    return "--http-port" in usage.stdout


def our_server_command(repository: Path, extra: list[str] = (), http: bool = True) -> list[str]:
    """`python -m server` on the ports ServerProcess fills in. `http`: the checkout has the
    HTTP endpoint (see serves_http), which then gets a free port too; an older one is not
    given the option it would refuse."""
    ports = ["--grpc-port", "{grpc}", "--metrics-port", "{metrics}"] + (["--http-port", "{http}"] if http else [])
    return [sys.executable, "-m", "server", "--model-repository", str(repository), "--host", "127.0.0.1",
            *ports, *extra]


@dataclass
class Snapshot:
    batches: dict[str, Counter]  # model -> {batch size: executions}
    inferences: dict[str, int]  # model -> inference_count
    cpu_s: float  # the server's CPU seconds so far


class ServerProcess:
    """A server started by `command` (a list; `{grpc}`, `{http}` and `{metrics}` are filled with free ports)."""

    def __init__(self, command: list[str], log_path: Path, *, cwd: Path = ROOT, ready_timeout: float = 300):
        self.port, self.metrics_port, self.http_port = free_port(), free_port(), free_port()
        command = [part.format(grpc=self.port, metrics=self.metrics_port, http=self.http_port) for part in command]
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.process = subprocess.Popen(command, cwd=cwd, stdout=self._log, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        self.channel = grpc.insecure_channel(self.address)
        self.stub = pb_grpc.GRPCInferenceServiceStub(self.channel)
        self._wait_ready(ready_timeout)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def http_address(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SystemExit(f"server exited ({self.process.returncode}):\n{self.log_path.read_text()[-3000:]}")
            try:
                if self.stub.ServerReady(pb.ServerReadyRequest(), timeout=1).ready:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
        self.stop()
        raise SystemExit(f"server not ready after {timeout} s; log: {self.log_path}")

    def snapshot(self) -> Snapshot:
        stats = self.stub.ModelStatistics(pb.ModelStatisticsRequest(), timeout=30)
        batches = {entry.name: Counter({batch.batch_size: batch.compute_infer.count for batch in entry.batch_stats})
                   for entry in stats.model_stats}
        inferences = {entry.name: entry.inference_count for entry in stats.model_stats}
        return Snapshot(batches, inferences, cpu_seconds(self.process.pid))

    def stop(self) -> None:
        self.channel.close()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()


@dataclass
class PerfResult:
    throughput: float  # inferences/s
    p50_ms: float
    p99_ms: float
    stable: bool  # perf_analyzer's stability criterion was met (else: any three windows)


def run_perf_analyzer(perf_analyzer: Path, address: str, model: str, concurrency: int, workdir: Path, *,
                      measurement_ms: int = 4000, stability: int = 50, protocol: str = "grpc",
                      extra: list[str] = ()) -> PerfResult:  # fmt: skip
    """One perf_analyzer measurement (one image per request, random data). When the machine is
    too noisy for the stability criterion, it is measured again accepting any three windows."""
    report = workdir / f"{model}-{protocol}-c{concurrency}.csv"
    report.unlink(missing_ok=True)
    for percentage in (stability, 1000):
        command = [str(perf_analyzer), "-m", model, "-i", protocol, "-u", address,
                   "--concurrency-range", f"{concurrency}:{concurrency}", "--measurement-interval", str(measurement_ms),
                   "-s", str(percentage), "--max-trials", "10", "-f", str(report), *extra]  # fmt: skip
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode == 0 and report.exists():
            break
        if "stable measurement" not in result.stdout + result.stderr:
            raise SystemExit(f"perf_analyzer failed for {model} at concurrency {concurrency}:\n"
                             f"{' '.join(command)}\n{result.stdout[-2000:]}{result.stderr[-2000:]}")
    else:
        raise SystemExit(f"perf_analyzer found no stable measurement for {model} at concurrency {concurrency}")
    with open(report, newline="") as handle:
        row = next(csv.DictReader(handle))
    return PerfResult(float(row["Inferences/Second"]), float(row["p50 latency"]) / 1000,
                      float(row["p99 latency"]) / 1000, percentage == stability)
