"""The module the exporter turns into ONNX: raw uint8 images in, probabilities out.

ServingModel wraps a trained network with everything between the wire and the network
(scaling, normalization, layout change) and after it (test-time augmentation, softmax),
so the exported graph does exactly what the trainer measured (docs/design.md §3).
"""

from __future__ import annotations

import torch
from torch import nn

from trainer.recipes import TTA_MODES

__all__ = ["TTA_MODES", "ServingModel", "serving_model_from"]


class ServingModel(nn.Module):
    """uint8 images [N, H, W, C] -> float32 probabilities [N, num_classes].

    Scaling, normalization, layout change, the network, optional test-time
    augmentation and softmax, all in ops that ONNX exports (Cast, Transpose, Mul/Add,
    Pad, Slice, Concat, Reshape, ReduceSum, Softmax), so the exported graph does
    exactly what the trainer measured. Test-time augmentation averages logits over views:
      "hflip":            the image and its mirror, 1/2 each;
      "hflip_translate":  those two (1/4 each) plus both, shifted one pixel up-left and
                          one pixel down-right with mirrored borders (1/8 each).
    """

    def __init__(self, network: nn.Module, mean: list[float], std: list[float], tta: str = "none"):
        super().__init__()
        if tta not in TTA_MODES:
            raise ValueError(f"unknown test-time augmentation {tta!r}: expected one of {', '.join(TTA_MODES)}")
        self.network = network
        self.tta = tta
        channels = len(mean)
        # Folded into one multiply-add: (x / 255 - mean) / std == x * scale + shift.
        std_t, mean_t = torch.tensor(std, dtype=torch.float32), torch.tensor(mean, dtype=torch.float32)
        self.register_buffer("scale", (1 / (255 * std_t)).view(1, channels, 1, 1), persistent=False)
        self.register_buffer("shift", (-mean_t / std_t).view(1, channels, 1, 1), persistent=False)
        view_weights = {"none": [1.0], "hflip": [0.5, 0.5], "hflip_translate": [0.25, 0.25] + [0.125] * 4}[tta]
        self.register_buffer("view_weights", torch.tensor(view_weights).view(-1, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.permute(0, 3, 1, 2).to(torch.float32) * self.scale + self.shift
        if self.tta == "none":
            return torch.softmax(self.network(x), dim=1)
        views = [x, torch.flip(x, dims=[3])]
        if self.tta == "hflip_translate":
            padded = torch.nn.functional.pad(x, (1, 1, 1, 1), mode="reflect")
            for shifted in (padded[:, :, :-2, :-2], padded[:, :, 2:, 2:]):
                views += [shifted, torch.flip(shifted, dims=[3])]
        logits = self.network(torch.cat(views, dim=0))
        logits = logits.reshape(len(views), x.shape[0], logits.shape[-1])
        return torch.softmax((logits * self.view_weights).sum(dim=0), dim=1)


def serving_model_from(network: nn.Module, config: dict) -> ServingModel:
    """The network wrapped with the preprocessing and test-time augmentation its config.json names."""
    norm = config["normalization"]
    return ServingModel(network, norm["mean"], norm["std"], tta=config["serving"]["tta"])
