"""Drive a running server with tritonclient.grpc or tritonclient.http and print what it
answered as JSON.

    python tests/tritonclient_scripts/check_server.py --url 127.0.0.1:8001 --model tiny --model tiny-m0
    python tests/tritonclient_scripts/check_server.py --protocol http --url 127.0.0.1:8000 --model tiny

Runs in its own process: tritonclient registers Triton's protobuf symbols, which clash
with ours (team brief). For every --model: is_model_ready, get_model_metadata,
get_model_config, infer with raw (binary) and typed (gRPC typed contents, HTTP JSON data)
tensors, classification, and get_inference_statistics; plus the server-level calls once.
The two clients answer alike except where their APIs differ (as_json, the config
wrapper); those differences are ironed out here so that the test asserts on one JSON.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import tritonclient.grpc
import tritonclient.http
from tritonclient.utils import InferenceServerException

triton = tritonclient.grpc
JSON = {"as_json": True}  # tritonclient.grpc's calls answer protobuf unless asked; http's answer JSON


def infer(client, model: str, images: np.ndarray, typed: bool, class_count: int = 0):
    tensor = triton.InferInput("images", list(images.shape), "UINT8")
    if triton is tritonclient.http:
        tensor.set_data_from_numpy(images, binary_data=not typed)
    elif typed:
        # tritonclient has no public setter for typed contents; fill the proto it sends.
        tensor._get_tensor().contents.uint_contents.extend(images.reshape(-1).tolist())
    else:
        tensor.set_data_from_numpy(images)
    output = triton.InferRequestedOutput("probabilities", class_count=class_count)
    result = client.infer(model, [tensor], outputs=[output], request_id="req-1")
    return result


def check_model(client, model: str, images: np.ndarray) -> dict:
    metadata = client.get_model_metadata(model, **JSON)
    config = client.get_model_config(model, **JSON)
    config = config.get("config", config)  # gRPC wraps it in ModelConfigResponse
    raw = infer(client, model, images, typed=False)
    typed = infer(client, model, images, typed=True)
    top = infer(client, model, images, typed=False, class_count=3)
    stats = client.get_inference_statistics(model, **JSON)
    response = raw.get_response(**JSON)
    return {
        "ready": client.is_model_ready(model),
        "metadata": metadata,
        "config": config,
        "raw_probabilities": raw.as_numpy("probabilities").tolist(),
        "typed_probabilities": typed.as_numpy("probabilities").tolist(),
        "raw_response_id": response.get("id", ""),
        "raw_response_version": response.get("model_version", ""),
        "top3": [[item.decode() for item in row] for row in top.as_numpy("probabilities")],
        "statistics": stats,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--model", action="append", required=True)
    parser.add_argument("--images", required=True, help=".npy file of uint8 images [N, H, W, C]")
    parser.add_argument("--protocol", choices=("grpc", "http"), default="grpc")
    args = parser.parse_args()
    global triton, JSON
    if args.protocol == "http":
        triton, JSON = tritonclient.http, {}
    images = np.load(args.images)
    client = triton.InferenceServerClient(args.url)
    report = {
        "live": client.is_server_live(),
        "ready": client.is_server_ready(),
        "server_metadata": client.get_server_metadata(**JSON),
        "models": {model: check_model(client, model, images) for model in args.model},
    }
    try:
        client.get_model_metadata("no-such-model")
        report["unknown_model_error"] = None
    except InferenceServerException as error:
        report["unknown_model_error"] = {"status": error.status(), "message": error.message()}
    report["unknown_model_ready"] = client.is_model_ready("no-such-model")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
