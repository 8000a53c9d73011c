"""System shared memory as a Triton user drives it: tritonclient.utils.shared_memory makes
the regions, tritonclient.grpc / .http registers them and infers through them. Prints
JSON: {protocol: {what was seen}}.

    python tests/tritonclient_scripts/shared_memory.py --grpc HOST:PORT --http HOST:PORT --fp32 MODEL --bytes MODEL

Runs in its own process (tritonclient's protobuf symbols clash with ours, see check_server.py).
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
import tritonclient.grpc
import tritonclient.http
import tritonclient.utils.shared_memory as shm
from tritonclient.utils import InferenceServerException, serialize_byte_tensor, serialized_byte_size

BYTES_VALUES = np.array([[b"a\x00b", b""], ["\u00e9".encode(), b"\x00"]], dtype=np.object_)


def region_names(status) -> list[str]:
    if isinstance(status, list):  # http: a list of regions
        return sorted(region["name"] for region in status)
    return sorted(status.regions)  # grpc: the protobuf message


def infer(module, client, model: str, datatype: str, shape: list[int], in_size: int, out_size: int):
    tensor = module.InferInput("INPUT0", shape, datatype)
    tensor.set_shared_memory("input", in_size)
    output = module.InferRequestedOutput("OUTPUT0")
    output.set_shared_memory("output", out_size, offset=64)
    return client.infer(model, [tensor], outputs=[output])


def run(module, url: str, fp32: str, bytes_model: str) -> dict:
    client = module.InferenceServerClient(url)
    client.unregister_system_shared_memory()
    suffix = f"{os.getpid()}-{module.__name__.rsplit('.', 1)[-1]}"
    in_handle = shm.create_shared_memory_region("input", f"/es-in-{suffix}", 1024)
    out_handle = shm.create_shared_memory_region("output", f"/es-out-{suffix}", 1024)
    report: dict = {}
    try:
        client.register_system_shared_memory("input", f"/es-in-{suffix}", 1024)
        client.register_system_shared_memory("output", f"/es-out-{suffix}", 1024)
        report["status_names"] = region_names(client.get_system_shared_memory_status())

        values = np.arange(8, dtype=np.float32).reshape(4, 2) * 0.5
        shm.set_shared_memory_region(in_handle, [values])
        infer(module, client, fp32, "FP32", [4, 2], values.nbytes, values.nbytes)
        report["fp32_input"] = values.tolist()
        report["fp32_output"] = shm.get_contents_as_numpy(out_handle, np.float32, [4, 2], offset=64).tolist()

        serialized = serialize_byte_tensor(BYTES_VALUES)
        shm.set_shared_memory_region(in_handle, [serialized])
        infer(module, client, bytes_model, "BYTES", [2, 2], serialized_byte_size(serialized), 512)
        got = shm.get_contents_as_numpy(out_handle, np.object_, [2, 2], offset=64)
        report["bytes_input"] = [item.hex() for item in BYTES_VALUES.reshape(-1)]
        report["bytes_output"] = [bytes(item).hex() for item in got.reshape(-1)]

        try:
            client.register_system_shared_memory("input", f"/es-in-{suffix}", 1024)
        except InferenceServerException as error:
            report["duplicate_error"] = str(error)
        tensor = module.InferInput("INPUT0", [4, 2], "FP32")
        tensor.set_shared_memory("gone", 32)
        try:
            client.infer(fp32, [tensor])
        except InferenceServerException as error:
            report["unknown_region_error"] = str(error)
    finally:
        client.unregister_system_shared_memory()
        report["status_after_unregister"] = region_names(client.get_system_shared_memory_status())
        shm.destroy_shared_memory_region(in_handle)
        shm.destroy_shared_memory_region(out_handle)
    return report


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--grpc", required=True)
    parser.add_argument("--http", required=True)
    parser.add_argument("--fp32", required=True)
    parser.add_argument("--bytes", required=True)
    args = parser.parse_args()
    print(json.dumps({"grpc": run(tritonclient.grpc, args.grpc, args.fp32, args.bytes),
                      "http": run(tritonclient.http, args.http, args.fp32, args.bytes)}))


if __name__ == "__main__":
    main()
