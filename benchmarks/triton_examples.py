"""Triton's own Python client examples, unmodified, against our server and against Triton.

The examples of triton-inference-server/client (src/python/examples) are what a Triton user
runs first. This script does not carry them: point --examples-dir at a checkout of that
repository's src/python/examples. It writes the stand-in repository (benchmarks/
triton_standins.py), then for each server in turn (ours: `python -m server`; Triton: the
script given by --triton, ../shared/tools/triton/serve) starts it on Triton's default ports
(8000 HTTP, 8001 gRPC, 8002 metrics: some examples cannot be pointed elsewhere) in explicit
model-control mode with every model loaded, runs every example with a timeout, and prints
one table: pass (exit status 0) or fail, and the failure's last line, per server.

    python benchmarks/triton_examples.py --examples-dir DIR [--json OUT] [--only NAME ...]

Examples that need what neither server has here are listed with the reason and not run:
CUDA shared memory (no GPU), sequence models and the decoupled `repeat_int32` (no ONNX form),
and the DALI/Python-backend preprocessing ensemble.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from perf_common import ROOT  # noqa: E402
from triton_standins import write_repository  # noqa: E402

PORTS = {"http": 8000, "grpc": 8001, "metrics": 8002}
IMAGE_ARGS = ["-m", "densenet_onnx", "-c", "3", "-s", "INCEPTION", "{image}"]
EXAMPLES: dict[str, list[str]] = {
    "grpc_client.py": [],
    "grpc_explicit_byte_content_client.py": [],
    "grpc_explicit_int8_content_client.py": [],
    "grpc_explicit_int_content_client.py": [],
    "grpc_image_client.py": IMAGE_ARGS,
    "image_client.py": IMAGE_ARGS,
    "image_client.py -i grpc": ["-i", "grpc", "-u", "localhost:8001", *IMAGE_ARGS],
    "memory_growth_test.py": ["-r", "20"],
    "memory_growth_test.py -i grpc": ["-i", "grpc", "-r", "20"],
    "reuse_infer_objects_client.py": [],
    "reuse_infer_objects_client.py -i grpc": ["-i", "grpc", "-u", "localhost:8001"],
    "simple_grpc_aio_infer_client.py": [],
    "simple_grpc_async_infer_client.py": [],
    "simple_grpc_custom_args_client.py": [],
    "simple_grpc_health_metadata.py": [],
    "simple_grpc_infer_client.py": [],
    "simple_grpc_keepalive_client.py": [],
    "simple_grpc_model_control.py": [],
    "simple_grpc_shm_client.py": [],
    "simple_grpc_shm_string_client.py": [],
    "simple_grpc_string_infer_client.py": [],
    "simple_http_aio_infer_client.py": [],
    "simple_http_async_infer_client.py": [],
    "simple_http_health_metadata.py": [],
    "simple_http_infer_client.py": [],
    "simple_http_model_control.py": [],
    "simple_http_shm_client.py": [],
    "simple_http_shm_string_client.py": [],
    "simple_http_string_infer_client.py": [],
}
NOT_RUN = {
    "simple_grpc_cudashm_client.py": "CUDA shared memory: needs a GPU",
    "simple_http_cudashm_client.py": "CUDA shared memory: needs a GPU",
    "simple_grpc_sequence_stream_infer_client.py": "a sequence model (stateful; no ONNX stand-in)",
    "simple_grpc_sequence_sync_infer_client.py": "a sequence model",
    "simple_http_sequence_sync_infer_client.py": "a sequence model",
    "simple_grpc_aio_sequence_stream_infer_client.py": "a sequence model",
    "simple_grpc_custom_repeat.py": "a decoupled model (repeat_int32: Python backend)",
    "ensemble_image_client.py": "a DALI / Python-backend image-decoding ensemble",
}
CONTROL_FLAGS = ["--model-control-mode=explicit", "--load-model=*"]


def server_commands(repository: Path, triton: Path) -> dict[str, list[str]]:
    ours = [sys.executable, "-m", "server", "--model-repository", str(repository), "--host", "127.0.0.1",
            "--grpc-port", str(PORTS["grpc"]), "--http-port", str(PORTS["http"]),
            "--metrics-port", str(PORTS["metrics"]), *CONTROL_FLAGS]
    theirs = [str(triton), str(repository), *map(str, (PORTS["grpc"], PORTS["http"], PORTS["metrics"])), "--",
              *CONTROL_FLAGS]
    return {"ours": ours, "triton": theirs}


def wait_ready(process: subprocess.Popen, log: Path, timeout: float = 300) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"server exited ({process.returncode}):\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{PORTS['http']}/v2/health/ready", timeout=1) as answer:
                if answer.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"server not ready after {timeout} s; log: {log}")


def run_example(examples_dir: Path, label: str, args: list[str], image: Path) -> dict:
    script = label.split()[0]
    command = [sys.executable, str(examples_dir / script), *[a.format(image=image) for a in args]]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=examples_dir)
    except subprocess.TimeoutExpired:
        return {"passed": False, "why": "timed out after 120 s"}
    lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    return {"passed": done.returncode == 0, "why": (lines[-1] if lines else "")[:160], "rc": done.returncode}


def reload_models(names: list[str]) -> None:
    """Loads every model again from the repository: the model-control examples unload `simple`
    and load it with a changed config, and the examples after them expect the original."""
    import urllib.request

    for model in names:
        request = urllib.request.Request(f"http://127.0.0.1:{PORTS['http']}/v2/repository/models/{model}/load",
                                         data=b"{}", method="POST", headers={"Content-Type": "application/json"})
        urllib.request.urlopen(request, timeout=60).close()


def start_server(command: list[str], log: Path) -> subprocess.Popen:
    process = subprocess.Popen(command, cwd=ROOT, stdout=open(log, "ab"), stderr=subprocess.STDOUT,
                               start_new_session=True)
    wait_ready(process, log)
    return process


def run_against(name: str, command: list[str], examples: dict[str, list[str]], examples_dir: Path,
                image: Path, work: Path, models: list[str]) -> dict[str, dict]:
    """Every example against one server; a server that dies during one is reported so and
    started again for the next."""
    log = work / f"{name}.log"
    process = start_server(command, log)
    results = {}
    try:
        for label, args in examples.items():
            results[label] = run_example(examples_dir, label, args, image)
            if process.poll() is not None:
                results[label] = {"passed": False, "why": f"the server died (exit status {process.returncode})"}
                process = start_server(command, log)
            else:
                reload_models(models)
            print(f"  {name:6s} {'pass' if results[label]['passed'] else 'FAIL'}  {label}", flush=True)
        return results
    finally:
        process.terminate()
        process.wait(timeout=60)


def print_table(results: dict[str, dict[str, dict]]) -> None:
    print("\n| example | ours | Triton 2.51 | last line when failing: ours / Triton |\n|---|---|---|---|")
    for label in results["ours"]:
        ours, theirs = results["ours"][label], results["triton"][label]
        mark = lambda r: "pass" if r["passed"] else "FAIL"  # noqa: E731
        why = " / ".join(r["why"] if not r["passed"] else "" for r in (ours, theirs)).strip(" /")
        print(f"| {label} | {mark(ours)} | {mark(theirs)} | {why} |")
    for script, why in NOT_RUN.items():
        print(f"| {script} | not run | not run | {why} |")
    for name, table in results.items():
        print(f"{name}: {sum(r['passed'] for r in table.values())} of {len(table)} pass")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples-dir", type=Path, required=True, help="triton-inference-server/client's src/python/examples")
    parser.add_argument("--triton", type=Path, default=ROOT.parent / "shared" / "tools" / "triton" / "serve")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--only", nargs="*", help="run only these examples (labels as in the table)")
    parser.add_argument("--without", nargs="*", default=(), help="leave these stand-ins out: the HTTP "
                        "model-control example wants a repository of 7 models, the gRPC one of 8")
    args = parser.parse_args()
    examples = {k: v for k, v in EXAMPLES.items() if not args.only or k in args.only}
    work = Path(tempfile.mkdtemp(prefix="triton-examples-"))
    repository = work / "models"
    models = write_repository(repository, without=tuple(args.without))
    image = work / "image.png"
    Image.new("RGB", (300, 240), (120, 80, 200)).save(image)
    results = {name: run_against(name, command, examples, args.examples_dir, image, work, models)
               for name, command in server_commands(repository, args.triton).items()}
    print_table(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    print(f"logs: {work}")


if __name__ == "__main__":
    main()
