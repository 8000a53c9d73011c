"""Load/unload cycles of a CIFAR-size model: does the server give the memory back?

    python benchmarks/model_control_memory.py --cycles 50
    python benchmarks/model_control_memory.py --model-dir /work/bench/repo/cifar10-m0 --cycles 50 --json out.json

Starts a server subprocess in explicit model-control mode on a scratch repository
holding one model: a copy of `--model-dir` (an exported member, e.g. the airbench
CIFAR-10 one), or by default a generated graph of the same size (~2 M weights, 8 MB;
tests/support/tiny_models.py). Each cycle loads the model, runs a few inferences (so
that onnxruntime's arenas are really used), unloads it and waits until the index says
it is unloaded. It prints the server's resident memory (RSS) after cycle 1, 5, 10, 25
and the last, checks that after the last unload no metrics series of the model remain,
and with `--json` writes the numbers. What would leak is growth that goes on with the
cycles. Measured here (2 shared cores, one onnxruntime thread), the exported airbench
member: RSS 76.9 MiB before any load; after cycle 5 about 89 MiB, and from there within
88-106 MiB up to cycle 200, with no trend (run to run, +-10 MiB).
The server calls glibc's malloc_trim after each unload (server/models/control.py);
without it the same run wandered between 117 and 171 MiB (freed pages kept by the
allocator), still without a trend.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ensemble_serving.model_config import load_model_config  # noqa: E402
from ensemble_serving.protocol import grpc_service_pb2 as pb  # noqa: E402
from tests.support.servers import RunningServer, free_port, server_command, wait_until_ready  # noqa: E402
from tests.support.tiny_models import write_cifar_size_model  # noqa: E402

NAME = "cifar10-m0"
REPORT_AT = (1, 5, 10, 25)


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def scratch_repository(root: Path, model_dir: Path | None) -> tuple[Path, tuple[int, ...]]:
    """The repository to cycle on, and the model's image shape [H, W, C]."""
    repository = root / "repository"
    repository.mkdir()
    if model_dir is None:
        write_cifar_size_model(repository, NAME)
    else:
        shutil.copytree(model_dir, repository / NAME)
    config = load_model_config(repository / NAME)
    return repository, tuple(config.input[0].dims)


def infer_request(images: np.ndarray) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=NAME)
    request.inputs.add(name="images", datatype="UINT8", shape=images.shape)
    request.raw_input_contents.append(images.tobytes())
    return request


def wait_unloaded(stub, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        states = {row.state for row in stub.RepositoryIndex(pb.RepositoryIndexRequest()).models if row.name == NAME}
        if states == {"UNAVAILABLE"}:
            return
        time.sleep(0.05)
    raise RuntimeError("the model did not unload")


def series_left(server: RunningServer) -> list[str]:
    text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    return [line for line in text.splitlines()
            if f'model="{NAME}",version=' in line and not line.startswith("#")]  # fmt: skip


def run(cycles: int, model_dir: Path | None) -> dict:
    with tempfile.TemporaryDirectory(prefix="model-control-memory-") as scratch:
        repository, shape = scratch_repository(Path(scratch), model_dir)
        log_path = Path(scratch) / "server.log"
        grpc_port, metrics_port = free_port(), free_port()
        with open(log_path, "wb") as log_file:
            process = subprocess.Popen(server_command(repository, grpc_port, metrics_port,
                                                      "--model-control-mode", "explicit", "--log-level", "warning"),
                                       cwd=ROOT, stdout=log_file, stderr=subprocess.STDOUT)  # fmt: skip
        server = RunningServer(process, grpc_port, metrics_port, log_path)
        try:
            wait_until_ready(server)
            stub = server.stub()
            images = np.random.default_rng(0).integers(0, 256, (4, *shape), dtype=np.uint8)
            report = {"model": str(model_dir or "generated CIFAR-size graph"), "cycles": cycles,
                      "rss_mib_at_start": round(rss_mib(process.pid), 1), "rss_mib_after_cycle": {}}
            started = time.perf_counter()
            for cycle in range(1, cycles + 1):
                stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name=NAME), timeout=120)
                for _ in range(8):
                    stub.ModelInfer(infer_request(images), timeout=60)
                stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name=NAME), timeout=120)
                wait_unloaded(stub)
                if cycle in REPORT_AT or cycle % 25 == 0 or cycle == cycles:
                    report["rss_mib_after_cycle"][cycle] = round(rss_mib(process.pid), 1)
                    print(f"after cycle {cycle:3d}: RSS {report['rss_mib_after_cycle'][cycle]:7.1f} MiB", flush=True)
            report["seconds"] = round(time.perf_counter() - started, 1)
            report["metrics_series_left"] = series_left(server)
            after = report["rss_mib_after_cycle"]
            for settled in (5, 25):
                if settled in after and cycles > settled:
                    report[f"growth_mib_after_cycle_{settled}"] = round(after[cycles] - after[settled], 1)
        finally:
            server.stop()
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cycles", type=int, default=50)
    parser.add_argument("--model-dir", type=Path, default=None,
                        help="a model folder to copy (config.pbtxt + 1/model.onnx); default: a generated CIFAR-size one")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    report = run(args.cycles, args.model_dir)
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
