"""The options `trainer train` and `trainer distill` share: what to train and how.

Every recipe entry (trainer/recipes.py) has an option overriding it; training_options
puts them all on a command, and cli.py passes them on to one run per seed.
"""

from __future__ import annotations

from pathlib import Path

import click

from ensemble_serving.datasets import DATA_DIR_ENV
from trainer.recipes import FLIPS, OPTIMIZERS, PRECISIONS, RECIPES, SCHEDULES, TTA_MODES


def _parse_seeds(_ctx, _param, value: str) -> list[int]:
    try:
        seeds = [int(part) for part in value.split(",") if part.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers like 0,1,2, got {value!r}") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise click.BadParameter(f"expected distinct comma-separated integers like 0,1,2, got {value!r}")
    return seeds


def _parse_widths(_ctx, _param, value: str | None) -> list[int] | None:
    if value is None:
        return None
    try:
        widths = [int(part) for part in value.split(",")]
    except ValueError:
        widths = []
    if not widths or min(widths) < 1:
        raise click.BadParameter(f"expected comma-separated positive integers like 64,256,256, got {value!r}")
    return widths


# fmt: off
_TRAINING_OPTIONS = [
    click.option("--arch", "architecture", type=click.Choice(list(RECIPES)),
                 help="Network and its recipe (airbench_sgd: the airbench net with airbench94's SGD recipe). "
                       "Default: lenet for mnist, airbench for cifar10. "
                       "mnist: lenet, mnist_cnn; cifar10: cifar_cnn, airbench, airbench_sgd."),
    click.option("--recipe-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
                 help="Start from this JSON recipe (the best_recipe.json that `trainer tune` writes) instead of "
                      "the built-in one; the flags below still override single entries."),
    click.option("--seeds", default="0", show_default=True, callback=_parse_seeds,
                 help="Comma-separated seeds; one run dir per seed (an ensemble: --seeds 0,1,2)."),
    click.option("--data-dir", type=click.Path(file_okay=False), default=None,
                 help=f"Data directory (torchvision layout). Default: ${DATA_DIR_ENV}, else ~/.cache/ensemble-serving/data."),
    click.option("--no-download", is_flag=True, help="Fail instead of downloading absent data files."),
    click.option("--output-dir", type=click.Path(file_okay=False), default="runs", show_default=True,
                 help="Where run dirs go."),
    click.option("--name", default=None,
                 help="Run name prefix; run dirs are NAME-s<seed>. Default: <dataset>-<arch> "
                      "(distill: <dataset>-<arch>-distilled)."),
    click.option("--epochs", type=int, help="Epochs (recipe default if omitted; see `trainer recipes`)."),
    click.option("--batch-size", type=int, help="Global batch size (split over processes under torchrun)."),
    click.option("--optimizer", type=click.Choice(OPTIMIZERS),
                 help="sgd (with momentum), muon (Muon on conv filters, SGD on the rest) or Adam/AdamW."),
    click.option("--lr", type=float, help="Peak learning rate (mean loss, this batch size)."),
    click.option("--muon-lr", type=float, help="With --optimizer muon: step length of the orthogonalized filter updates."),
    click.option("--momentum", type=float, help="SGD momentum."),
    click.option("--nesterov/--no-nesterov", default=None, help="Nesterov momentum for SGD."),
    click.option("--weight-decay", type=float, help="L2 weight decay (decoupled for AdamW)."),
    click.option("--label-smoothing", type=float, help="Cross-entropy label smoothing in [0, 1)."),
    click.option("--schedule", type=click.Choice(SCHEDULES),
                 help="LR schedule after warmup: onecycle (linear up/down), cosine, step (x0.1 at 50%, 75%)."),
    click.option("--warmup", type=float, help="Warmup length as a fraction of all steps."),
    click.option("--translate", type=int, help="Augmentation: random shift of up to N pixels (0 = off)."),
    click.option("--flip", type=click.Choice(FLIPS), help="Augmentation: horizontal flips."),
    click.option("--cutout", type=int, help="Augmentation: zero a random NxN square (0 = off)."),
    click.option("--widths", callback=_parse_widths,
                 help="Channel widths of the network's conv stages, comma-separated (airbench: 64,256,256; "
                       "airbench95's wider net: 128,384,384). Same count as the recipe's."),
    click.option("--lookahead/--no-lookahead", default=None, help="Lookahead slow weights (airbench)."),
    click.option("--tta", type=click.Choice(TTA_MODES),
                 help="Test-time augmentation inside the served graph: average logits over the mirror image "
                       "(hflip), and also over 1-pixel shifts (hflip_translate, 6 views)."),
    click.option("--val-fraction", type=float, default=0.0, show_default=True,
                 help="Hold out this share of the training set (stratified) for validation; the test set is only "
                       "used for the final figure."),
    click.option("--split-seed", type=int, default=0, show_default=True, help="Seed of the validation split."),
    click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N or mps."),
    click.option("--precision", type=click.Choice(PRECISIONS), default="auto", show_default=True,
                 help="Autocast: auto = bf16 on CPUs with bf16 units, bf16/fp16 AMP on CUDA."),
    click.option("--channels-last/--no-channels-last", default=True, show_default=True, help="NHWC memory format."),
    click.option("--deterministic", is_flag=True, help="Deterministic algorithms only (slower on GPU)."),
    click.option("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)."),
    click.option("--resume", is_flag=True,
                 help="Continue interrupted runs from their checkpoint.pt; finished runs are kept, absent ones start."),
]
# fmt: on


def training_options(command):
    """Decorate a click command with every option in _TRAINING_OPTIONS, in that order in --help."""
    for option in reversed(_TRAINING_OPTIONS):
        command = option(command)
    return command
