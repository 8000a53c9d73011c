"""Muon for conv filters, Nesterov SGD for everything else, in one optimizer.

Muon (Keller Jordan, 2024; the optimizer of airbench94_muon) replaces each conv filter
bank's momentum update by its nearest semi-orthogonal matrix, so every direction of the
filter bank learns at the same rate instead of the few with large gradients. Its filters
are also rescaled to a fixed norm before each step: BatchNorm follows every conv, so only
their direction matters, and a fixed norm keeps the step size meaningful.

One optimizer object (not two) keeps the trainer's checkpoint, resume and lr-schedule
code unchanged: groups marked `orthogonalize=True` get Muon, the others plain SGD with
Nesterov momentum and coupled weight decay, exactly as torch.optim.SGD computes it.
"""

from __future__ import annotations

import math

import torch

# Quintic Newton-Schulz coefficients chosen for the steepest slope at zero (from Muon):
# three iterations push all singular values of a normalized matrix into roughly [0.5, 1.5].
_NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def orthogonalize(update: torch.Tensor, steps: int = 3) -> torch.Tensor:
    """Approximately U V^T of update (viewed as [out_channels, everything else]) = U S V^T."""
    a, b, c = _NS_COEFFICIENTS
    x = update.reshape(len(update), -1).to(torch.bfloat16)  # low precision is enough: only the direction counts
    x = x / (x.norm() + 1e-7)  # largest singular value <= 1, where the iteration converges
    wide = x.shape[0] <= x.shape[1]
    if not wide:
        x = x.T
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    if not wide:
        x = x.T
    return x.reshape(update.shape).to(update.dtype)


class MuonWithSGD(torch.optim.Optimizer):
    """Each param group: lr, momentum, weight_decay, and orthogonalize (True = Muon)."""

    def __init__(self, groups: list[dict], momentum: float):
        super().__init__(groups, {"lr": 0.0, "momentum": momentum, "weight_decay": 0.0, "orthogonalize": False})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            momentum = group["momentum"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                grad = param.grad
                if group["weight_decay"]:
                    grad = grad.add(param, alpha=group["weight_decay"])
                buffer = self.state[param].setdefault("momentum_buffer", torch.zeros_like(grad))
                buffer.mul_(momentum).add_(grad)
                update = grad.add(buffer, alpha=momentum)  # Nesterov
                if group["orthogonalize"]:
                    param.mul_(math.sqrt(len(param)) / (param.norm() + 1e-12))
                    update = orthogonalize(update)
                param.add_(update, alpha=-group["lr"])
