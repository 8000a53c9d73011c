"""A tiny model repository made the real way: trainer on generated data, then exporter.

Generated MNIST-layout data (noise plus a bright bar whose row is the label, so one
epoch learns it), two one-epoch LeNets of a few thousand weights (seeds 0 and 1), and
`exporter.export.export_repository` over both: members NAME-m0/-m1, NAME-average and
the ensemble NAME, with the exporter's parity checks. About ten seconds on one core.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tests.support.datasets import write_mnist_split

NAME = "tiny"
IMAGE = 28
TRAIN_IMAGES, TEST_IMAGES = 320, 96
TINY_LENET = {"widths": [4, 8], "hidden": 16, "dropout": 0.0}
MAX_BATCH_SIZE = 16


def write_digit_like_data(root: Path, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for split, count in (("train", TRAIN_IMAGES), ("test", TEST_IMAGES)):
        labels = rng.integers(0, 10, count)
        images = rng.integers(0, 60, (count, IMAGE, IMAGE), dtype=np.uint8)
        for image, label in zip(images, labels):
            image[2 + 2 * label: 4 + 2 * label, 4:24] = 255
        write_mnist_split(root, split, images, labels)
    return root


def train_tiny_run(run_dir: Path, data_dir: Path, seed: int) -> Path:
    import torch
    from rich.console import Console

    from ensemble_serving.datasets import load_dataset
    from trainer.recipes import get_recipe
    from trainer.environment import Environment
    from trainer.train import RunSpec, train_run

    recipe = get_recipe("lenet")
    recipe.update(epochs=1, batch_size=32, arch_args=TINY_LENET, eval_batch_size=256, warmup=0.0)
    spec = RunSpec(dataset="mnist", architecture="lenet", hyper=recipe, seed=seed, run_dir=run_dir,
                   val_fraction=0.25, split_seed=0, precision="fp32", channels_last=False)  # fmt: skip
    train = load_dataset("mnist", "train", data_dir, download=False)
    test = load_dataset("mnist", "test", data_dir, download=False)
    train_run(spec, Environment(torch.device("cpu")), train, test, Console(quiet=True))
    return run_dir


def write_tiny_repository(root: Path) -> dict:
    """Train two tiny runs and export them into `root`/model_repository; returns the facts
    tests need about the repository (see conftest.TinyRepository)."""
    import warnings

    import torch

    from exporter.export import export_repository

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the CPU is shared; these models are tiny anyway
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # generated IDX files are not the official release's md5
            data_dir = write_digit_like_data(root / "data")
            runs = [train_tiny_run(root / "runs" / f"{NAME}-s{seed}", data_dir, seed) for seed in (0, 1)]
            result = export_repository(runs, root / "model_repository", NAME, data_dir=data_dir,
                                       max_batch_size=MAX_BATCH_SIZE)
    finally:
        torch.set_num_threads(threads)
    members = tuple(model.name for model in result.models if model.kind == "member")
    average = next(model.name for model in result.models if model.kind == "average")
    class_names = tuple((result.repository / members[0] / "labels.txt").read_text(encoding="utf-8").splitlines())
    return dict(path=result.repository, ensemble=NAME, members=members, average=average, height=IMAGE, width=IMAGE,
                channels=1, class_names=class_names, max_batch_size=MAX_BATCH_SIZE)
