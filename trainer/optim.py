"""The optimizer, its learning-rate schedule and Lookahead (Muon itself is in muon.py).

Every parameter group carries a base_lr; each step, set_lr scales it by lr_factor, the
schedule's multiplier at that step, so one schedule drives SGD, Muon and Adam alike.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from trainer.muon import MuonWithSGD


def lr_factor(step: int, total_steps: int, h: dict) -> float:
    """Multiplier on the base learning rate at `step` (0-based), warmup included.

    onecycle: linear from lr_start_factor up to 1 over the warmup, then linearly down
              to lr_end_factor (the triangular schedule fast CIFAR recipes use).
    cosine:   linear warmup, then half a cosine down to lr_end_factor.
    step:     linear warmup, then x step_gamma at each of step_milestones (fractions).
    """
    warmup_steps = int(round(h["warmup"] * total_steps))
    start, end = h["lr_start_factor"], h["lr_end_factor"]
    if step < warmup_steps:
        return start + (1 - start) * step / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    schedule = h["schedule"]
    if schedule == "onecycle":
        return 1 + (end - 1) * progress
    if schedule == "cosine":
        return end + (1 - end) * 0.5 * (1 + math.cos(math.pi * progress))
    if schedule == "step":
        return h["step_gamma"] ** sum(step >= m * total_steps for m in h["step_milestones"])
    return 1.0


def make_optimizer(network: nn.Module, h: dict) -> torch.optim.Optimizer:
    """Parameter groups, each with a base_lr the schedule scales:

    - BatchNorm shifts: lr x norm_bias_lr_scale, weight decay / the same (airbench);
    - the whitening conv's bias (airbench): stops learning after whiten_bias_epochs (0 = never);
      with Muon it learns at the shifts' fast rate, as in airbench94_muon;
    - conv filters, with --optimizer muon: Muon at muon_lr (see trainer/muon.py);
    - everything else: lr and weight_decay.
    """
    muon = h["optimizer"] == "muon"
    whiten = getattr(network, "whiten", None)
    shifts, whiten_bias, filters, others = [], [], [], []
    for module in network.modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad:
                continue
            if module is whiten and name == "bias":
                whiten_bias.append(param)
            elif isinstance(module, nn.modules.batchnorm._NormBase) and name == "bias":
                shifts.append(param)
            elif muon and param.ndim == 4:
                filters.append(param)
            else:
                others.append(param)
    scale = h["norm_bias_lr_scale"]
    slow = {"base_lr": h["lr"], "weight_decay": h["weight_decay"]}
    fast = {"base_lr": h["lr"] * scale, "weight_decay": h["weight_decay"] / scale}
    groups = [{"params": others, **slow}, {"params": shifts, **fast},
              {"params": whiten_bias, **(fast if muon else slow), "until_epoch": h["whiten_bias_epochs"] or None},
              {"params": filters, "base_lr": h["muon_lr"], "momentum": h["muon_momentum"], "weight_decay": 0.0,
               "orthogonalize": True}]  # fmt: skip
    groups = [group for group in groups if group["params"]]
    for group in groups:
        group["lr"] = group["base_lr"]
    if muon:
        return MuonWithSGD(groups, momentum=h["momentum"])
    if h["optimizer"] == "sgd":
        return torch.optim.SGD(groups, lr=h["lr"], momentum=h["momentum"], nesterov=h["nesterov"])
    if h["optimizer"] == "adam":
        return torch.optim.Adam(groups, lr=h["lr"])
    return torch.optim.AdamW(groups, lr=h["lr"])


def set_lr(optimizer: torch.optim.Optimizer, factor: float, epoch: int) -> None:
    """Scale every group's base_lr by the schedule's factor; groups past their until_epoch get 0."""
    for group in optimizer.param_groups:
        until = group.get("until_epoch")
        group["lr"] = 0.0 if until is not None and epoch >= until else group["base_lr"] * factor


class Lookahead:
    """Slow weights that trail the fast ones (hlb-cifar10 / airbench style).

    Every `every` steps: slow <- slow + (1 - decay) * (fast - slow), then fast <- slow.
    The decay ramps up with training progress cubed: barely any averaging early, when
    the weights still move far, and strong averaging near the end (like weight
    averaging over the final steps). The run ends on the slow weights. Covers
    parameters and BatchNorm statistics.
    """

    def __init__(self, network: nn.Module, every: int, decay: float):
        self.every, self.decay = every, decay
        self.slow = {k: v.detach().clone() for k, v in network.state_dict().items() if v.is_floating_point()}

    @torch.no_grad()
    def step(self, network: nn.Module, global_step: int, total_steps: int) -> None:
        if global_step % self.every == 0:
            self._sync(network, self.decay * (global_step / total_steps) ** 3)

    @torch.no_grad()
    def finish(self, network: nn.Module) -> None:
        self._sync(network, 1.0)  # decay 1: the slow weights as they are become the model

    def _sync(self, network: nn.Module, decay: float) -> None:
        for name, fast in network.state_dict().items():
            if name in self.slow:
                slow = self.slow[name]
                slow.lerp_(fast, 1 - decay)
                fast.copy_(slow)
