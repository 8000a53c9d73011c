"""HTTP/REST requests as the tests send them: plain http.client, nothing of ours, so that
what is tested is the wire format and not a client library."""

from __future__ import annotations

import http.client
import json
import ssl
from dataclasses import dataclass

import numpy as np

HEADER_LENGTH = "Inference-Header-Content-Length"


@dataclass
class Answer:
    status: int
    headers: dict[str, str]  # lower-case names
    body: bytes

    def json(self):
        length = self.headers.get(HEADER_LENGTH.lower())
        return json.loads(self.body[: int(length)] if length else self.body)

    @property
    def error(self) -> str:
        return self.json()["error"]

    def output(self, index: int = 0) -> np.ndarray:
        """Output `index` as numpy, from JSON `data` or from the binary part of the body."""
        header = self.json()
        tensor = header["outputs"][index]
        if "data" in tensor:
            return np.array(tensor["data"], dtype=np.float32).reshape(tensor["shape"])
        offset = int(self.headers[HEADER_LENGTH.lower()])
        for previous in header["outputs"][:index]:
            offset += previous.get("parameters", {}).get("binary_data_size", 0)
        size = tensor["parameters"]["binary_data_size"]
        return np.frombuffer(self.body[offset:offset + size], dtype="<f4").reshape(tensor["shape"])


def call(port: int, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
         timeout: float = 30, tls: ssl.SSLContext | None = None) -> Answer:  # fmt: skip
    """One request on a fresh connection; HTTPS when `tls` is given."""
    if tls is None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    else:
        connection = http.client.HTTPSConnection("localhost", port, timeout=timeout, context=tls)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return Answer(response.status, {k.lower(): v for k, v in response.getheaders()}, response.read())
    finally:
        connection.close()


def binary_infer_body(images: np.ndarray, binary_output: bool = True, request_id: str = "",
                      outputs: list[dict] | None = None) -> tuple[bytes, dict]:  # fmt: skip
    """An infer body with `images` (UINT8 NHWC) in Triton's binary extension, and its headers."""
    raw = images.tobytes()
    header = {"inputs": [{"name": "images", "datatype": "UINT8", "shape": list(images.shape),
                          "parameters": {"binary_data_size": len(raw)}}],
              "parameters": {"binary_data_output": binary_output}}
    if request_id:
        header["id"] = request_id
    if outputs is not None:
        header["outputs"] = outputs
    text = json.dumps(header).encode()
    return text + raw, {HEADER_LENGTH: str(len(text)), "Content-Type": "application/octet-stream"}


def json_infer_body(images: np.ndarray, nested: bool = False) -> bytes:
    data = images.tolist() if nested else images.reshape(-1).tolist()
    return json.dumps({"inputs": [{"name": "images", "datatype": "UINT8", "shape": list(images.shape),
                                   "data": data}]}).encode()


def infer(port: int, model: str, images: np.ndarray, binary: bool = True, version: str = "",
          tls: ssl.SSLContext | None = None, headers: dict | None = None) -> Answer:  # fmt: skip
    body, body_headers = binary_infer_body(images) if binary else (json_infer_body(images), {})
    path = f"/v2/models/{model}" + (f"/versions/{version}" if version else "") + "/infer"
    return call(port, "POST", path, body, {**body_headers, **(headers or {})}, tls=tls)


def tls_context(ca, cert=None, key=None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(ca))
    if cert is not None:
        context.load_cert_chain(str(cert), str(key))
    return context
