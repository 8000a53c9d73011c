"""The Muon optimizer (trainer/muon.py) and the parameter groups the trainer gives it."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from trainer.models import airbench
from trainer.muon import MuonWithSGD, orthogonalize
from trainer.optim import make_optimizer, set_lr
from trainer.recipes import get_recipe


@pytest.mark.parametrize("shape", [(64, 24, 3, 3), (256, 64, 3, 3), (16, 256)])
def test_orthogonalize_flattens_the_spectrum(shape):
    torch.manual_seed(0)
    # A badly conditioned update: singular values spread over two orders of magnitude.
    rows, cols = shape[0], int(torch.tensor(shape[1:]).prod())
    u, _ = torch.linalg.qr(torch.randn(rows, rows))
    v, _ = torch.linalg.qr(torch.randn(cols, cols))
    k = min(rows, cols)
    spectrum = torch.logspace(0, -2, k)
    update = (u[:, :k] * spectrum) @ v[:, :k].T
    singular = torch.linalg.svdvals(orthogonalize(update.reshape(shape)).reshape(rows, -1).float())
    # Three quintic Newton-Schulz steps squeeze a 100:1 spread at least fivefold, all below 1.6.
    assert singular.max() < 1.6 and singular.max() / singular.min() < 20
    assert orthogonalize(update.reshape(shape)).shape == shape


def test_sgd_groups_match_torch_sgd_exactly():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3))
    twin = copy.deepcopy(model)
    ours = MuonWithSGD([{"params": list(model.parameters()), "lr": 0.1, "weight_decay": 1e-3}], momentum=0.85)
    reference = torch.optim.SGD(twin.parameters(), lr=0.1, momentum=0.85, nesterov=True, weight_decay=1e-3)
    for step in range(5):
        x, y = torch.randn(8, 5, generator=torch.Generator().manual_seed(step)), torch.arange(8) % 3
        for net, optimizer in ((model, ours), (twin, reference)):
            optimizer.zero_grad()
            nn.functional.cross_entropy(net(x), y).backward()
            optimizer.step()
    for mine, theirs in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-7)


def test_muon_filters_keep_a_fixed_norm_and_move():
    conv = nn.Conv2d(8, 16, 3, bias=False)
    before = conv.weight.detach().clone()
    optimizer = MuonWithSGD([{"params": [conv.weight], "lr": 0.2, "momentum": 0.6, "orthogonalize": True}], momentum=0.85)
    conv(torch.randn(4, 8, 6, 6)).square().mean().backward()
    optimizer.step()
    # Rescaled to norm sqrt(16) = 4 before the step; the orthogonal step adds about 0.2 * sqrt(8 * 9)... at most.
    assert not torch.equal(conv.weight, before)
    assert abs(conv.weight.norm().item() - 4.0) < 0.2 * 1.6 * (8 * 9) ** 0.5


def test_airbench_recipe_groups_filters_shifts_head_and_whitening_bias():
    network = airbench(widths=(16, 32, 32), whiten_width=12)
    recipe = get_recipe("airbench")
    optimizer = make_optimizer(network, recipe)
    groups = {(g.get("orthogonalize", False), g.get("until_epoch")): g for g in optimizer.param_groups}
    filters = groups[(True, None)]
    assert len(filters["params"]) == 6 and all(p.ndim == 4 for p in filters["params"])  # the whitening conv is frozen
    whiten_bias = groups[(False, 3)]
    assert whiten_bias["params"] == [network.whiten.bias]
    assert whiten_bias["lr"] == pytest.approx(recipe["lr"] * recipe["norm_bias_lr_scale"])
    set_lr(optimizer, 0.5, epoch=3)  # the whitening bias stops learning after 3 epochs; the rest follow the schedule
    assert whiten_bias["lr"] == 0 and filters["lr"] == pytest.approx(recipe["muon_lr"] / 2)
