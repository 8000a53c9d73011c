"""gRPC wire encoding: v2 ModelInfer requests from numpy images, tensors out of responses.

(The HTTP twin is client/http_inference.py.)

Images go out as one UINT8 tensor in `raw_input_contents` (row-major bytes, the
fastest encoding the protocol has). Outputs are read from `raw_output_contents`
when the server used it, else from the typed `contents` fields: both are legal v2.
"""

from __future__ import annotations

import numpy as np

from client.transport import ClientError, ImageModel
from ensemble_serving.protocol import grpc_service_pb2 as pb
from ensemble_serving.tensors import CONTENTS_FIELD, NUMPY_DTYPES, deserialize_bytes


def image_request(model: ImageModel, images: np.ndarray, class_count: int = 0) -> pb.ModelInferRequest:
    """A request carrying `images` (uint8 [N, H, W, C]; N must be 1 for a non-batching model).

    class_count > 0 asks for the classification extension on the probabilities output:
    the server returns the top class_count classes as "score:index:label" strings.
    """
    images = np.ascontiguousarray(images, dtype=np.uint8)
    requested = pb.ModelInferRequest.InferRequestedOutputTensor(name=model.probabilities_output.name)
    if class_count > 0:
        requested.parameters["classification"].int64_param = class_count
    return pb.ModelInferRequest(
        model_name=model.name,
        model_version=model.version,
        inputs=[pb.ModelInferRequest.InferInputTensor(name=model.image_input.name, datatype="UINT8",
                                                      shape=model.input_shape(images))],  # fmt: skip
        outputs=[requested],
        raw_input_contents=[images.tobytes()],
    )


def output_array(response: pb.ModelInferResponse, name: str) -> np.ndarray:
    """The output tensor `name` as a numpy array of its declared shape (BYTES -> object array)."""
    for index, output in enumerate(response.outputs):
        if output.name != name:
            continue
        shape = tuple(output.shape)
        if output.datatype == "BYTES":
            values = _bytes_values(response, index, output)
            return np.array(values, dtype=object).reshape(shape)
        if output.datatype not in NUMPY_DTYPES:
            raise ClientError(f"output {name!r} has datatype {output.datatype}, which this client cannot read")
        if index < len(response.raw_output_contents):
            flat = np.frombuffer(response.raw_output_contents[index], dtype=NUMPY_DTYPES[output.datatype])
        else:
            typed = getattr(output.contents, CONTENTS_FIELD.get(output.datatype, "fp32_contents"))
            flat = np.asarray(typed, dtype=NUMPY_DTYPES[output.datatype])
        if flat.size != int(np.prod(shape)):
            raise ClientError(f"output {name!r}: shape {list(shape)} but {flat.size} values in the response")
        return flat.reshape(shape)
    returned = ", ".join(o.name for o in response.outputs) or "none"
    raise ClientError(f"the response has no output {name!r} (returned: {returned})")


def _bytes_values(response: pb.ModelInferResponse, index: int, output) -> list[bytes]:
    """BYTES tensors: typed in contents.bytes_contents, or raw as length-prefixed elements."""
    if index >= len(response.raw_output_contents):
        return list(output.contents.bytes_contents)
    try:
        return deserialize_bytes(response.raw_output_contents[index])
    except ValueError as error:
        raise ClientError(f"output {output.name!r}: {error}") from None
