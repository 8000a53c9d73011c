"""What each extra ensemble member buys, as served: accuracy and serving cost against size.

    python benchmarks/ensemble_curve.py runs/gpu/cifar10-airbench-s{0,1,2,3,4} --dataset cifar10 \\
        --data-dir ../shared/data --work outputs/curve \\
        --json docs/results/cifar10-ensemble-curve.json --plot docs/results/cifar10-ensemble-curve.png

For k = 1..N it exports the first k run dirs as one ensemble twice, with uniform weights
and with `--weights fit` (the members' validation split), into one model repository;
serves it with our server; scores every ensemble with `client evaluate` on the whole test
set; and measures requests per second at concurrency 16 with perf_analyzer (one image per
request). With --student RUN_DIR (a `trainer distill` run), the student is exported,
scored and measured the same way, in the same run, as one more point at one member's cost.
Run it on a quiet machine, never in CI.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from perf_common import DEFAULT_PERF_ANALYZER, ROOT, ServerProcess, our_server_command, run_perf_analyzer


def export(run_dirs: list[Path], repository: Path, name: str, weights: str, data_dir: Path) -> None:
    command = [sys.executable, "-m", "exporter", "to-onnx", *map(str, run_dirs), "--repository", str(repository),
               "--name", name, "--data-dir", str(data_dir), "--overwrite"]  # fmt: skip
    if len(run_dirs) > 1:
        command += ["--weights", weights]
    subprocess.run(command, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)


def served_accuracy(address: str, model: str, dataset: str, data_dir: Path, out: Path) -> float:
    subprocess.run([sys.executable, "-m", "client", "evaluate", "--url", address, "--model", model, "--dataset", dataset,
                    "--data-dir", str(data_dir), "--no-download", "--out", str(out)],
                   cwd=ROOT, check=True, stdout=subprocess.DEVNULL)  # fmt: skip
    return json.loads((out / "report.json").read_text())["accuracy"]


def fitted_weights(repository: Path, name: str) -> list[float] | None:
    path = repository / f"{name}-average" / "weights.json"
    return json.loads(path.read_text()).get("weights") if path.exists() else None


def plot(rows: list[dict], path: Path, dataset: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, accuracy_axis = plt.subplots(figsize=(7, 4.2))
    for weights, style in (("uniform", "o-"), ("fit", "s--")):
        points = [(r["members"], 100 * r["accuracy"]) for r in rows if r["weights"] == weights]
        accuracy_axis.plot(*zip(*points), style, label=f"served accuracy, {weights} weights")
    students = [(r["members"], 100 * r["accuracy"]) for r in rows if r["weights"] == "distilled"]
    if students:
        accuracy_axis.plot(*zip(*students), "*", markersize=13, label="distilled student (one net)")
    accuracy_axis.set_xlabel("ensemble members")
    accuracy_axis.set_ylabel("test accuracy (%)")
    accuracy_axis.set_xticks(sorted({r["members"] for r in rows}))
    cost_axis = accuracy_axis.twinx()
    points = [(r["members"], r["req_per_s_c16"]) for r in rows if r["weights"] == "uniform"]
    cost_axis.plot(*zip(*points), "^:", color="grey", label="req/s at c=16 (right)")
    cost_axis.set_ylabel("requests / s at concurrency 16")
    lines = accuracy_axis.get_legend_handles_labels()[0] + cost_axis.get_legend_handles_labels()[0]
    accuracy_axis.legend(lines, [line.get_label() for line in lines], loc="center right", fontsize=8)
    accuracy_axis.set_title(f"{dataset}: accuracy and serving cost against ensemble size (as served)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", nargs="+", type=Path)
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--work", type=Path, default=None, help="Repository and reports [a temporary folder].")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--plot", type=Path, default=None)
    parser.add_argument("--student", type=Path, default=None, help="A `trainer distill` run dir to add.")
    parser.add_argument("--perf-analyzer", type=Path, default=DEFAULT_PERF_ANALYZER)
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="ensemble-curve-"))
    repository = work / "repository"
    names = []
    for k in range(1, len(args.run_dirs) + 1):
        for weights in ("uniform", "fit") if k > 1 else ("uniform",):
            name = f"{args.dataset}-k{k}-{weights}"
            print(f"exporting {name}", flush=True)
            export(args.run_dirs[:k], repository, name, weights, args.data_dir)
            names.append((k, weights, name))
    if args.student:
        name = f"{args.dataset}-student"
        print(f"exporting {name}", flush=True)
        export([args.student], repository, name, "uniform", args.data_dir)
        names.append((1, "distilled", name))
    server = ServerProcess(our_server_command(repository, http=False), work / "server.log")
    rows = []
    try:
        for k, weights, name in names:
            accuracy = served_accuracy(server.address, name, args.dataset, args.data_dir, work / "evaluate" / name)
            perf = run_perf_analyzer(args.perf_analyzer, server.address, name, 16, work)
            rows.append({"members": k, "weights": weights, "model": name, "accuracy": accuracy,
                         "fitted_weights": fitted_weights(repository, name) if weights == "fit" else None,
                         "req_per_s_c16": perf.throughput, "p50_ms_c16": perf.p50_ms})  # fmt: skip
            print(f"{name:28s} accuracy {accuracy:.2%}  {perf.throughput:7.1f} req/s at c=16", flush=True)
    finally:
        server.stop()
    print("\n| members | weights | served accuracy | req/s at c=16 |\n| --- | --- | --- | --- |")
    for row in rows:
        print(f"| {row['members']} | {row['weights']} | {row['accuracy']:.2%} | {row['req_per_s_c16']:.0f} |")
    if args.json:
        args.json.write_text(json.dumps({"run_dirs": [str(p) for p in args.run_dirs], "rows": rows}, indent=2) + "\n")
    if args.plot:
        plot(rows, args.plot, args.dataset)


if __name__ == "__main__":
    main()
