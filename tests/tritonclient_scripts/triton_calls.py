"""Make a list of tritonclient calls against a running server and print, as JSON, what
each answered or the error it raised (its message and status, as Triton's examples read
them).

    python tests/tritonclient_scripts/triton_calls.py --protocol http --url 127.0.0.1:8000 CALLS.json

CALLS.json is a list of {"call": NAME, ...}; NAME is one of
  infer            model, inputs [{name, datatype, shape, data, binary}], outputs [{name, binary}]
  get_model_metadata / get_model_config / is_model_ready   model (and version)
  load_model       model, config (a JSON string, optional), files ({path: base64}, optional)
  unload_model     model
  is_server_live
The answer of each is {"value": ...} or {"error": {"message": ..., "status": ...}}.

Runs in its own process: tritonclient registers Triton's protobuf symbols, which clash
with ours (see check_server.py).
"""

from __future__ import annotations

import argparse
import base64
import json
import sys

import numpy as np
import tritonclient.grpc
import tritonclient.http
from tritonclient.utils import InferenceServerException


def infer(triton, client, call: dict) -> dict:
    tensors = []
    for spec in call["inputs"]:
        tensor = triton.InferInput(spec["name"], spec["shape"], spec["datatype"])
        data = np.array(spec["data"], dtype=np.float64 if spec["datatype"].startswith("FP") else None)
        array = data.astype(tritonclient.utils.triton_to_np_dtype(spec["datatype"])).reshape(spec["shape"])
        if triton is tritonclient.http:
            tensor.set_data_from_numpy(array, binary_data=spec.get("binary", True))
        else:
            tensor.set_data_from_numpy(array)
        tensors.append(tensor)
    outputs = []
    for spec in call.get("outputs", []):
        if triton is tritonclient.http:
            outputs.append(triton.InferRequestedOutput(spec["name"], binary_data=spec.get("binary", True)))
        else:
            outputs.append(triton.InferRequestedOutput(spec["name"]))
    result = client.infer(call["model"], tensors, outputs=outputs or None, model_version=call.get("version", ""))
    return {spec["name"]: result.as_numpy(spec["name"]).tolist() for spec in call.get("outputs", [])}


def one_call(triton, client, call: dict):
    name = call["call"]
    as_json = {"as_json": True} if triton is tritonclient.grpc else {}
    if name == "infer":
        return infer(triton, client, call)
    if name in ("get_model_metadata", "get_model_config"):
        answer = getattr(client, name)(call["model"], call.get("version", ""), **as_json)
        return answer.get("config", answer) if name == "get_model_config" else answer
    if name == "is_model_ready":
        return client.is_model_ready(call["model"], call.get("version", ""))
    if name == "load_model":
        files = {path: base64.b64decode(data) for path, data in call.get("files", {}).items()} or None
        client.load_model(call["model"], config=call.get("config"), files=files)
        return None
    if name == "unload_model":
        client.unload_model(call["model"])
        return None
    if name == "is_server_live":
        return client.is_server_live()
    raise SystemExit(f"unknown call {name!r}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--protocol", choices=["grpc", "http"], default="grpc")
    parser.add_argument("--url", required=True)
    parser.add_argument("calls", help="a JSON file: the list of calls")
    args = parser.parse_args()
    triton = tritonclient.grpc if args.protocol == "grpc" else tritonclient.http
    client = triton.InferenceServerClient(args.url)
    with open(args.calls, encoding="utf-8") as file:
        calls = json.load(file)
    answers = []
    for call in calls:
        try:
            answers.append({"value": one_call(triton, client, call)})
        except InferenceServerException as error:
            answers.append({"error": {"message": error.message(), "status": str(error.status())}})
    json.dump(answers, sys.stdout)  # NaN and Infinity as Python writes them; json.loads reads them back


if __name__ == "__main__":
    main()
