"""HTTP/REST wire encoding: an infer request body from numpy images, tensors out of the response.

(The gRPC twin is client/inference.py.) The images travel with Triton's binary tensor
extension: the body is a JSON header followed by the tensors' raw bytes,

    {"inputs": [{"name": "images", "datatype": "UINT8", "shape": [N, 28, 28, 1],
                 "parameters": {"binary_data_size": N * 784}}],
     "outputs": [{"name": "probabilities", "parameters": {"binary_data": true}}]}
    <N * 784 bytes of pixels, row-major>

and the `Inference-Header-Content-Length` header says where the JSON ends. Plain v2 JSON
would spell 10,000 MNIST images as some 20 MB of numbers for the server to parse; binary
they are 7.8 MB, copied as they are. The response comes back the same way: each output
with a `binary_data_size` parameter takes that many bytes, in order, from after the JSON
header; an output without it carries its values in `data` (plain v2 JSON, flat or nested).
"""

from __future__ import annotations

import json

import numpy as np

from client.transport import ClientError, ImageModel
from ensemble_serving.tensors import NUMPY_DTYPES, deserialize_bytes

HEADER_LENGTH = "Inference-Header-Content-Length"


def infer_request(model: ImageModel, images: np.ndarray, class_count: int = 0) -> tuple[bytes, memoryview]:
    """The JSON header and the pixel bytes of a request for `images` (uint8 [N, H, W, C]).

    class_count > 0 asks for the classification extension on the probabilities output:
    the server returns the top class_count classes as "score:index:label" strings.
    """
    images = np.ascontiguousarray(images, dtype=np.uint8)
    output_parameters: dict = {"binary_data": True}
    if class_count > 0:
        output_parameters["classification"] = class_count
    header = {
        "inputs": [{
            "name": model.image_input.name,
            "datatype": "UINT8",
            "shape": model.input_shape(images),
            "parameters": {"binary_data_size": images.nbytes},
        }],
        "outputs": [{"name": model.probabilities_output.name, "parameters": output_parameters}],
    }  # fmt: skip
    return json.dumps(header, separators=(",", ":")).encode(), images.reshape(-1).data


def output_array(body: bytes, header_length: int | None, name: str) -> np.ndarray:
    """The output tensor `name` of an infer response as a numpy array of its declared shape
    (BYTES -> object array of bytes). `header_length`: the Inference-Header-Content-Length
    header, None when the whole body is JSON."""
    end = len(body) if header_length is None else header_length
    try:
        response = json.loads(body[:end])
        outputs = response["outputs"]
    except (ValueError, KeyError, TypeError) as error:
        raise ClientError(f"the infer response is not v2 JSON with 'outputs' ({error})") from None
    offset = end  # the binary outputs follow the JSON header, in the order the header lists them
    for output in outputs:
        size = (output.get("parameters") or {}).get("binary_data_size")
        if output.get("name") == name:
            raw = None if size is None else body[offset : offset + int(size)]
            if raw is not None and len(raw) != int(size):
                raise ClientError(f"output {name!r}: binary_data_size {size} but only {len(raw)} bytes follow")
            return _tensor(output, raw)
        offset += int(size or 0)
    returned = ", ".join(str(o.get("name")) for o in outputs) or "none"
    raise ClientError(f"the response has no output {name!r} (returned: {returned})")


def _tensor(output: dict, raw: bytes | None) -> np.ndarray:
    """One output from its binary bytes (`raw`) or, when None, its JSON `data`."""
    name, datatype = output.get("name"), output.get("datatype")
    shape = tuple(int(d) for d in output.get("shape", ()))
    if datatype == "BYTES":
        values = _bytes_values(name, raw, output)
        flat = np.empty(len(values), dtype=object)
        flat[:] = values
    elif datatype in NUMPY_DTYPES:
        dtype = NUMPY_DTYPES[datatype]
        if raw is not None and len(raw) % dtype.itemsize:
            raise ClientError(f"output {name!r}: {len(raw)} binary bytes is not a whole number of {datatype} values")
        flat = np.frombuffer(raw, dtype=dtype) if raw is not None else np.asarray(output.get("data", []), dtype=dtype)
        flat = flat.reshape(-1)  # JSON data may be nested as the shape
    else:
        raise ClientError(f"output {name!r} has datatype {datatype}, which this client cannot read")
    if flat.size != int(np.prod(shape)):
        raise ClientError(f"output {name!r}: shape {list(shape)} but {flat.size} values in the response")
    return flat.reshape(shape)


def _bytes_values(name: str, raw: bytes | None, output: dict) -> list[bytes]:
    """BYTES in binary: length-prefixed elements; in JSON: strings (returned as UTF-8, like gRPC's)."""
    if raw is None:
        return [str(value).encode("utf-8") for value in np.asarray(output.get("data", []), dtype=object).reshape(-1)]
    try:
        return deserialize_bytes(raw)
    except ValueError as error:
        raise ClientError(f"output {name!r}: {error}") from None
