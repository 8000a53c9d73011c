"""Config auto-complete side by side with NVIDIA Triton: the same repository of config-less
and partial-config ONNX models served by both; each model's completed ModelConfig (the
fields auto-complete fills) and its answer to the same request, compared.

    python benchmarks/autocomplete_vs_triton.py --json autocomplete_vs_triton.json
    python benchmarks/autocomplete_vs_triton.py --keep-repository /tmp/auto_repo   # to look at it after

The repository (built here with onnx.helper): an FP32 Add with a dynamic batch dimension
and no config; an INT32 Add with a fixed first dimension and no config (no batching); a
partial config (name, backend, max_batch_size 8) on an FP32 Sub; FP16, BOOL and BYTES
identities without config. Both servers get free ports; Triton runs through
../shared/tools/triton/serve (or --triton). Everything goes over HTTP with binary tensors,
so the answers compare bit for bit. Exits 1 when a model's completed config differs, or our
answer is wrong: an identity's must be what was sent (Triton's onnxruntime backend cuts a
BYTES element at its first NUL, so its answer to "a\\0b" is "a"), any other model's Triton's.

Starts NVIDIA Triton: run it on purpose, not in CI.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TRITON = ROOT.parent / "shared" / "tools" / "triton" / "serve"
HEADER_LENGTH = "Inference-Header-Content-Length"
FIELDS = ("platform", "backend", "max_batch_size", "dynamic_batching", "input", "output")


def _graph(op: str, element_type: int, shape: list, inputs: int) -> onnx.GraphProto:
    names = [f"INPUT{index}" for index in range(inputs)]
    return helper.make_graph(
        [helper.make_node(op, names, ["OUTPUT0"])], op.lower(),
        [helper.make_tensor_value_info(name, element_type, shape) for name in names],
        [helper.make_tensor_value_info("OUTPUT0", element_type, shape)],
    )


# name: (graph, config.pbtxt or None, the request's [(datatype, numpy array)] per input)
def models(rng: np.random.Generator) -> dict:
    def floats(shape, dtype=np.float32):
        return rng.normal(size=shape).astype(dtype)

    return {
        "auto_add_fp32": (_graph("Add", TensorProto.FLOAT, ["batch", 16], 2), None,
                          [("FP32", floats((3, 16))), ("FP32", floats((3, 16)))]),
        "auto_add_int32_fixed": (_graph("Add", TensorProto.INT32, [1, 16], 2), None,
                                 [("INT32", rng.integers(-99, 99, (1, 16), dtype=np.int32))] * 2),
        "partial_sub_fp32": (_graph("Sub", TensorProto.FLOAT, ["batch", 4], 2),
                             'name: "partial_sub_fp32"\nbackend: "onnxruntime"\nmax_batch_size: 8\n',
                             [("FP32", floats((2, 4))), ("FP32", floats((2, 4)))]),
        "auto_identity_fp16": (_graph("Identity", TensorProto.FLOAT16, ["batch", 8], 1), None,
                               [("FP16", floats((2, 8), np.float16))]),
        "auto_identity_bool": (_graph("Identity", TensorProto.BOOL, ["batch", 8], 1), None,
                               [("BOOL", rng.integers(0, 2, (2, 8)).astype(bool))]),
        "auto_identity_bytes": (_graph("Identity", TensorProto.STRING, ["batch", 2], 1), None,
                                [("BYTES", np.array([[b"abc", b"a\x00b"], [b"", "\u00e9".encode()]], dtype=object))]),
    }


def write_repository(root: Path, table: dict) -> None:
    for name, (graph, config, _) in table.items():
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
        (root / name / "1").mkdir(parents=True)
        onnx.save(model, root / name / "1" / "model.onnx")
        if config is not None:
            (root / name / "config.pbtxt").write_text(config)


def _raw(datatype: str, array: np.ndarray) -> bytes:
    if datatype == "BYTES":
        return b"".join(struct.pack("<I", len(item)) + item for item in array.reshape(-1))
    return array.tobytes()


def _from_raw(datatype: str, raw: bytes, shape: list[int]):
    if datatype == "BYTES":
        items, offset = [], 0
        while offset < len(raw):
            (length,) = struct.unpack_from("<I", raw, offset)
            items.append(raw[offset + 4:offset + 4 + length].hex())
            offset += 4 + length
        return items
    dtypes = {"FP32": "<f4", "FP16": "<f2", "INT32": "<i4", "BOOL": "?"}
    return np.frombuffer(raw, dtype=dtypes[datatype]).reshape(shape).tolist()


def http(url: str, method: str = "GET", body: bytes | None = None, headers: dict | None = None):
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status, dict(answer.headers), answer.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()
    except OSError:
        return 0, {}, b""


def infer(base: str, name: str, inputs: list) -> dict:
    header = {"inputs": [], "outputs": [{"name": "OUTPUT0", "parameters": {"binary_data": True}}]}
    blobs = []
    for index, (datatype, array) in enumerate(inputs):
        raw = _raw(datatype, array)
        header["inputs"].append({"name": f"INPUT{index}", "datatype": datatype, "shape": list(array.shape),
                                 "parameters": {"binary_data_size": len(raw)}})
        blobs.append(raw)
    text = json.dumps(header).encode()
    status, headers, body = http(f"{base}/v2/models/{name}/infer", "POST", text + b"".join(blobs),
                                 {HEADER_LENGTH: str(len(text)), "Content-Type": "application/octet-stream"})
    if status != 200:
        return {"error": f"{status}: {body[:300].decode(errors='replace')}"}
    length = int({key.lower(): value for key, value in headers.items()}[HEADER_LENGTH.lower()])
    output = json.loads(body[:length])["outputs"][0]
    return {"datatype": output["datatype"], "shape": output["shape"],
            "data": _from_raw(output["datatype"], body[length:], output["shape"])}


def completed(config: dict) -> dict:
    """The fields auto-complete fills, comparable across the two servers."""
    def tensors(entries):
        # Sorted by name: Triton lists a graph's tensors in the order of its own map, not the graph's.
        return sorted((entry["name"], entry["data_type"], [int(dim) for dim in entry.get("dims", [])])
                      for entry in entries)  # fmt: skip

    return {"platform": config.get("platform", ""), "backend": config.get("backend", ""),
            "max_batch_size": int(config.get("max_batch_size", 0)), "dynamic_batching": "dynamic_batching" in config,
            "input": tensors(config.get("input", [])), "output": tensors(config.get("output", []))}


class Server:
    def __init__(self, command: list[str], log: Path, http_port: int):
        self.base = f"http://127.0.0.1:{http_port}"
        self.log = log
        self.process = subprocess.Popen(command, cwd=ROOT, stdout=open(log, "wb"), stderr=subprocess.STDOUT,
                                        start_new_session=True)

    def wait(self, names: list[str], timeout: float) -> None:
        """Until every model is ready, the server exits, or `timeout` passes (a model that fails is reported)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.process.poll() is None:
            if all(http(f"{self.base}/v2/models/{name}/ready")[0] == 200 for name in names):
                return
            time.sleep(0.5)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--triton", type=Path, default=DEFAULT_TRITON, help="Triton's serve script")
    parser.add_argument("--json", type=Path, help="write the comparison here")
    parser.add_argument("--keep-repository", type=Path, help="build the repository here and keep it")
    parser.add_argument("--timeout", type=float, default=300, help="seconds to wait for the models to load")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="autocomplete-vs-triton-"))
    repository = args.keep_repository or workdir / "repository"
    table = models(np.random.default_rng(0))
    if repository.exists():
        shutil.rmtree(repository)
    repository.mkdir(parents=True)
    write_repository(repository, table)
    ports = {name: [free_port() for _ in range(3)] for name in ("ours", "triton")}
    commands = {
        "ours": [sys.executable, "-m", "server", "--model-repository", str(repository), "--host", "127.0.0.1",
                 "--grpc-port", str(ports["ours"][0]), "--http-port", str(ports["ours"][1]),
                 "--metrics-port", str(ports["ours"][2])],
        "triton": [str(args.triton), str(repository), *map(str, ports["triton"])],
    }
    servers = {name: Server(command, workdir / f"{name}.log", ports[name][1]) for name, command in commands.items()}
    report, differs = {}, False
    try:
        for server in servers.values():
            server.wait(list(table), args.timeout)
        for name, (_, _, inputs) in table.items():
            entry = report[name] = {}
            for label, server in servers.items():
                status, _, body = http(f"{server.base}/v2/models/{name}/config")
                entry[label] = {"config": completed(json.loads(body)) if status == 200 else
                                f"{status}: {body[:300].decode(errors='replace')}",
                                "answer": infer(server.base, name, inputs)}
            entry["same_config"] = entry["ours"]["config"] == entry["triton"]["config"]
            answers = [entry[label]["answer"] for label in servers]
            entry["same_answer"] = answers[0] == answers[1] and not any("error" in answer for answer in answers)
            if name.startswith("auto_identity"):  # an identity's answer is right when it is what was sent
                sent = _from_raw(inputs[0][0], _raw(*inputs[0]), list(inputs[0][1].shape))
                for label in servers:
                    entry[label]["answer_is_input"] = entry[label]["answer"].get("data") == sent
                ours_right = entry["ours"]["answer_is_input"]
            else:
                ours_right = entry["same_answer"]
            differs |= not (entry["same_config"] and ours_right)
    finally:
        for server in servers.values():
            server.stop()
    for name, entry in report.items():
        print(f"\n== {name}: config {'same' if entry['same_config'] else 'DIFFERS'}, "
              f"answer {'same' if entry['same_answer'] else 'DIFFERS'}")
        for label in ("ours", "triton"):
            config = entry[label]["config"]
            shown = config if isinstance(config, str) else {field: config[field] for field in FIELDS}
            print(f"  {label:6} {json.dumps(shown)}")
            if not entry["same_answer"]:
                right = {True: " (what was sent)", False: " (NOT what was sent)"}.get(entry[label].get("answer_is_input"), "")
                print(f"  {label:6} answer{right} {json.dumps(entry[label]['answer'])[:300]}")
    print(f"\nlogs: {workdir}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    sys.exit(1 if differs else 0)


if __name__ == "__main__":
    main()
