"""Soak test: hold the server under mixed load for minutes and check it loses nothing.

    python benchmarks/soak.py --model-repository DIR --model NAME --duration 300 --concurrency 32

starts a server subprocess on free ports (or uses `--url HOST:PORT --pid PID --metrics-url URL`
for one already running), then runs `--concurrency` client workers for `--duration`
seconds. Each worker sends, at random:

  valid      1..4 random images; the answer must equal the server's answer for the same
             images sent alone before the load began (catches rows mixed up between
             requests of one batch)                               expected: OK
  invalid    wrong shape / datatype / byte length / unknown model  expected: INVALID_ARGUMENT or NOT_FOUND
  cancelled  a valid request cancelled by the client after 0-5 ms  expected: CANCELLED (or OK if done first)
  expired    a valid request with a 0.5-10 ms deadline             expected: DEADLINE_EXCEEDED (or OK)

Any other outcome is an unexpected error. It reports requests per kind, statuses,
unexpected errors, p50/p99 latency of valid requests, and the server's resident
memory (RSS), open file descriptors and threads: before the load, after a warm-up
(the first `--warmup` seconds: allocator pools and thread pools grow there once) and at
the end. At the end the pending-requests gauge must be back at 0.
Prints a table, and with `--json PATH` writes the numbers for a test to assert on.
`--mix valid=1,expired=1` changes the kinds sent (for finding which one costs memory).

Known: on grpc.aio (grpcio 1.85) every request that ends by its deadline or a client's
cancel leaves native memory behind (grpc/grpc#43360; tracemalloc sees no Python growth, and
benchmarks/bare_grpc_server.py, with none of our code, grows the same way). Our server on
grpc.aio grew 15 % in this 5-minute soak, 100-400 bytes per expired or cancelled request
even when it answered before the deadline. That is why it runs gRPC's thread-pool server
(server/process/app.py), which stays flat (+1.8 % after warm-up, 575 k requests).
Exit status 1 when an acceptance check fails (unexpected errors, RSS growth >= 10%,
pending requests left).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc
import numpy as np
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ensemble_serving.protocol import grpc_service_pb2 as pb  # noqa: E402
from ensemble_serving.protocol import grpc_service_pb2_grpc as pb_grpc  # noqa: E402

MIX = {"valid": 0.6, "invalid": 0.15, "cancelled": 0.1, "expired": 0.15}
EXPECTED = {
    "valid": {"OK"},
    "invalid": {"INVALID_ARGUMENT", "NOT_FOUND"},
    "cancelled": {"CANCELLED", "OK"},
    "expired": {"DEADLINE_EXCEEDED", "OK"},
}
MAX_RSS_GROWTH = 0.10
POOL_SIZE = 32  # distinct images whose quiet answers are the reference


@dataclass
class Report:
    duration_s: float
    concurrency: int
    requests: int = 0
    by_kind: dict = field(default_factory=dict)  # kind -> {status: count}
    unexpected: int = 0
    unexpected_examples: list = field(default_factory=list)
    wrong_answers: int = 0
    valid_p50_ms: float = 0.0
    valid_p99_ms: float = 0.0
    requests_per_s: float = 0.0
    rss_before_mb: float = 0.0
    rss_start_mb: float = 0.0  # after the warm-up
    rss_end_mb: float = 0.0
    rss_growth: float = 0.0  # end / start - 1
    fds_start: int = 0
    fds_end: int = 0
    threads_start: int = 0
    threads_end: int = 0
    pending_at_end: float = 0.0
    rss_samples_mb: list = field(default_factory=list)  # [seconds since the load began, RSS MiB], every 10 s
    server_alive: bool = True
    failures: list = field(default_factory=list)


# --------------------------------------------------------------------------- requests


def infer_request(model: str, images: np.ndarray) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model)
    request.inputs.add(name="images", datatype="UINT8", shape=list(images.shape))
    request.raw_input_contents.append(images.tobytes())
    return request


def probabilities(response: pb.ModelInferResponse) -> np.ndarray:
    index = [output.name for output in response.outputs].index("probabilities")
    shape = list(response.outputs[index].shape)
    return np.frombuffer(response.raw_output_contents[index], dtype="<f4").reshape(shape)


def invalid_request(model: str, image_shape: tuple, rng: random.Random) -> pb.ModelInferRequest:
    """One of several malformed requests (each must be refused, never crash anything)."""
    images = np.zeros((1, *image_shape), dtype=np.uint8)
    request = infer_request(model, images)
    variant = rng.randrange(5)
    if variant == 0:
        request.model_name = f"no-such-model-{rng.randrange(1000)}"
    elif variant == 1:
        request.inputs[0].shape[:] = [1, *image_shape[:-1], image_shape[-1] + 1]
    elif variant == 2:
        request.inputs[0].datatype = "FP32"
    elif variant == 3:
        request.raw_input_contents[0] = request.raw_input_contents[0][:-1]
    else:
        request.inputs[0].name = "not-images"
    return request


# --------------------------------------------------------------------------- server process


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(repository: Path, log_path: Path) -> tuple[subprocess.Popen, str, str]:
    grpc_port, metrics_port = free_port(), free_port()
    command = [sys.executable, "-m", "server", "--model-repository", str(repository), "--host", "127.0.0.1",
               "--grpc-port", str(grpc_port), "--metrics-port", str(metrics_port), "--log-level", "warning"]
    log_file = open(log_path, "w")  # noqa: SIM115 (kept open for the server's lifetime)
    process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, cwd=ROOT)
    return process, f"127.0.0.1:{grpc_port}", f"http://127.0.0.1:{metrics_port}/metrics"


def wait_ready(url: str, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(url) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        while time.monotonic() < deadline:
            try:
                if stub.ServerReady(pb.ServerReadyRequest(), timeout=2).ready:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.5)
    raise RuntimeError(f"server at {url} not ready after {timeout_s:.0f} s")


def pending_requests(metrics_url: str) -> float:
    text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    values = re.findall(r"^ensemble_server_pending_requests\{[^}]*\} (\S+)$", text, flags=re.MULTILINE)
    return sum(float(value) for value in values)


def resources(process: psutil.Process) -> tuple[float, int, int]:
    return process.memory_info().rss / 2**20, process.num_fds(), process.num_threads()


# --------------------------------------------------------------------------- load


class Soak:
    def __init__(self, url: str, model: str, concurrency: int, seed: int, mix: dict[str, float] = MIX):
        self.mix = mix
        self.url = url
        self.model = model
        self.concurrency = concurrency
        self.rng = random.Random(seed)
        self.statuses: dict[str, collections.Counter] = {kind: collections.Counter() for kind in MIX}
        self.valid_latencies: list[float] = []
        self.unexpected: list[str] = []
        self.wrong_answers = 0

    async def prepare(self, stub) -> None:
        """The image shape from ModelMetadata and the reference answers, one image at a time."""
        metadata = await stub.ModelMetadata(pb.ModelMetadataRequest(name=self.model), timeout=10)
        self.image_shape = tuple(int(d) for d in metadata.inputs[0].shape[1:])
        generator = np.random.default_rng(0)
        self.pool = generator.integers(0, 256, size=(POOL_SIZE, *self.image_shape), dtype=np.uint8)
        self.reference = []
        for image in self.pool:
            response = await stub.ModelInfer(infer_request(self.model, image[None]), timeout=30)
            self.reference.append(probabilities(response)[0])
        self.reference = np.stack(self.reference)

    async def one_request(self, stub, kind: str, rng: random.Random) -> str:
        if kind == "invalid":
            call = stub.ModelInfer(invalid_request(self.model, self.image_shape, rng), timeout=30)
            return await self._status(call)
        picks = [rng.randrange(POOL_SIZE) for _ in range(rng.randint(1, 4))]
        request = infer_request(self.model, self.pool[picks])
        timeout = rng.uniform(0.0005, 0.010) if kind == "expired" else 30
        started = time.perf_counter()
        call = stub.ModelInfer(request, timeout=timeout)
        if kind == "cancelled":
            await asyncio.sleep(rng.uniform(0, 0.005))
            call.cancel()
        status = await self._status(call)
        if status == "OK":
            answer = probabilities(await call)
            if not np.allclose(answer, self.reference[picks], atol=1e-5):
                self.wrong_answers += 1
                return "WRONG_ANSWER"
            if kind == "valid":
                self.valid_latencies.append(time.perf_counter() - started)
        return status

    @staticmethod
    async def _status(call) -> str:
        try:
            await call
        except asyncio.CancelledError:
            return "CANCELLED"
        except grpc.aio.AioRpcError as error:
            return error.code().name
        return "OK"

    async def worker(self, stub, stop_at: float, worker_id: int) -> None:
        rng = random.Random(self.rng.random() + worker_id)
        kinds, weights = list(self.mix), list(self.mix.values())
        while time.monotonic() < stop_at:
            kind = rng.choices(kinds, weights)[0]
            status = await self.one_request(stub, kind, rng)
            self.statuses[kind][status] += 1
            if status not in EXPECTED[kind] and len(self.unexpected) < 20:
                self.unexpected.append(f"{kind}: {status}")

    async def sample_rss(self, server: psutil.Process, samples: list, start: float, stop_at: float) -> None:
        while time.monotonic() < stop_at:
            samples.append([round(time.monotonic() - start, 1), round(server.memory_info().rss / 2**20, 1)])
            await asyncio.sleep(10)

    async def run(self, duration_s: float, on_warm: callable, warmup_s: float, server: psutil.Process,
                  rss_samples: list) -> None:  # fmt: skip
        options = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
        async with grpc.aio.insecure_channel(self.url, options=options) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            await self.prepare(stub)
            start = time.monotonic()
            workers = [asyncio.create_task(self.worker(stub, start + duration_s, i)) for i in range(self.concurrency)]
            workers.append(asyncio.create_task(self.sample_rss(server, rss_samples, start, start + duration_s)))
            await asyncio.sleep(min(warmup_s, duration_s))
            on_warm()
            await asyncio.gather(*workers)
            self.elapsed_s = time.monotonic() - start


def run_soak(url: str, model: str, server: psutil.Process, metrics_url: str, duration_s: float,
             concurrency: int, warmup_s: float, seed: int = 0, mix: dict[str, float] = MIX) -> Report:  # fmt: skip
    report = Report(duration_s=duration_s, concurrency=concurrency)
    report.rss_before_mb, _, _ = resources(server)

    def on_warm() -> None:
        report.rss_start_mb, report.fds_start, report.threads_start = resources(server)

    soak = Soak(url, model, concurrency, seed, mix)
    asyncio.run(soak.run(duration_s, on_warm, warmup_s, server, report.rss_samples_mb))
    time.sleep(1.0)  # let the last cancelled requests be dropped from the queue
    report.server_alive = server.is_running() and server.status() != psutil.STATUS_ZOMBIE
    report.rss_end_mb, report.fds_end, report.threads_end = resources(server)
    report.rss_growth = report.rss_end_mb / report.rss_start_mb - 1
    report.pending_at_end = pending_requests(metrics_url)
    report.by_kind = {kind: dict(counter) for kind, counter in soak.statuses.items() if counter}
    report.requests = sum(sum(counter.values()) for counter in soak.statuses.values())
    report.requests_per_s = report.requests / soak.elapsed_s
    report.unexpected = sum(count for kind, counter in soak.statuses.items()
                            for status, count in counter.items() if status not in EXPECTED[kind])  # fmt: skip
    report.unexpected_examples = soak.unexpected
    report.wrong_answers = soak.wrong_answers
    if soak.valid_latencies:
        report.valid_p50_ms, report.valid_p99_ms = (float(v) * 1e3 for v in np.percentile(soak.valid_latencies, [50, 99]))
    report.failures = acceptance_failures(report)
    return report


def acceptance_failures(report: Report) -> list[str]:
    failures = []
    if report.unexpected:
        failures.append(f"{report.unexpected} unexpected outcomes, e.g. {report.unexpected_examples[:5]}")
    if report.rss_growth >= MAX_RSS_GROWTH:
        failures.append(f"RSS grew {report.rss_growth:.1%} (limit {MAX_RSS_GROWTH:.0%})")
    if report.pending_at_end != 0:
        failures.append(f"{report.pending_at_end:g} requests still pending after the load")
    if not report.server_alive:
        failures.append("the server process died")
    if "valid" in report.by_kind and not report.by_kind["valid"].get("OK"):
        failures.append("no valid request succeeded")
    return failures


def print_report(report: Report) -> None:
    print(f"soak: {report.duration_s:.0f} s at concurrency {report.concurrency}: "
          f"{report.requests} requests ({report.requests_per_s:.0f}/s)")
    for kind, statuses in report.by_kind.items():
        print(f"  {kind:<10} {sum(statuses.values()):>8}  " + ", ".join(f"{s} {n}" for s, n in sorted(statuses.items())))
    print(f"  unexpected outcomes {report.unexpected}, wrong answers {report.wrong_answers}")
    print(f"  valid latency p50 {report.valid_p50_ms:.1f} ms, p99 {report.valid_p99_ms:.1f} ms")
    print(f"  server RSS before load {report.rss_before_mb:.1f} MiB, after warm-up {report.rss_start_mb:.1f} MiB, "
          f"end {report.rss_end_mb:.1f} MiB (growth {report.rss_growth:+.1%})")
    print("  RSS MiB every 10 s: " + " ".join(f"{mib:.0f}" for _, mib in report.rss_samples_mb))
    print(f"  open fds {report.fds_start} -> {report.fds_end}, threads {report.threads_start} -> {report.threads_end}, "
          f"pending requests at end {report.pending_at_end:g}")
    print("PASS" if not report.failures else "FAIL: " + "; ".join(report.failures))


def parse_mix(text: str) -> dict[str, float]:
    mix = {}
    for item in text.split(","):
        kind, _, weight = item.partition("=")
        if kind not in MIX or not weight:
            raise argparse.ArgumentTypeError(f"{item!r}: expected KIND=WEIGHT with KIND one of {', '.join(MIX)}")
        mix[kind] = float(weight)
    return mix


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-repository", type=Path, help="start a server on this repository")
    parser.add_argument("--url", help="use a running server (HOST:PORT) instead; needs --pid and --metrics-url")
    parser.add_argument("--pid", type=int, help="process id of the running server (for RSS)")
    parser.add_argument("--metrics-url", help="its /metrics URL, e.g. http://127.0.0.1:8002/metrics")
    parser.add_argument("--model", required=True, help="model to load (input 'images' UINT8 [-1,H,W,C])")
    parser.add_argument("--duration", type=float, default=300.0, help="seconds of load (default 300)")
    parser.add_argument("--warmup", type=float, default=30.0, help="seconds before the start RSS is taken")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mix", type=parse_mix, default=MIX,
                        help="request kinds and weights, e.g. valid=1,expired=1 (default: "
                             + ",".join(f"{kind}={weight}" for kind, weight in MIX.items()) + ")")
    parser.add_argument("--json", type=Path, help="write the report here as JSON")
    parser.add_argument("--server-log", type=Path, default=Path(tempfile.gettempdir()) / "soak-server.log",
                        help="where the server started with --model-repository logs")
    args = parser.parse_args(argv)

    process = None
    if args.url:
        if not (args.pid and args.metrics_url):
            parser.error("--url needs --pid and --metrics-url")
        url, pid, metrics_url = args.url, args.pid, args.metrics_url
    elif args.model_repository:
        process, url, metrics_url = start_server(args.model_repository, args.server_log)
        pid = process.pid
    else:
        parser.error("give --model-repository (start a server) or --url (use a running one)")
    try:
        wait_ready(url)
        report = run_soak(url, args.model, psutil.Process(pid), metrics_url, args.duration,
                          args.concurrency, args.warmup, args.seed, args.mix)  # fmt: skip
    finally:
        if process is not None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                process.kill()
    print_report(report)
    if args.json:
        args.json.write_text(json.dumps(asdict(report), indent=2))
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main())
