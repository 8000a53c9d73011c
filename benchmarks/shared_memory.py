"""System shared memory against the socket, on our server and on NVIDIA Triton: perf_analyzer
`--shared-memory system` and `none` on a model with a large input, at concurrency 1 and 16.

    python benchmarks/shared_memory.py --workdir /tmp/shm-bench --json shm.json
    python benchmarks/shared_memory.py --write-model-only --workdir /tmp/shm-bench   # just the repository

The model (`conv_pool`, written here with onnx.helper) takes INPUT0 FP32 [-1, 3, 224, 224]
(588 KiB per image) through one 3x3 convolution (3 -> 8 channels, stride 4), a ReLU and a
global average pool, and answers OUTPUT0 FP32 [-1, 8]: cheap to compute, so what is measured
is mostly how the 600 KB input reaches the server. Its config.pbtxt (max_batch_size 8,
dynamic batching) is the same file for both servers.

Each point is measured on one server while the other is idle, ours and Triton alternating,
with the same perf_analyzer options (gRPC, or HTTP with --protocol http; one random
input per request); throughput, p50
and p99 go to a markdown table (stdout) and to --json. Run it on a quiet machine, on purpose.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from perf_common import DEFAULT_PERF_ANALYZER, ROOT, ServerProcess, our_server_command, run_perf_analyzer

DEFAULT_TRITON = ROOT.parent / "shared" / "tools" / "triton" / "serve"
MODEL = "conv_pool"
CONFIG = f"""name: "{MODEL}"
platform: "onnxruntime_onnx"
max_batch_size: 8
input [ {{ name: "INPUT0" data_type: TYPE_FP32 dims: [ 3, 224, 224 ] }} ]
output [ {{ name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 8 ] }} ]
dynamic_batching {{ }}
instance_group [ {{ count: 1 kind: KIND_CPU }} ]
"""


def write_repository(root: Path) -> Path:
    """The conv_pool model and its config.pbtxt under `root`."""
    weights = np.random.default_rng(0).standard_normal((8, 3, 3, 3)).astype(np.float32) * 0.1
    nodes = [
        helper.make_node("Conv", ["INPUT0", "weights"], ["conv"], kernel_shape=[3, 3], strides=[4, 4]),
        helper.make_node("Relu", ["conv"], ["relu"]),
        helper.make_node("GlobalAveragePool", ["relu"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["OUTPUT0"], axis=1),
    ]
    graph = helper.make_graph(nodes, MODEL,
                              [helper.make_tensor_value_info("INPUT0", TensorProto.FLOAT, ["batch", 3, 224, 224])],
                              [helper.make_tensor_value_info("OUTPUT0", TensorProto.FLOAT, ["batch", 8])],
                              [numpy_helper.from_array(weights, "weights")])  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    onnx.checker.check_model(model)
    (root / MODEL / "1").mkdir(parents=True, exist_ok=True)
    onnx.save(model, root / MODEL / "1" / "model.onnx")
    (root / MODEL / "config.pbtxt").write_text(CONFIG)
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=None, help="where the repository, logs and reports go")
    parser.add_argument("--perf-analyzer", type=Path, default=DEFAULT_PERF_ANALYZER)
    parser.add_argument("--triton", type=Path, default=DEFAULT_TRITON, help="Triton's serve script")
    parser.add_argument("--concurrency", default="1,16", help="comma-separated concurrency levels")
    parser.add_argument("--measurement-ms", type=int, default=5000, help="perf_analyzer's measurement window")
    parser.add_argument("--protocol", choices=("grpc", "http"), default="grpc", help="perf_analyzer's -i")
    parser.add_argument("--server-flag", action="append", default=[], help="an extra flag for our server")
    parser.add_argument("--json", type=Path, default=None, help="write the points here")
    parser.add_argument("--write-model-only", action="store_true", help="write the repository and stop")
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="shm-bench-"))
    repository = write_repository(workdir / "model_repository")
    if args.write_model_only:
        print(repository)
        return
    servers = {"ours": ServerProcess(our_server_command(repository, args.server_flag), workdir / "ours.log"),
               "triton": ServerProcess([str(args.triton), str(repository), "{grpc}", "{http}", "{metrics}"],
                                       workdir / "triton.log")}  # fmt: skip
    points = []
    try:
        for concurrency in [int(level) for level in args.concurrency.split(",")]:
            for memory in ("none", "system"):
                for name, server in servers.items():
                    extra = ["--shared-memory", memory]
                    if memory == "system":
                        extra += ["--output-shared-memory-size", "1024"]
                    address = server.address if args.protocol == "grpc" else server.http_address
                    result = run_perf_analyzer(args.perf_analyzer, address, MODEL, concurrency, workdir,
                                               measurement_ms=args.measurement_ms, protocol=args.protocol,
                                               extra=extra)  # fmt: skip
                    points.append({"server": name, "protocol": args.protocol, "shared_memory": memory,
                                   "concurrency": concurrency,
                                   "throughput": result.throughput, "p50_ms": result.p50_ms, "p99_ms": result.p99_ms,
                                   "stable": result.stable})  # fmt: skip
                    print(f"{name:6} shm {memory:6} c={concurrency:<3} {result.throughput:8.1f} req/s  "
                          f"p50 {result.p50_ms:6.2f} ms  p99 {result.p99_ms:6.2f} ms", flush=True)
    finally:
        for server in servers.values():
            server.stop()
    print("\n| server | shared memory | concurrency | req/s | p50 ms | p99 ms |\n|---|---|---|---|---|---|")
    for point in points:
        print(f"| {point['server']} | {point['shared_memory']} | {point['concurrency']} | {point['throughput']:.1f} "
              f"| {point['p50_ms']:.2f} | {point['p99_ms']:.2f} |")
    if args.json:
        args.json.write_text(json.dumps(points, indent=2))


if __name__ == "__main__":
    main()
