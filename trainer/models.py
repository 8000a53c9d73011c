"""The networks. Each takes a normalized float batch [N, C, H, W] and returns logits.

Four architectures, registered by name in ARCHITECTURES:
  lenet       LeNet-5 shape (two 5x5 conv + pool stages, two FC layers), with BatchNorm.
  mnist_cnn   a stronger VGG-style MNIST net: 3 stages of double 3x3 convs, BatchNorm, dropout.
  cifar_cnn   the classic small CIFAR net: 3 stages of double 3x3 convs with BatchNorm, FC head.
  airbench    a fast modern CIFAR net after Keller Jordan's airbench: a whitening 2x2
              conv, then three conv-pool-BN-GELU blocks, about 2M parameters.

Everything here must export to ONNX: plain Conv/BN/pool/GELU/Linear, no data-dependent
control flow.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn


def conv_bn_act(cin: int, cout: int, kernel: int = 3, act: type[nn.Module] = nn.ReLU) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False), nn.BatchNorm2d(cout), act()]


class LeNet(nn.Module):
    """LeNet-5's layout (conv5-pool-conv5-pool-fc-fc), widened a little and with BatchNorm."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, image_size: int = 28,
                 widths: tuple[int, int] = (16, 32), hidden: int = 128, dropout: float = 0.25):  # fmt: skip
        super().__init__()
        c1, c2 = widths
        self.features = nn.Sequential(
            *conv_bn_act(in_channels, c1, kernel=5), nn.MaxPool2d(2),
            *conv_bn_act(c1, c2, kernel=5), nn.MaxPool2d(2),
        )  # fmt: skip
        flat = c2 * (image_size // 4) ** 2
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Dropout(dropout), nn.Linear(flat, hidden), nn.ReLU(),
            nn.Dropout(dropout), nn.Linear(hidden, num_classes),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class VGGStyleNet(nn.Module):
    """Stages of two 3x3 conv-BN-ReLU then 2x2 max-pool; global pooling or flatten, FC head.

    With MNIST widths it is `mnist_cnn`, with CIFAR widths `cifar_cnn`.
    """

    def __init__(self, in_channels: int, num_classes: int, image_size: int, widths: tuple[int, ...],
                 hidden: int, dropout: float):  # fmt: skip
        super().__init__()
        layers: list[nn.Module] = []
        cin = in_channels
        for width in widths:
            layers += [*conv_bn_act(cin, width), *conv_bn_act(width, width), nn.MaxPool2d(2)]
            cin = width
        self.features = nn.Sequential(*layers)
        flat = cin * (image_size // 2 ** len(widths)) ** 2
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Dropout(dropout), nn.Linear(flat, hidden, bias=False), nn.BatchNorm1d(hidden),
            nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, num_classes),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def mnist_cnn(in_channels: int = 1, num_classes: int = 10, image_size: int = 28,
              widths: tuple[int, ...] = (32, 64, 128), hidden: int = 256, dropout: float = 0.3) -> nn.Module:  # fmt: skip
    return VGGStyleNet(in_channels, num_classes, image_size, tuple(widths), hidden, dropout)


def cifar_cnn(in_channels: int = 3, num_classes: int = 10, image_size: int = 32,
              widths: tuple[int, ...] = (32, 64, 128), hidden: int = 256, dropout: float = 0.3) -> nn.Module:  # fmt: skip
    return VGGStyleNet(in_channels, num_classes, image_size, tuple(widths), hidden, dropout)


# --------------------------------------------------------------------------- airbench-style


class FrozenScaleBatchNorm(nn.BatchNorm2d):
    """BatchNorm whose scale stays 1: only the shift learns (airbench's choice).

    A fast-moving running average (momentum 0.4) suits a run of a few hundred steps.
    """

    def __init__(self, channels: int, momentum: float = 0.4, eps: float = 1e-12):
        super().__init__(channels, momentum=momentum, eps=eps)
        self.weight.requires_grad_(False)


class ConvBlock(nn.Module):
    """conv3x3 -> max-pool 2 -> BN -> GELU -> conv3x3 -> BN -> GELU."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.pool = nn.MaxPool2d(2)
        self.norm1 = FrozenScaleBatchNorm(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.norm2 = FrozenScaleBatchNorm(cout)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.norm1(self.pool(self.conv1(x))))
        return self.act(self.norm2(self.conv2(x)))

    @torch.no_grad()
    def init_partial_identity(self) -> None:
        """Start each conv close to passing its input through (dirac init on the first filters).

        A known trick for short schedules: the net trains as if shallower at first.
        """
        for conv in (self.conv1, self.conv2):
            cin = conv.in_channels
            nn.init.dirac_(conv.weight[:cin])


class AirbenchNet(nn.Module):
    """Whitening conv (2x2, no padding) + GELU, three ConvBlocks, global max-pool, linear / scale.

    The first conv's filters are set from the eigenvectors of the training images' 2x2
    patch covariance (see init_whitening): the net starts on decorrelated inputs.
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 10, image_size: int = 32,
                 widths: tuple[int, int, int] = (64, 256, 256), whiten_width: int = 24,
                 logit_scale: float = 1 / 9):  # fmt: skip
        super().__init__()
        self.whiten = nn.Conv2d(in_channels, whiten_width, 2, padding=0, bias=True)
        self.whiten.weight.requires_grad_(False)  # fixed by init_whitening; only its bias learns
        self.act = nn.GELU()
        blocks, cin = [], whiten_width
        for width in widths:
            blocks.append(ConvBlock(cin, width))
            cin = width
        self.blocks = nn.Sequential(*blocks)
        final_size = (image_size - 1) // 8  # 31 -> 15 -> 7 -> 3
        self.pool = nn.MaxPool2d(final_size)
        self.head = nn.Linear(cin, num_classes, bias=False)
        self.logit_scale = logit_scale
        for block in self.blocks:
            block.init_partial_identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.act(self.whiten(x)))
        return self.head(self.pool(x).flatten(1)) * self.logit_scale

    @torch.no_grad()
    def init_whitening(self, images: torch.Tensor, eps: float = 5e-4) -> None:
        """Set the 2x2 filters to +/- the scaled eigenvectors of the patch covariance.

        `images` are normalized float [N, C, H, W] training images (a few thousand suffice).
        Half the filters are the negatives of the other half, so a following GELU keeps
        both signs of each whitened component.
        """
        kernel = self.whiten.kernel_size[0]
        half = self.whiten.out_channels // 2
        patches = images.float().unfold(2, kernel, 1).unfold(3, kernel, 1)  # N, C, H', W', k, k
        patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, images.shape[1] * kernel * kernel)
        patches = patches - patches.mean(dim=0)
        covariance = patches.T @ patches / len(patches)
        eigenvalues, eigenvectors = torch.linalg.eigh(covariance)  # ascending
        if half > len(eigenvalues):
            raise ValueError(f"whiten_width {2 * half} needs at most {2 * len(eigenvalues)} filters")
        eigenvalues, eigenvectors = eigenvalues.flip(0)[:half], eigenvectors.T.flip(0)[:half]
        filters = eigenvectors / torch.sqrt(eigenvalues + eps)[:, None]
        filters = filters.reshape(half, images.shape[1], kernel, kernel)
        self.whiten.weight.copy_(torch.cat([filters, -filters]))
        self.whiten.bias.zero_()


def airbench(in_channels: int = 3, num_classes: int = 10, image_size: int = 32,
             widths: tuple[int, int, int] = (64, 256, 256), whiten_width: int = 24) -> nn.Module:  # fmt: skip
    return AirbenchNet(in_channels, num_classes, image_size, tuple(widths), whiten_width)


# --------------------------------------------------------------------------- registry

ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {
    "lenet": LeNet,
    "mnist_cnn": mnist_cnn,
    "cifar_cnn": cifar_cnn,
    "airbench": airbench,
}


def build_model(architecture: str, in_channels: int, num_classes: int, image_size: int, **arch_args) -> nn.Module:
    if architecture not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {architecture!r}: expected one of {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[architecture](
        in_channels=in_channels, num_classes=num_classes, image_size=image_size, **arch_args
    )


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
