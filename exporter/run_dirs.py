"""Trained run dirs (docs/design.md §2) as export members, with clear errors for bad ones.

The trainer owns the run dir: trainer.checkpoint.read_config is the one reader and
validator of config.json and load_serving_model the one way to a module (uint8 NHWC
images in, probabilities out). This module adds what only the exporter needs: that the
members of one ensemble agree, that the module keeps the serving signature, and the
weights' digest. The trainer's RunDirErrors become ExportErrors here.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from exporter.errors import ExportError, one_line
from trainer.checkpoint import CONFIG_FILE, WEIGHTS_FILE, RunDirError, load_serving_model, read_config


@dataclass
class Member:
    """One trained model, ready to export."""

    run_dir: Path
    config: dict
    module: torch.nn.Module  # eval mode; uint8 [N, H, W, C] -> float32 probabilities [N, C]

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(H, W, C), as the images arrive over the wire."""
        spec = self.config["input"]
        return int(spec["height"]), int(spec["width"]), int(spec["channels"])

    @property
    def class_names(self) -> list[str]:
        return list(self.config["class_names"])

    @property
    def dataset(self) -> str:
        return self.config["dataset"]

    def predict(self, images: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return self.module(torch.from_numpy(np.ascontiguousarray(images))).numpy()


def load_member(run_dir: Path, config: dict) -> Member:
    """One run dir (with its config as check_run_dirs returned it) as a module, checked for the serving signature."""
    try:
        module, _ = load_serving_model(run_dir, config)
    except RunDirError as error:  # already names the file and what is wrong with it
        raise ExportError(one_line(error)) from None
    except Exception as error:  # noqa: BLE001 - anything else here means weights and config disagree
        raise ExportError(
            f"{run_dir}: {WEIGHTS_FILE} does not match {CONFIG_FILE} "
            f"(architecture {config['architecture']!r}): {one_line(error, 240)}"
        ) from None
    member = Member(run_dir=run_dir, config=config, module=module.eval())
    _check_serving_signature(member)
    return member


def _check_serving_signature(member: Member) -> None:
    """Two probe images through the module: the contract is uint8 NHWC in, probabilities out."""
    height, width, channels = member.input_shape
    probe = np.zeros((2, height, width, channels), dtype=np.uint8)
    try:
        output = member.predict(probe)
    except Exception as error:  # noqa: BLE001
        raise ExportError(f"{member.run_dir}: the model fails on uint8 images [2, {height}, {width}, {channels}]: {one_line(error)}") from None
    expected = (2, len(member.class_names))
    if output.shape != expected or output.dtype != np.float32:
        raise ExportError(
            f"{member.run_dir}: the serving module returns {output.dtype} {list(output.shape)}, "
            f"expected float32 {list(expected)} (one probability per class in config.json)"
        )
    if not np.allclose(output.sum(axis=1), 1.0, atol=1e-4):
        raise ExportError(f"{member.run_dir}: the serving module's outputs do not sum to 1 (softmax missing?)")


def check_run_dirs(run_dirs: list[str | Path]) -> list[tuple[Path, dict]]:
    """(run dir, config) of each, every config.json read and the members compatible, before any weights load."""
    if not run_dirs:
        raise ExportError("no run dirs given (expected at least one directory written by `trainer`)")
    resolved = [Path(run_dir).resolve() for run_dir in run_dirs]
    duplicates = {str(path) for path in resolved if resolved.count(path) > 1}
    if duplicates:
        raise ExportError(f"run dir given more than once: {', '.join(sorted(duplicates))}")
    try:
        runs = [(Path(run_dir), read_config(run_dir)) for run_dir in run_dirs]
    except RunDirError as error:
        raise ExportError(one_line(error)) from None
    check_compatible(runs)
    return runs


def check_compatible(runs: list[tuple[Path, dict]]) -> None:
    """Members of one ensemble must agree on what goes in and what comes out."""
    first_dir, first = runs[0]
    for run_dir, config in runs[1:]:
        for key in ("dataset", "input", "class_names"):
            if config[key] != first[key]:
                raise ExportError(
                    f"{run_dir}: {key} {config[key]!r} differs from {first_dir}'s {first[key]!r} "
                    "(all members of an ensemble need the same dataset, input shape and classes)"
                )


def weights_sha256(run_dir: Path) -> str:
    digest = hashlib.sha256()
    with open(run_dir / WEIGHTS_FILE, "rb") as weights:
        for block in iter(lambda: weights.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
