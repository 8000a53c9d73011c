"""Where one request's CPU goes in our server: py-spy under perf_analyzer load.

    python benchmarks/profile_server.py --model-repository model_repository \\
        --model mnist-m0 --model cifar10-m0 --concurrency 16 --out docs/results/profile

For each model it starts `python -m server`, loads it with perf_analyzer at the given
concurrency, and meanwhile records the server with `py-spy record --native --rate 500`
twice: once as a flame graph (SVG), once as collapsed stacks. The collapsed stacks are
split by what each sample was doing (the deepest frame that names a part, see PARTS),
and divided by the requests served during the recording: CPU microseconds per request
per part. Samples of waiting threads (on a lock, the GIL, a socket) are left out.
py-spy slows what it samples (a lot, on one event-loop thread), so the shares come from
the samples and the total from the kernel: the server's CPU per request in a window
without py-spy (/proc). py-spy sees only the threads Python knows: onnxruntime's own pool
threads are invisible to it, so for a compute-bound model the "onnxruntime" share is the
calling thread's part only.

py-spy slows the server while it samples, so the split is what to read, not the speed.
Needs py-spy (`pip install py-spy`) and perf_analyzer. Run on purpose, on a quiet machine.
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from perf_common import DEFAULT_PERF_ANALYZER, ROOT, ServerProcess, our_server_command, serves_http

# (part, pattern a frame must match), checked from the deepest frame of a sample up; the
# first frame that matches any pattern names the part. Order matters only within a frame.
PARTS = [
    ("onnxruntime", r"onnxruntime|libonnxruntime|Ort|MlasGemm|mlas"),
    ("protobuf decode/encode", r"google/protobuf|upb_|_message\.|Serialize|Parse|protobuf"),
    ("numpy copies and views", r"numpy/|_multiarray_umath|PyArray_|npy_"),
    # Each server path in both layouts: flat (before 2026-12) and subpackages (a before-checkout may be either).
    ("metrics and statistics", r"prometheus_client/|server/(observability/)?(metrics|statistics)\.py"),
    ("batcher", r"server/(scheduling/)?batcher\.py|server/(models/)?ensemble\.py"),
    ("event loop and thread hops", r"threading\.py|concurrent/futures|asyncio/|_asynciomodule|futex|pthread_cond|"
                                   r"sem_wait|sem_post|eventfd|PyThread_acquire_lock|PyThread_release_lock|take_gil|drop_gil"),
    ("our request code (servicer, codec)", r"server/(transport/grpc_)?servicer\.py|server/(inference/)?service\.py|"
                                           r"server/(inference/)?request_codec\.py|server/(transport/)?http|"
                                           r"server/scheduling(\.py|/steps\.py)"),
    ("HTTP and JSON (uvicorn, httptools, json)", r"uvicorn/|httptools|json/|_json"),
    ("grpc C-core and its Python layer", r"grpc|cygrpc|libgrpc|epoll|tcp_|chttp2|absl|sendmsg|recvmsg|recv \(|sock_"),
]
_COMPILED = [(part, re.compile(pattern)) for part, pattern in PARTS]
OTHER = "other (interpreter, GC, kernel)"
# With --native py-spy samples waiting threads too. A sample whose deepest named frame is
# one of these is a thread blocked (on a lock, the GIL, a socket, a condition): off the CPU.
_WAITING = re.compile(r"^(PyThread_acquire_lock_timed|pthread_cond_(timed)?wait|pthread_mutex_lock|sem_(timed)?wait|"
                      r"epoll_wait|poll|select|nanosleep|clock_nanosleep|accept4?|syscall) \(")
_ADDRESS = re.compile(r"^0x[0-9a-f]+ \(")


def waiting(stack: list[str]) -> bool:
    named = next((frame for frame in reversed(stack) if not _ADDRESS.match(frame)), "")
    return bool(_WAITING.match(named))


def part_of(stack: list[str]) -> str:
    for frame in reversed(stack):
        for part, pattern in _COMPILED:
            if pattern.search(frame):
                return part
    return OTHER


def split_samples(collapsed: Path) -> tuple[collections.Counter, int]:
    """(part -> on-CPU samples, off-CPU samples), from py-spy's raw (collapsed) output:
    'frame;frame;... count' lines."""
    parts: collections.Counter = collections.Counter()
    off_cpu = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        if not stack:
            continue
        if waiting(frames):
            off_cpu += int(count)
        else:
            parts[part_of(frames)] += int(count)
    return parts, off_cpu


def py_spy(pid: int, seconds: int, rate: int, out: Path, format_: str) -> subprocess.Popen:
    return subprocess.Popen([shutil.which("py-spy") or "py-spy", "record", "--native", "--rate", str(rate),
                             "--pid", str(pid), "--duration", str(seconds), "--format", format_,
                             "--output", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip


def load(perf_analyzer: Path, protocol: str, address: str, model: str, concurrency: int, seconds: int,
         stop: threading.Event) -> None:  # fmt: skip
    """Keep perf_analyzer running against `model` until `stop` is set."""
    while not stop.is_set():
        subprocess.run([str(perf_analyzer), "-m", model, "-i", protocol, "-u", address, "--concurrency-range",
                        f"{concurrency}:{concurrency}", "--measurement-interval", str(seconds * 1000),
                        "-s", "1000", "--max-trials", "1"], capture_output=True)  # fmt: skip


def profile_model(args, model: str, workdir: Path) -> dict:
    http = serves_http(args.ours_root)
    if args.protocol == "http" and not http:
        sys.exit(f"profile_server: the server in {args.ours_root} has no HTTP endpoint; profile it over grpc")
    command = our_server_command(args.model_repository, args.server_flag, http=http)
    server = ServerProcess(command, workdir / f"{model}.log", cwd=args.ours_root)
    stop = threading.Event()
    address = server.http_address if args.protocol == "http" else server.address
    loader = threading.Thread(target=load, args=(args.perf_analyzer, args.protocol, address, model, args.concurrency,
                                                 args.seconds, stop))  # fmt: skip
    try:
        loader.start()
        time.sleep(3)  # the load reaches a steady state
        # py-spy slows the process it samples: the CPU per request comes from a window without it.
        before = server.snapshot()
        time.sleep(args.seconds)
        after = server.snapshot()
        cpu_us = 1e6 * (after.cpu_s - before.cpu_s) / max(after.inferences[model] - before.inferences[model], 1)
        tag = f"{model}-c{args.concurrency}" + ("-http" if args.protocol == "http" else "")
        svg = args.out / f"flame-{tag}.svg"
        recorder = py_spy(server.process.pid, args.seconds, args.rate, svg, "flamegraph")
        recorder.wait()
        collapsed = args.out / f"stacks-{tag}.txt"
        recorder = py_spy(server.process.pid, args.seconds, args.rate, collapsed, "raw")
        _, errors = recorder.communicate()
        if recorder.returncode != 0:
            raise SystemExit(f"py-spy failed: {errors.decode()[-1000:]}")
    finally:
        stop.set()
        loader.join()
        server.stop()
    requests = after.inferences[model] - before.inferences[model]
    parts, off_cpu = split_samples(collapsed)
    on_cpu = sum(parts.values())
    split = {part: cpu_us * parts.get(part, 0) / max(on_cpu, 1) for part, _ in [*PARTS, (OTHER, "")]}
    print(f"\n{model} over {args.protocol} at concurrency {args.concurrency}: {requests / args.seconds:.0f} requests/s without py-spy, "
          f"server CPU {cpu_us:.0f} us per request (all threads, /proc); py-spy samples: {on_cpu} on CPU, "
          f"{off_cpu} waiting")
    for part, us in sorted(split.items(), key=lambda item: -item[1]):
        print(f"  {part:<38} {us:8.1f} us  {100 * us / max(cpu_us, 1e-9):5.1f} %")
    print(f"  flame graph: {svg}")
    return {"model": model, "concurrency": args.concurrency, "requests": requests, "on_cpu_samples": on_cpu,
            "off_cpu_samples": off_cpu, "cpu_us_per_request": cpu_us, "us_per_request": split}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-repository", type=Path, required=True)
    parser.add_argument("--model", action="append", required=True)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--protocol", choices=("grpc", "http"), default="grpc", help="perf_analyzer's -i")
    parser.add_argument("--seconds", type=int, default=10, help="length of each recording")
    parser.add_argument("--rate", type=int, default=500, help="py-spy samples per second")
    parser.add_argument("--server-flag", action="append", default=[])
    parser.add_argument("--ours-root", type=Path, default=ROOT, help="checkout whose server to profile")
    parser.add_argument("--perf-analyzer", type=Path, default=DEFAULT_PERF_ANALYZER)
    parser.add_argument("--out", type=Path, default=Path("profile"), help="folder for the SVGs, stacks and JSON")
    args = parser.parse_args()
    args.model_repository = args.model_repository.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="profile-") as tmp:
        results = [profile_model(args, model, Path(tmp)) for model in args.model]
    (args.out / f"split-c{args.concurrency}-{args.protocol}.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
