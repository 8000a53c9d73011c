"""The trainer's validation split, recomputed: the images a run held out of training.

The trainer holds out `val_fraction` of the training set, stratified by class, with
`split_seed` (trainer.data.split_train_validation), and config.json records both and
the count (`val_samples`). The exporter recomputes the very same indices from the real
training images in the data dir, and checks the count against config.json, so that what
it measures there (the int8 accuracy gate, fitted ensemble weights) is measured on
images the run never trained on.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ensemble_serving.datasets import Dataset, DatasetChecksumWarning, DatasetError, load_dataset, resolve_data_dir
from exporter.errors import ExportError, one_line


@dataclass(frozen=True)
class TrainerSplit:
    """The training set as the run saw it: `train_idx` trained on, `val_idx` held out."""

    train: Dataset
    train_idx: np.ndarray
    val_idx: np.ndarray
    val_fraction: float
    split_seed: int
    data_dir: Path


def split_settings(config: dict) -> tuple[float, int]:
    """(val_fraction, split_seed) of a run's config.json (a run from before the split: no validation)."""
    return float(config.get("val_fraction", 0.0)), int(config.get("split_seed", 0))


def load_real(dataset: str, split: str, root: Path, needed_by: str) -> Dataset:
    """A real split from the data dir (never downloaded here); `needed_by` names the option in the error."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DatasetChecksumWarning)
            return load_dataset(dataset, split, root, download=False)
    except DatasetError as error:
        raise ExportError(f"{needed_by} needs the real {dataset} {split} images: {one_line(error)}") from None


def trainer_split(config: dict, data_dir=None, needed_by: str = "the exporter") -> TrainerSplit:
    """Recompute a run's split of the real training set in `data_dir` (checked against val_samples)."""
    from trainer.data import split_train_validation

    root = resolve_data_dir(data_dir)
    val_fraction, split_seed = split_settings(config)
    train = load_real(config["dataset"], "train", root, needed_by)
    train_idx, val_idx = split_train_validation(train.labels, val_fraction, split_seed)
    if "val_samples" in config and int(config["val_samples"]) != len(val_idx):
        raise ExportError(
            f"recomputing the trainer's validation split gives {len(val_idx)} images, config.json says "
            f"{config['val_samples']}: is {root} the data the run was trained on?"
        )
    return TrainerSplit(train, train_idx, val_idx, val_fraction, split_seed, root)
