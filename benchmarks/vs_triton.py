"""Our server against NVIDIA Triton on the same machine, the same repository, the same load.

    python benchmarks/vs_triton.py --model-repository model_repository \\
        --model mnist-m0 --model mnist --model cifar10-m0 --model cifar10 \\
        --concurrency 1,4,16,64 --json vs_triton.json --plot vs_triton.png
    python benchmarks/vs_triton.py ... --protocols grpc,http     # both transports, in one run
    python benchmarks/vs_triton.py ... --before-root /tmp/old    # and an older checkout, in the same run
    python benchmarks/vs_triton.py ... --server-flag=--workers=2 --before-flag=--workers=1 \
        --before-label "ensemble-serving, 1 process" --ours-label "ensemble-serving, --workers 2"

Triton (../shared/tools/triton/serve, or --triton PATH) and ours serve the same
repository side by side, on free ports, and are measured one after the other at every
point (model, concurrency): only one of them has load at any time, and a machine whose
speed drifts during the run (shared cores do) moves both figures of a ratio alike. The
idle one uses no CPU. For every point perf_analyzer (gRPC or HTTP, one random image per request)
gives throughput, p50 and p99; the server's CPU seconds per request come from /proc (its whole process tree) over
the same run, with the request count from its ModelStatistics. Then it prints each ratio
ours / Triton, a table, and writes the JSON and the plot (req/s against concurrency).
With both protocols it also prints HTTP / gRPC on each server. `--before-root` adds a
third server, ours from another checkout (a worktree of an older commit), measured at
every point beside the other two: a before/after from one run, with its own ratio to Triton.

Run it on a quiet machine: nothing else (training, tests, another benchmark) beside it.
Run on purpose, never in CI.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from perf_common import (
    DEFAULT_PERF_ANALYZER,
    ROOT,
    ServerProcess,
    our_server_command,
    run_perf_analyzer,
    serves_http,
)

DEFAULT_TRITON = ROOT.parent / "shared" / "tools" / "triton" / "serve"
SERVERS = ("triton", "before", "ours")
LABELS = {"triton": "NVIDIA Triton 2.51", "before": "ensemble-serving, before", "ours": "ensemble-serving"}


@dataclass
class Point:
    server: str
    protocol: str
    model: str
    concurrency: int
    throughput: float
    p50_ms: float
    p99_ms: float
    cpu_ms_per_request: float
    stable: bool


def server_command(name: str, args, cwd: Path) -> list[str]:
    if name == "triton":
        return [str(args.triton), str(args.model_repository), "{grpc}", "{http}", "{metrics}"]
    http = serves_http(cwd)
    if "http" in args.protocols and not http:
        sys.exit(f"vs_triton: the server in {cwd} has no HTTP endpoint; measure it with --protocols grpc")
    return our_server_command(args.model_repository, args.server_flag if name == "ours" else args.before_flag,
                              http=http)


def start_server(name: str, args, workdir: Path) -> ServerProcess:
    cwd = {"ours": args.ours_root, "before": args.before_root or ROOT}.get(name, ROOT)
    return ServerProcess(server_command(name, args, cwd), workdir / f"{name}.log", cwd=cwd)


def measure(name: str, server: ServerProcess, protocol: str, model: str, concurrency: int, args,
            workdir: Path) -> Point:  # fmt: skip
    before = server.snapshot()
    address = server.http_address if protocol == "http" else server.address
    perf = run_perf_analyzer(args.perf_analyzer, address, model, concurrency, workdir, protocol=protocol,
                             measurement_ms=args.measurement_ms, stability=args.stability)
    after = server.snapshot()
    requests = after.inferences.get(model, 0) - before.inferences.get(model, 0)
    cpu_ms = 1000 * (after.cpu_s - before.cpu_s) / max(requests, 1)
    print(f"  {name:<6} {protocol:<4} {model:<14} c={concurrency:<3} {perf.throughput:9.1f} req/s  "
          f"p50 {perf.p50_ms:6.2f} ms  p99 {perf.p99_ms:6.2f} ms  CPU {cpu_ms:5.2f} ms/req"
          + ("" if perf.stable else "  (unstable)"), flush=True)
    return Point(name, protocol, model, concurrency, perf.throughput, perf.p50_ms, perf.p99_ms, cpu_ms, perf.stable)


def measure_all(servers: list[str], args, workdir: Path) -> list[Point]:
    running: dict[str, ServerProcess] = {}
    points = []
    try:
        for name in servers:
            print(f"{name}: serving {args.model_repository}", flush=True)
            running[name] = start_server(name, args, workdir)
        for protocol in args.protocols:
            for model in args.model:
                for concurrency in args.concurrency:
                    points += [measure(name, server, protocol, model, concurrency, args, workdir)
                               for name, server in running.items()]
    finally:
        for server in running.values():
            server.stop()
    return points


def ratios(points: list[Point]) -> list[dict]:
    by_key = {(p.server, p.protocol, p.model, p.concurrency): p for p in points}
    rows = []
    for (server, protocol, model, concurrency), ours in by_key.items():
        triton = by_key.get(("triton", protocol, model, concurrency))
        before = by_key.get(("before", protocol, model, concurrency))
        if server != "ours" or triton is None:
            continue
        if before is not None:
            before_fields = {"before_rps": before.throughput, "before_ratio": before.throughput / triton.throughput,
                           "before_p99_ms": before.p99_ms, "before_cpu_ms": before.cpu_ms_per_request}
        else:
            before_fields = {}
        rows.append({
            "protocol": protocol, "model": model, "concurrency": concurrency,
            "triton_rps": triton.throughput, "ours_rps": ours.throughput, "ratio": ours.throughput / triton.throughput,
            "triton_p50_ms": triton.p50_ms, "ours_p50_ms": ours.p50_ms,
            "triton_p99_ms": triton.p99_ms, "ours_p99_ms": ours.p99_ms,
            "triton_cpu_ms": triton.cpu_ms_per_request, "ours_cpu_ms": ours.cpu_ms_per_request, **before_fields,
        })  # fmt: skip
    return rows


def http_over_grpc(points: list[Point]) -> list[dict]:
    """Each server's HTTP throughput against its own gRPC one, point by point."""
    by_key = {(p.server, p.protocol, p.model, p.concurrency): p for p in points}
    return [{"server": server, "model": model, "concurrency": concurrency,
             "http_rps": http.throughput, "grpc_rps": by_key[server, "grpc", model, concurrency].throughput,
             "ratio": http.throughput / by_key[server, "grpc", model, concurrency].throughput}
            for (server, protocol, model, concurrency), http in by_key.items()
            if protocol == "http" and (server, "grpc", model, concurrency) in by_key]  # fmt: skip


def print_table(rows: list[dict]) -> None:
    header = (f"| {'proto':<5} | {'model':<14} | {'c':>3} | {'Triton req/s':>12} | {'ours req/s':>10} | {'ours/Triton':>11} | "
              f"{'p50 T / ours ms':>15} | {'p99 T / ours ms':>15} | {'CPU ms/req T / ours':>19} |")
    print("\n" + header)
    print("|" + "|".join("-" * (len(cell)) for cell in header.split("|")[1:-1]) + "|")
    for row in rows:
        print(f"| {row['protocol']:<5} | {row['model']:<14} | {row['concurrency']:>3} | {row['triton_rps']:>12,.0f} | {row['ours_rps']:>10,.0f} "
              f"| {row['ratio']:>11.2f} | {row['triton_p50_ms']:>6.2f} / {row['ours_p50_ms']:<6.2f} "
              f"| {row['triton_p99_ms']:>6.2f} / {row['ours_p99_ms']:<6.2f} "
              f"| {row['triton_cpu_ms']:>8.2f} / {row['ours_cpu_ms']:<8.2f} |")
    if any("before_ratio" in row for row in rows):
        print("\nThe 'before' server (--before-root / --before-flag), measured at the same points:")
        print("| proto | model          |   c | before req/s | before/Triton | after/Triton | p99 before / after ms |")
        print("|-------|----------------|-----|--------------|---------------|--------------|-----------------------|")
        for row in rows:
            if "before_ratio" in row:
                print(f"| {row['protocol']:<5} | {row['model']:<14} | {row['concurrency']:>3} | {row['before_rps']:>12,.0f} "
                      f"| {row['before_ratio']:>13.2f} | {row['ratio']:>12.2f} "
                      f"| {row['before_p99_ms']:>9.2f} / {row['ours_p99_ms']:<9.2f} |")


def print_http_over_grpc(rows: list[dict]) -> None:
    if not rows:
        return
    print("\n| server | model          |   c | HTTP req/s | gRPC req/s | HTTP/gRPC |")
    print("|--------|----------------|-----|------------|------------|-----------|")
    for row in rows:
        print(f"| {row['server']:<6} | {row['model']:<14} | {row['concurrency']:>3} | {row['http_rps']:>10,.0f} "
              f"| {row['grpc_rps']:>10,.0f} | {row['ratio']:>9.2f} |")


def plot(points: list[Point], models: list[str], path: Path, labels: dict[str, str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(models), figsize=(4 * len(models), 3.6), squeeze=False)
    for axis, model in zip(axes[0], models):
        for protocol, marker in zip(sorted({p.protocol for p in points}), ("o", "^")):
            for server, line in zip(SERVERS, ("--", ":", "-")):
                mine = sorted((p for p in points if p.model == model and p.server == server and p.protocol == protocol),
                              key=lambda p: p.concurrency)  # fmt: skip
                if not mine:
                    continue
                label = labels[server]
                axis.plot([p.concurrency for p in mine], [p.throughput for p in mine], marker + line,
                          label=f"{label} ({protocol})")
        axis.set_xscale("log", base=2)
        axis.set_title(model)
        axis.set_xlabel("concurrency (perf_analyzer)")
        axis.grid(alpha=0.3)
    axes[0][0].set_ylabel("requests / s (1 image each)")
    # One legend under the panels, so that it covers no point of any of them.
    handles, labels = axes[0][0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", ncol=len(labels), frameon=False)
    figure.tight_layout(rect=(0, 0.08, 1, 1))
    figure.savefig(path, dpi=120)
    print(f"plot: {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-repository", type=Path, required=True)
    parser.add_argument("--model", action="append", required=True, help="model to measure (repeatable)")
    parser.add_argument("--concurrency", default="1,4,16,64", help="comma-separated concurrency levels")
    parser.add_argument("--triton", type=Path, default=DEFAULT_TRITON, help="Triton's serve script")
    parser.add_argument("--servers", default="triton,ours", help="which servers to measure, in order")
    parser.add_argument("--server-flag", action="append", default=[], help="extra flag for our server (repeatable)")
    parser.add_argument("--ours-root", type=Path, default=ROOT,
                        help="checkout whose server to run (e.g. a worktree of an older commit, for a before/after)")
    parser.add_argument("--before-root", type=Path,
                        help="also measure our server from this checkout (an older commit's worktree) at every point")
    parser.add_argument("--before-flag", action="append", default=[],
                        help="extra flag for the 'before' server (repeatable); without --before-root it runs "
                             "this checkout: e.g. ours with --workers 2 against ours with one process")
    parser.add_argument("--before-label", default=LABELS["before"], help="the 'before' server's name in the plot")
    parser.add_argument("--ours-label", default=LABELS["ours"], help="our server's name in the plot")
    parser.add_argument("--protocols", default="grpc", help="comma-separated: grpc, http, or both")
    parser.add_argument("--measurement-ms", type=int, default=3000, help="perf_analyzer measurement window")
    parser.add_argument("--stability", type=int, default=20, help="perf_analyzer stability percentage")
    parser.add_argument("--perf-analyzer", type=Path, default=DEFAULT_PERF_ANALYZER)
    parser.add_argument("--json", type=Path, help="write the points and ratios here")
    parser.add_argument("--plot", type=Path, help="write req/s against concurrency here (PNG)")
    args = parser.parse_args()
    args.model_repository = args.model_repository.resolve()
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    args.protocols = args.protocols.split(",")
    servers = args.servers.split(",")
    if (args.before_root or args.before_flag) and "before" not in servers:
        servers.insert(servers.index("ours") if "ours" in servers else len(servers), "before")
    if "triton" in servers and not args.triton.exists():
        raise SystemExit(f"no Triton serve script at {args.triton}; pass --triton PATH")

    with tempfile.TemporaryDirectory(prefix="vs-triton-") as tmp:
        points = measure_all(servers, args, Path(tmp))
    rows, transports = ratios(points), http_over_grpc(points)
    print_table(rows)
    print_http_over_grpc(transports)
    if args.json:
        args.json.write_text(json.dumps({"points": [asdict(p) for p in points], "ratios": rows,
                                         "http_over_grpc": transports}, indent=2))
    if args.plot:
        plot(points, args.model, args.plot, {**LABELS, "before": args.before_label, "ours": args.ours_label})


if __name__ == "__main__":
    main()
