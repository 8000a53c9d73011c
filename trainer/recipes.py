"""Hyperparameter presets, one dict per architecture (the airbench habit: a whole recipe
readable in one place). Command-line options override single entries.

Learning rates are for the mean cross-entropy over a batch and the batch size given;
weight decay is PyTorch's coupled form (added to the gradient, so each step shrinks
weights by lr * weight_decay). The airbench_sgd numbers are Keller Jordan's published
airbench94 settings (lr 11.5 and decoupled decay 0.0153 per 1024 examples, momentum
0.85, on a summed loss) rewritten in those terms: lr = 11.5 / (1 + 1 / (1 - 0.85)) = 1.5
and weight_decay = 0.0153 / 11.5 = 1.33e-3. The airbench recipe is airbench94_muon's,
rewritten the same way (see its comment).
Choose changes on the validation split (--val-fraction), never on the test set.
"""

from __future__ import annotations

import copy
import math

from trainer.errors import TrainerError

# The values a recipe entry (and its command-line option) may take. train.py validates
# against these and cli.py offers them as choices; this module needs no torch, so
# `trainer --help` stays fast.
OPTIMIZERS = ("sgd", "muon", "adam", "adamw")
SCHEDULES = ("onecycle", "cosine", "step", "constant")
FLIPS = ("none", "random", "alternating")
TTA_MODES = ("none", "hflip", "hflip_translate")  # test-time augmentation inside the served graph
PRECISIONS = ("auto", "fp32", "bf16", "fp16")  # autocast, chosen per run rather than per recipe

RECIPES: dict[str, dict] = {
    # LeNet-style on MNIST: a few epochs of SGD reach >= 99.3% in well under two minutes.
    "lenet": {
        "dataset": "mnist",
        "arch_args": {"widths": [16, 32], "hidden": 128, "dropout": 0.25},
        "epochs": 8,
        "batch_size": 256,
        "optimizer": "sgd",
        "lr": 0.2,
        "momentum": 0.9,
        "nesterov": True,
        "weight_decay": 5e-4,
        "label_smoothing": 0.1,
        "schedule": "onecycle",
        "warmup": 0.15,  # fraction of all steps spent warming up
        "lr_start_factor": 0.1,
        "lr_end_factor": 0.01,
        "augmentation": {"translate": 2, "pad_mode": "constant", "flip": "none", "cutout": 0},
        "tta": "none",  # digits are not mirror-symmetric
    },
    # Stronger MNIST CNN: VGG-style double convs, BatchNorm, dropout; >= 99.5%.
    "mnist_cnn": {
        "dataset": "mnist",
        "arch_args": {"widths": [32, 64, 128], "hidden": 256, "dropout": 0.3},
        "epochs": 12,
        "batch_size": 256,
        "optimizer": "sgd",
        "lr": 0.2,
        "momentum": 0.9,
        "nesterov": True,
        "weight_decay": 5e-4,
        "label_smoothing": 0.1,
        "schedule": "onecycle",
        "warmup": 0.15,
        "lr_start_factor": 0.1,
        "lr_end_factor": 0.01,
        "augmentation": {"translate": 2, "pad_mode": "constant", "flip": "none", "cutout": 0},
        "tta": "none",
    },
    # The classic small CIFAR-10 CNN (three conv stages, FC head).
    "cifar_cnn": {
        "dataset": "cifar10",
        "arch_args": {"widths": [32, 64, 128], "hidden": 256, "dropout": 0.3},
        "epochs": 20,
        "batch_size": 256,
        "optimizer": "sgd",
        "lr": 0.2,
        "momentum": 0.9,
        "nesterov": True,
        "weight_decay": 5e-4,
        "label_smoothing": 0.1,
        "schedule": "onecycle",
        "warmup": 0.15,
        "lr_start_factor": 0.1,
        "lr_end_factor": 0.01,
        "augmentation": {"translate": 4, "pad_mode": "reflect", "flip": "random", "cutout": 8},
        "tta": "hflip",
    },
    # Airbench-style fast CIFAR-10 net trained as airbench94_muon: Muon on the conv filters,
    # Nesterov SGD on the head and on BatchNorm/whitening shifts (64x lr), lr decaying linearly
    # to 0, label smoothing, alternating flips. The airbench94_muon values (summed loss, batch
    # 2000: head lr 0.67 on a unit-std head scaled by 1/256, bias lr 0.053, decay 2e-6 per
    # example) rewritten for this net's mean loss and 1/9-scaled default-init head give, at
    # batch 2000, lr = 0.67 * 2000 * 81 / 256**2 = 1.66 and weight_decay = 0.004 / 1.66.
    # Here at batch 1000: lr halved (linear), muon_lr / sqrt(2) (Muon's steps have a fixed size).
    # Chosen on the validation split (45k/5k), 12 epochs each: val 90.82% at batch 1000, 90.66%
    # at 500, 90.62% at 2000, 89.54% for the SGD recipe in 10. Batch 1000 runs ~12% faster per
    # image than 2000 on CPU, so 12 epochs fit 25 minutes on the 2-core machine. More epochs do
    # not pay on the JPEG copy: 24 gave 91.29% test against 91.31% for 12. Wider stages help a
    # little at a high price: --widths 128,384,384 (airbench95's) gave 91.65% in 10 epochs, 46 min;
    # in the 5 epochs that fit 25 minutes, val 90.40% against this recipe's 90.82%.
    "airbench": {
        "dataset": "cifar10",
        "arch_args": {"widths": [64, 256, 256], "whiten_width": 24},
        "epochs": 12,
        "batch_size": 1000,
        "optimizer": "muon",
        "muon_lr": 0.17,
        "muon_momentum": 0.6,
        "lr": 0.83,
        "momentum": 0.85,
        "nesterov": True,
        "weight_decay": 2.4e-3,
        "norm_bias_lr_scale": 64.0,
        "whiten_bias_epochs": 3,
        "label_smoothing": 0.2,
        "schedule": "onecycle",
        "warmup": 0.0,
        "lr_end_factor": 0.0,
        "lookahead": False,
        "augmentation": {"translate": 2, "pad_mode": "reflect", "flip": "alternating", "cutout": 0},
        "tta": "hflip",
        "eval_batch_size": 500,
    },
    # The same net trained as airbench94 (SGD): high nesterov lr on a short triangle,
    # 64x lr on BatchNorm shifts, lookahead. 90.50% in 10 epochs on the JPEG copy.
    "airbench_sgd": {
        "architecture": "airbench",
        "dataset": "cifar10",
        "arch_args": {"widths": [64, 256, 256], "whiten_width": 24},
        "epochs": 10,
        "batch_size": 1024,
        "optimizer": "sgd",
        "lr": 1.5,
        "momentum": 0.85,
        "nesterov": True,
        "weight_decay": 1.33e-3,
        "norm_bias_lr_scale": 64.0,  # BN shifts learn 64x faster (their decay is scaled down to match)
        "label_smoothing": 0.2,
        "schedule": "onecycle",
        "warmup": 0.23,
        "lr_start_factor": 0.2,
        "lr_end_factor": 0.07,
        "lookahead": True,
        "augmentation": {"translate": 2, "pad_mode": "reflect", "flip": "alternating", "cutout": 0},
        "tta": "hflip",
        "eval_batch_size": 500,
    },
}

# What `trainer tune` searches, per recipe (trainer/search_space.py reads these). Each entry:
# ("log", low, high) a float on a log scale, ("float", low, high), ("int", low, high), or
# ("choice", [values]). Ranges bracket the recipe's own value (so the recipe is a point of
# the space) by roughly 5x for rates and decays; widths are offered as whole stage lists.
# A user narrows or fixes any entry with `trainer tune --space NAME=...`.
_CNN_SPACE = {
    "lr": ("log", 0.02, 1.0),
    "weight_decay": ("log", 1e-5, 5e-3),
    "batch_size": ("choice", [64, 128, 256, 512]),
    "label_smoothing": ("float", 0.0, 0.25),
    "dropout": ("float", 0.0, 0.5),
    "warmup": ("float", 0.0, 0.3),
    "schedule": ("choice", ["onecycle", "cosine"]),
}
_AIRBENCH_SPACE = {
    "lr": ("log", 0.2, 3.0),
    "weight_decay": ("log", 5e-4, 1e-2),
    "batch_size": ("choice", [500, 1000, 2000]),
    "label_smoothing": ("float", 0.0, 0.3),
    "warmup": ("float", 0.0, 0.25),
    "schedule": ("choice", ["onecycle", "cosine"]),
    "widths": ("choice", [[48, 192, 192], [64, 256, 256], [96, 320, 320]]),
}
SEARCH_SPACES: dict[str, dict] = {
    "lenet": {**_CNN_SPACE, "widths": ("choice", [[8, 16], [16, 32], [32, 64]]), "hidden": ("choice", [64, 128, 256])},
    "mnist_cnn": {**_CNN_SPACE, "widths": ("choice", [[16, 32, 64], [32, 64, 128]])},
    "cifar_cnn": {**_CNN_SPACE, "widths": ("choice", [[32, 64, 128], [64, 128, 256]])},
    # Muon's step length is its own rate; lr is the SGD rate of the head and the shifts.
    "airbench": {**_AIRBENCH_SPACE, "muon_lr": ("log", 0.05, 0.5)},
    "airbench_sgd": {**_AIRBENCH_SPACE, "momentum": ("float", 0.7, 0.95)},
}

# Entries every recipe inherits unless it sets them.
DEFAULTS: dict = {
    "optimizer": "sgd",
    "momentum": 0.9,
    "nesterov": True,
    "weight_decay": 0.0,
    "norm_bias_lr_scale": 1.0,
    "label_smoothing": 0.0,
    "schedule": "onecycle",
    "warmup": 0.0,
    "lr_start_factor": 0.1,
    "lr_end_factor": 0.0,
    "step_milestones": [0.5, 0.75],  # for "step": fractions of training where lr is multiplied by step_gamma
    "step_gamma": 0.1,
    "lookahead": False,
    "lookahead_every": 5,
    "lookahead_decay": 0.95**5,
    "muon_lr": 0.24,  # --optimizer muon: step length of the orthogonalized conv-filter updates
    "muon_momentum": 0.6,
    "whiten_bias_epochs": 0,  # airbench: the whitening conv's bias stops learning after this many epochs; 0 = never
    "tta": "none",  # test-time augmentation inside the served graph: none, hflip, hflip_translate
    "eval_batch_size": 1000,
}

# `trainer distill` (trainer/distill.py): the temperature and the soft-label weight.
# T = 4: a strong ensemble is near one-hot on its own training images (~100% train
# accuracy), so at T = 1 the soft labels carry little beyond the hard ones; T = 4 lifts the
# relative sizes of the wrong classes (a cat that looks a bit like a dog) into view while
# the top class keeps most of the mass. T = 3..5 is the common choice for CIFAR-10
# distillation; choose on the validation split (--val-fraction), never on the test set.
DEFAULT_TEMPERATURE = 4.0
# alpha = 0.9: mostly the teacher, whose soft labels subsume the hard ones (it is right on
# ~all training images), with a tenth of the hard-label loss to keep the student anchored
# where the teacher errs. The customary KD default for CIFAR-10.
DEFAULT_ALPHA = 0.9

ARCHITECTURES_FOR = {
    "mnist": ("lenet", "mnist_cnn"),
    "cifar10": ("cifar_cnn", "airbench", "airbench_sgd"),
}
DEFAULT_ARCHITECTURE = {"mnist": "lenet", "cifar10": "airbench"}


def architecture_of(recipe_name: str) -> str:
    """The network a recipe trains: its name, unless it is a variant (airbench_sgd -> airbench)."""
    return RECIPES[recipe_name].get("architecture", recipe_name)


def get_recipe(architecture: str) -> dict:
    """A fresh copy of the recipe's hyperparameters (defaults filled in), safe to modify."""
    if architecture not in RECIPES:
        raise KeyError(architecture)
    recipe = copy.deepcopy(DEFAULTS)
    recipe.update(copy.deepcopy(RECIPES[architecture]))
    recipe.pop("architecture", None)  # which network: architecture_of()
    return recipe


def validate(h: dict, val_fraction: float, precision: str, n_images: int, image_size: int, world_size: int) -> None:
    """Refuse settings that cannot train, with the one line that says why (h: a recipe with overrides)."""

    def need(condition: bool, message: str) -> None:
        if not condition:
            raise TrainerError(message)

    need(0 <= val_fraction < 1, f"--val-fraction must be in [0, 1), got {val_fraction}")
    n_train = n_images - int(round(n_images * val_fraction))
    need(isinstance(h["epochs"], int) and h["epochs"] >= 1, f"--epochs must be a whole number >= 1, got {h['epochs']}")
    need(h["batch_size"] >= 1, f"--batch-size must be >= 1, got {h['batch_size']}")
    need(h["batch_size"] % world_size == 0,
         f"--batch-size {h['batch_size']} must divide evenly over the {world_size} processes")  # fmt: skip
    need(h["batch_size"] <= n_train,
         f"--batch-size {h['batch_size']} is larger than the {n_train} training images")  # fmt: skip
    need(math.isfinite(h["lr"]) and h["lr"] > 0, f"--lr must be a positive number, got {h['lr']}")
    need(h["optimizer"] in OPTIMIZERS, f"--optimizer must be one of {', '.join(OPTIMIZERS)}, got {h['optimizer']!r}")
    need(h["schedule"] in SCHEDULES, f"--schedule must be one of {', '.join(SCHEDULES)}, got {h['schedule']!r}")
    need(0 <= h["momentum"] < 1, f"--momentum must be in [0, 1), got {h['momentum']}")
    need(not (h["nesterov"] and h["optimizer"] == "sgd" and h["momentum"] == 0),
         "Nesterov SGD needs --momentum > 0 (or pass --no-nesterov)")  # fmt: skip
    need(h["muon_lr"] > 0 and 0 <= h["muon_momentum"] < 1,
         f"muon_lr must be > 0 and muon_momentum in [0, 1), got {h['muon_lr']} and {h['muon_momentum']}")  # fmt: skip
    need(isinstance(h["whiten_bias_epochs"], int) and h["whiten_bias_epochs"] >= 0,
         f"whiten_bias_epochs must be a whole number >= 0, got {h['whiten_bias_epochs']}")  # fmt: skip
    need(h["weight_decay"] >= 0, f"--weight-decay must be >= 0, got {h['weight_decay']}")
    need(0 <= h["label_smoothing"] < 1, f"--label-smoothing must be in [0, 1), got {h['label_smoothing']}")
    need(0 <= h["warmup"] <= 1, f"--warmup is a fraction of training in [0, 1], got {h['warmup']}")
    need(0 < h["step_gamma"] <= 1, f"step_gamma must be in (0, 1], got {h['step_gamma']}")
    aug = h["augmentation"]
    need(0 <= aug["translate"] < image_size, f"--translate must be in [0, {image_size}), got {aug['translate']}")
    need(0 <= aug["cutout"] <= image_size, f"--cutout must be in [0, {image_size}], got {aug['cutout']}")
    need(aug["flip"] in FLIPS, f"--flip must be one of {', '.join(FLIPS)}, got {aug['flip']!r}")
    need(precision in PRECISIONS, f"--precision must be one of {', '.join(PRECISIONS)}")
    need(h["tta"] in TTA_MODES, f"--tta must be one of {', '.join(TTA_MODES)}, got {h['tta']!r}")
    need(h["eval_batch_size"] >= 1, f"eval_batch_size must be >= 1, got {h['eval_batch_size']}")
