"""ModelInfer requests as the tests send them, and the probabilities read back out."""

from __future__ import annotations

import numpy as np

from ensemble_serving.protocol import grpc_service_pb2 as pb


def infer_request(model: str, images: np.ndarray, typed: bool = False, version: str = "",
                  outputs: list[pb.ModelInferRequest.InferRequestedOutputTensor] | None = None,
                  name: str = "images", datatype: str = "UINT8") -> pb.ModelInferRequest:  # fmt: skip
    request = pb.ModelInferRequest(model_name=model, model_version=version, id="request-7", outputs=outputs or [])
    tensor = request.inputs.add(name=name, datatype=datatype, shape=images.shape)
    if typed:
        tensor.contents.uint_contents.extend(images.reshape(-1).tolist())
    else:
        request.raw_input_contents.append(images.tobytes())
    return request


def probabilities(response: pb.ModelInferResponse) -> np.ndarray:
    output = response.outputs[0]
    assert output.name == "probabilities" and output.datatype == "FP32"
    return np.frombuffer(response.raw_output_contents[0], np.float32).reshape(list(output.shape))
