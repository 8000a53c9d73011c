"""An image model as the client sees it (client.transport.ImageModel), for the client's unit tests."""

from __future__ import annotations

from client.transport import ImageModel, TensorSpec

MNIST_MODEL = ImageModel(
    name="mnist",
    version="",
    platform="ensemble",
    image_input=TensorSpec("images", "UINT8", (-1, 28, 28, 1)),
    probabilities_output=TensorSpec("probabilities", "FP32", (-1, 10)),
)
