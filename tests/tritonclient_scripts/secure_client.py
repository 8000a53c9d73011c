"""Talk to a TLS / mutual-TLS / token-protected server with tritonclient.grpc; print JSON.

    python tests/tritonclient_scripts/secure_client.py --url 127.0.0.1:8001 --model tiny \
        [--ca ca.crt] [--cert client.crt --key client.key] [--token TOKEN]

Runs in its own process (tritonclient and our protocol modules cannot share one: team
brief). Prints {"ready": bool, "probabilities": [[...]]} or {"error": "<status>: <message>"}.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--shape", required=True, help="H,W,C of one image")
    parser.add_argument("--ca")
    parser.add_argument("--cert")
    parser.add_argument("--key")
    parser.add_argument("--token")
    args = parser.parse_args()

    client = triton.InferenceServerClient(
        args.url, ssl=bool(args.ca), root_certificates=args.ca, private_key=args.key, certificate_chain=args.cert
    )
    headers = {"authorization": f"Bearer {args.token}"} if args.token else None
    images = np.arange(2 * np.prod([int(d) for d in args.shape.split(",")]), dtype=np.int64) % 251
    images = images.astype(np.uint8).reshape(2, *[int(d) for d in args.shape.split(",")])
    try:
        ready = client.is_server_ready(headers=headers)
        tensor = triton.InferInput("images", list(images.shape), "UINT8")
        tensor.set_data_from_numpy(images)
        result = client.infer(args.model, [tensor], headers=headers)
        print(json.dumps({"ready": ready, "images": images.tolist(),
                          "probabilities": result.as_numpy("probabilities").tolist()}))
    except InferenceServerException as error:
        print(json.dumps({"error": f"{error.status()}: {error.message()}"}))


if __name__ == "__main__":
    main()
