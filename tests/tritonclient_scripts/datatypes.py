"""Send every datatype's sample through tritonclient, unmodified, and print what came back.

    python tests/tritonclient_scripts/datatypes.py --grpc HOST:PORT --http HOST:PORT --cases cases.json

cases.json: {"cases": {datatype: sample}, "models": {datatype: model}}, a sample being
{"raw": base64, "dtype": numpy dtype string, "shape": [...]} or, for BYTES,
{"bytes": [base64 per element], "shape": [...]}; BF16 samples are float32 values (as
tritonclient takes and gives BF16). Prints {way: {datatype: {"datatype", "shape",
"value"} or {"error"}}} for the ways grpc, http-binary and http-json, each answer's
value encoded as its sample was. Runs in its own process (tritonclient's protobuf
symbols clash with ours, see check_server.py).
"""

from __future__ import annotations

import argparse
import base64
import json

import numpy as np
import tritonclient.grpc
import tritonclient.http
from tritonclient.utils import InferenceServerException


def decode(sample: dict) -> np.ndarray:
    if "bytes" in sample:
        return np.array([base64.b64decode(item) for item in sample["bytes"]], dtype=np.object_).reshape(sample["shape"])
    return np.frombuffer(base64.b64decode(sample["raw"]), dtype=sample["dtype"]).reshape(sample["shape"])


def encode(array: np.ndarray, like: dict) -> dict:
    if "bytes" in like:
        items = [item if isinstance(item, bytes) else str(item).encode("utf-8") for item in array.reshape(-1)]
        return {"bytes": [base64.b64encode(item).decode() for item in items], "shape": list(array.shape)}
    array = np.ascontiguousarray(array, dtype=like["dtype"])
    return {"raw": base64.b64encode(array.tobytes()).decode(), "dtype": array.dtype.str, "shape": list(array.shape)}


def infer(module, client, model: str, datatype: str, sample: dict, binary: bool) -> dict:
    array = decode(sample)
    tensor = module.InferInput("INPUT0", list(array.shape), datatype)
    if module is tritonclient.http:
        tensor.set_data_from_numpy(array, binary_data=binary)
        output = module.InferRequestedOutput("OUTPUT0", binary_data=binary)
    else:
        tensor.set_data_from_numpy(array)
        output = module.InferRequestedOutput("OUTPUT0")
    result = client.infer(model, [tensor], outputs=[output])
    answer = result.get_output("OUTPUT0")
    if module is tritonclient.grpc:
        answer = {"datatype": answer.datatype, "shape": list(answer.shape)}
    return {"datatype": answer["datatype"], "shape": [int(d) for d in answer["shape"]],
            "value": encode(result.as_numpy("OUTPUT0"), sample)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--grpc", required=True)
    parser.add_argument("--http", required=True)
    parser.add_argument("--cases", required=True)
    args = parser.parse_args()
    spec = json.loads(open(args.cases).read())
    ways = {"grpc": (tritonclient.grpc, tritonclient.grpc.InferenceServerClient(args.grpc), True),
            "http-binary": (tritonclient.http, tritonclient.http.InferenceServerClient(args.http), True),
            "http-json": (tritonclient.http, tritonclient.http.InferenceServerClient(args.http), False)}
    report: dict = {}
    for way, (module, client, binary) in ways.items():
        report[way] = {}
        for datatype, sample in spec["cases"].items():
            try:
                report[way][datatype] = infer(module, client, spec["models"][datatype], datatype, sample, binary)
            except InferenceServerException as error:
                report[way][datatype] = {"error": str(error)}
    print(json.dumps(report))


if __name__ == "__main__":
    main()
