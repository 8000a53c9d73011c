"""Server throughput with Triton's perf_analyzer, against onnxruntime in process.

    python benchmarks/perf_server.py --model-repository model_repository \\
        --model cifar10-m0 --model cifar10 --concurrency 1,4,16
    python benchmarks/perf_server.py --model-repository model_repository --model mnist \\
        --concurrency 16 --batching both

For every model and concurrency it
  1. starts `python -m server` on free ports (once per batching mode),
  2. runs perf_analyzer (gRPC, raw tensors, random uint8 images, one image per request)
     and reads throughput and p50/p99 latency from its CSV,
  3. reads ModelStatistics before and after, which says which batch sizes the dynamic
     batcher formed for each ONNX model involved (an ensemble: its members and the average);
then, with the server stopped so that it has the CPU to itself,
  4. times onnxruntime in this process on the same model files at exactly those batch
     sizes, with the fastest session options measured here (spinning threads: 1.8x the
     images/s of non-spinning ones at batch 16 on the CIFAR-10 net; --baseline-no-spinning
     to compare with the server's own options instead), and
  5. prints server throughput / in-process throughput: how much of the model's own
     speed survives the protocol, the queueing and the Python around it. For an
     ensemble the in-process time is the sum over its models (run one after another).

Numbers on a shared machine are noisy; the ratio within one run is what matters.
perf_analyzer: ../shared/tools/install-perf-analyzer (or --perf-analyzer PATH).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from perf_common import DEFAULT_PERF_ANALYZER, ROOT, ServerProcess, our_server_command, run_perf_analyzer

sys.path.insert(0, str(ROOT))
from server.models.repository import load_order, scan_repository  # noqa: E402
from server.models.runtime import OnnxModel, SessionSettings  # noqa: E402


@dataclass
class Measurement:
    model: str
    batching: str  # "on" | "off"
    concurrency: int
    throughput: float  # inferences/s seen by perf_analyzer
    p50_ms: float
    p99_ms: float
    stable: bool  # perf_analyzer's stability criterion was met (else: three windows, whatever they said)
    # ONNX model -> {batch size: executions} formed during the perf_analyzer run
    batches: dict[str, dict[int, int]] = field(default_factory=dict)
    server_cpu_ms: float = 0.0  # server process CPU time per inference over the whole perf run
    in_process: float = 0.0  # inferences/s of onnxruntime in process at those batch sizes
    in_process_cpu_ms: float = 0.0  # its CPU time per inference

    @property
    def ratio(self) -> float:
        return self.throughput / self.in_process if self.in_process else float("nan")

    @property
    def cpu_ratio(self) -> float:
        """In-process CPU per inference / server CPU per inference: the share of the server's
        CPU that is model work. Unlike wall-clock throughput it barely moves when other
        processes compete for the cores."""
        return self.in_process_cpu_ms / self.server_cpu_ms if self.server_cpu_ms else float("nan")

    def mean_batch(self) -> float:
        counts = next(iter(self.batches.values()), {})
        executions = sum(counts.values())
        return sum(size * n for size, n in counts.items()) / executions if executions else 0.0


# --------------------------------------------------------------------------- in process
class InProcessTimer:
    """Seconds per onnxruntime call of each model at each batch size, timed afresh for every
    measurement so that it sees the machine as the perf_analyzer run just before it did."""

    def __init__(self, repository: Path, settings: SessionSettings, budget_s: float):
        self.specs = {spec.name: spec for spec in load_order(scan_repository(repository))}
        self.settings = settings
        self.budget_s = budget_s
        self._models: dict[str, OnnxModel] = {}

    def _inputs(self, model: OnnxModel, batch: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(0)
        inputs = {}
        for tensor in model.spec.inputs:
            shape = (batch, *tensor.dims)
            if tensor.dtype == np.uint8:
                inputs[tensor.name] = rng.integers(0, 256, shape, dtype=np.uint8)
            else:
                inputs[tensor.name] = rng.random(shape).astype(tensor.dtype)
        return inputs

    def seconds_per_call(self, name: str, batch: int) -> tuple[float, float]:
        """(wall, CPU) seconds of one onnxruntime call of model `name` on `batch` images."""
        if name not in self._models:
            spec = self.specs[name]
            self._models[name] = OnnxModel(spec, spec.latest_version, self.settings)
        model = self._models[name]
        inputs = self._inputs(model, batch)
        model.run(inputs)  # warm-up
        calls, start, cpu_start = 0, time.perf_counter(), time.process_time()
        while calls < 3 or time.perf_counter() - start < self.budget_s:
            model.run(inputs)
            calls += 1
        return (time.perf_counter() - start) / calls, (time.process_time() - cpu_start) / calls

    def measure(self, batches: dict[str, dict[int, int]]) -> tuple[float, float]:
        """(images per second, CPU ms per image) of onnxruntime on the same batches, the
        models of an ensemble one after another."""
        wall = cpu = 0.0
        for name, counts in batches.items():
            for size, count in counts.items():
                call_wall, call_cpu = self.seconds_per_call(name, size)
                wall += count * call_wall
                cpu += count * call_cpu
        first = next(iter(batches.values()))
        images = sum(size * count for size, count in first.items())
        return (images / wall, 1000 * cpu / images) if images else (0.0, 0.0)


# --------------------------------------------------------------------------- main
def onnx_models_of(repository: Path, model: str) -> list[str]:
    """The ONNX models that execute when `model` is asked (itself, or an ensemble's steps)."""
    return [spec.name for spec in load_order(scan_repository(repository), [model]) if not spec.is_ensemble]


def measure(args, batching: bool, timer: InProcessTimer, workdir: Path) -> list[Measurement]:
    """perf_analyzer runs against one server; right after each (the server idle), onnxruntime
    in process on the batches that run formed, so that both see the same machine load."""
    mode = "on" if batching else "off"
    flags = [*args.server_flag, "--dynamic-batching" if batching else "--no-dynamic-batching"]
    flags += [part for model in args.model for part in ("--model", model)]
    server = ServerProcess(our_server_command(args.model_repository, flags), workdir / f"server-batching-{mode}.log")
    results = []
    try:
        for model in args.model:
            onnx_models = onnx_models_of(args.model_repository, model)
            for concurrency in [c for c in args.concurrency for _ in range(args.repeat)]:
                before = server.snapshot()
                perf = run_perf_analyzer(args.perf_analyzer, server.address, model, concurrency, workdir,
                                         measurement_ms=args.measurement_ms, stability=args.stability)
                after = server.snapshot()
                batches = {name: dict(sorted((after.batches[name] - before.batches.get(name, Counter())).items()))
                           for name in onnx_models}
                inferences = after.inferences[model] - before.inferences.get(model, 0)
                throughput, p50, p99 = perf.throughput, perf.p50_ms, perf.p99_ms
                result = Measurement(model, mode, concurrency, throughput, p50, p99, perf.stable, batches,
                                     server_cpu_ms=1000 * (after.cpu_s - before.cpu_s) / max(inferences, 1))
                result.in_process, result.in_process_cpu_ms = timer.measure(batches)
                results.append(result)
                print(f"  {model:<20} batching {mode:<3} concurrency {concurrency:>3}: {throughput:9.1f} infer/s  "
                      f"p50 {p50:7.2f} ms  p99 {p99:7.2f} ms  mean batch {result.mean_batch():5.2f}  "
                      f"in-process {result.in_process:9.1f} infer/s  ratio {result.ratio:.2f}  "
                      f"CPU ratio {result.cpu_ratio:.2f}", flush=True)
    finally:
        server.stop()
    return results


def print_table(results: list[Measurement]) -> None:
    header = (f"{'model':<16} {'batching':>8} {'conc':>4} {'server inf/s':>12} {'p50 ms':>8} {'p99 ms':>8} "
              f"{'mean batch':>10} {'in-process inf/s':>16} {'ratio':>6} {'server CPU ms/inf':>17} "
              f"{'in-proc CPU ms/inf':>18} {'CPU ratio':>9}")
    print("\n" + header + "\n" + "-" * len(header))
    for r in results:
        throughput = f"{r.throughput:.1f}" + ("" if r.stable else "~")
        print(f"{r.model:<16} {r.batching:>8} {r.concurrency:>4} {throughput:>12} {r.p50_ms:>8.2f} "
              f"{r.p99_ms:>8.2f} {r.mean_batch():>10.2f} {r.in_process:>16.1f} {r.ratio:>6.2f} "
              f"{r.server_cpu_ms:>17.2f} {r.in_process_cpu_ms:>18.2f} {r.cpu_ratio:>9.2f}")
    print("ratio = server inf/s / in-process inf/s (wall clock, measured back to back); "
          "CPU ratio = in-process CPU / server CPU per inference; ~ = perf_analyzer could not stabilize")
    groups: dict[tuple, list[Measurement]] = {}
    for r in results:
        groups.setdefault((r.model, r.concurrency, r.batching), []).append(r)
    if any(len(group) > 1 for group in groups.values()):
        print("\nmedians over repeats:")
        for (model, concurrency, mode), group in groups.items():
            print(f"  {model:<16} batching {mode:<3} concurrency {concurrency:>3}: "
                  f"{np.median([r.throughput for r in group]):9.1f} infer/s, "
                  f"ratio {np.median([r.ratio for r in group]):.2f}, "
                  f"CPU ratio {np.median([r.cpu_ratio for r in group]):.2f}")
    for (model, concurrency, mode), group in groups.items():
        other = groups.get((model, concurrency, "off"))
        if mode == "on" and other:
            on, off = np.median([r.throughput for r in group]), np.median([r.throughput for r in other])
            print(f"\n{model} at concurrency {concurrency}: {on:.1f} requests/s with dynamic batching, "
                  f"{off:.1f} without ({on / off:.2f}x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-repository", type=Path, default=ROOT / "model_repository")
    parser.add_argument("--model", action="append", required=True, help="model to measure (repeatable)")
    parser.add_argument("--concurrency", default="1,4,16", help="comma-separated concurrency levels")
    parser.add_argument("--batching", choices=("on", "off", "both"), default="on",
                        help="dynamic batching in the server; 'both' measures with and without")
    parser.add_argument("--repeat", type=int, default=1,
                        help="measure every point this many times (a noisy machine: read the medians)")
    parser.add_argument("--measurement-ms", type=int, default=4000, help="perf_analyzer measurement window")
    parser.add_argument("--stability", type=int, default=50, help="perf_analyzer stability percentage")
    parser.add_argument("--intra-op-threads", type=int, default=0,
                        help="onnxruntime threads, for the server and the in-process baseline alike")
    parser.add_argument("--spinning", action="store_true", help="onnxruntime busy-waiting in the server")
    parser.add_argument("--baseline-spinning", action=argparse.BooleanOptionalAction, default=True,
                        help="onnxruntime busy-waiting in the in-process baseline (default: on, the fastest)")
    parser.add_argument("--server-flag", action="append", default=[],
                        help="extra flag for the server (repeatable), e.g. --server-flag=--max-queue-delay-us=500")
    parser.add_argument("--in-process-budget-s", type=float, default=0.4,
                        help="in-process timing budget per model and batch size")
    parser.add_argument("--perf-analyzer", type=Path, default=DEFAULT_PERF_ANALYZER)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    args.server_flag = [*args.server_flag, "--intra-op-threads", str(args.intra_op_threads),
                        "--spinning" if args.spinning else "--no-spinning"]
    if not os.access(args.perf_analyzer, os.X_OK):
        raise SystemExit(f"no perf_analyzer at {args.perf_analyzer}; run ../shared/tools/install-perf-analyzer")

    timer = InProcessTimer(args.model_repository,
                           SessionSettings("auto", args.intra_op_threads, 0, args.baseline_spinning),
                           args.in_process_budget_s)
    with tempfile.TemporaryDirectory(prefix="perf-server-") as tmp:
        workdir = Path(tmp)
        results = []
        for batching in {"on": [True], "off": [False], "both": [True, False]}[args.batching]:
            print(f"server with dynamic batching {'on' if batching else 'off'}: {args.model_repository} "
                  f"(onnxruntime intra-op threads {args.intra_op_threads or 'default'}, "
                  f"spinning {'on' if args.spinning else 'off'}; in process: spinning "
                  f"{'on' if args.baseline_spinning else 'off'})", flush=True)
            results += measure(args, batching, timer, workdir)
    print_table(results)
    if args.json:
        rows = [{**asdict(r), "ratio": r.ratio, "cpu_ratio": r.cpu_ratio} for r in results]
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
