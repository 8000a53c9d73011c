"""Drive model control with tritonclient.grpc or tritonclient.http, unmodified, and print
what it answered as JSON.

    python tests/tritonclient_scripts/model_control.py [--protocol http] --url 127.0.0.1:8001 \
        --model tiny-m0 --ensemble tiny --onnx repository/tiny-m0/1/model.onnx

Runs in its own process (tritonclient's protobuf symbols clash with ours). Every call's
answer or error is recorded, in order; the test asserts on the JSON:
get_model_repository_index, load_model (plain, with config=, with files=),
is_model_ready, unload_model (with and without unload_dependents). Where the two clients'
APIs differ (as_json, the config and index wrappers) the answers are made alike here.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import tritonclient.grpc
import tritonclient.http
from tritonclient.utils import InferenceServerException

JSON = {"as_json": True}  # tritonclient.grpc answers protobuf unless asked; http answers JSON


def attempt(call, *args, **kwargs) -> dict:
    try:
        return {"ok": True, "answer": call(*args, **kwargs)}
    except InferenceServerException as error:
        return {"ok": False, "status": error.status(), "message": error.message()}


def index(client) -> dict:
    answer = attempt(client.get_model_repository_index, **JSON)
    if isinstance(answer.get("answer"), list):  # HTTP answers the bare list, gRPC {"models": [...]}
        answer["answer"] = {"models": answer["answer"]}
    return answer


def model_config(client, model: str) -> dict:
    config = client.get_model_config(model, **JSON)
    return config.get("config", config)  # gRPC wraps it in ModelConfigResponse


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--model", required=True, help="an ONNX model of the repository")
    parser.add_argument("--ensemble", required=True, help="an ensemble that uses --model")
    parser.add_argument("--onnx", required=True, help="a model.onnx to send with load_model(files=...) "
                        "(from a model folder holding labels.txt)")
    parser.add_argument("--protocol", choices=("grpc", "http"), default="grpc")
    args = parser.parse_args()
    global JSON
    triton = tritonclient.http if args.protocol == "http" else tritonclient.grpc
    if args.protocol == "http":
        JSON = {}
    client = triton.InferenceServerClient(args.url)
    report = {"index_before": index(client),
              "load": attempt(client.load_model, args.model),
              "load_ensemble": attempt(client.load_model, args.ensemble),
              "ready_after_load": client.is_model_ready(args.model)}
    # The config it serves (in mode none: the start-up one), with another version_policy.
    config = model_config(client, args.model)
    config["version_policy"] = {"all": {}}
    labels = (Path(args.onnx).parents[1] / "labels.txt").read_bytes()  # files= replace the whole folder
    report["load_with_config"] = attempt(client.load_model, args.model, config=json.dumps(config))
    report["config_after_load"] = model_config(client, args.model)
    report["load_with_files"] = attempt(client.load_model, args.model, config=json.dumps(config),
                                        files={"file:5/model.onnx": Path(args.onnx).read_bytes(),
                                               "file:labels.txt": labels})
    report["versions_after_files"] = client.get_model_metadata(args.model, **JSON)["versions"]
    report["unload"] = attempt(client.unload_model, args.model)
    report["ensemble_ready_after_member_unload"] = client.is_model_ready(args.ensemble)
    report["index_after_unload"] = index(client)
    report["load_again"] = attempt(client.load_model, args.model)
    report["unload_dependents"] = attempt(client.unload_model, args.model, unload_dependents=True)
    report["index_final"] = index(client)
    report["load_unknown"] = attempt(client.load_model, "no-such-model")
    print(json.dumps(report, default=str))


if __name__ == "__main__":
    main()
