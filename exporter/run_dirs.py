"""Read trained run dirs (DESIGN.md §2) into serving modules, with clear errors for bad ones.

A run dir holds `model.safetensors` and `config.json`; the trainer's
`load_serving_model` turns it into the module we export: uint8 NHWC images in,
probabilities out. Everything the exporter needs to know about a model (dataset,
class names, input shape) comes from config.json, never from training defaults.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from exporter.errors import ExportError, one_line

WEIGHTS_FILENAME = "model.safetensors"
CONFIG_FILENAME = "config.json"
SUPPORTED_FORMAT_VERSIONS = (1,)
REQUIRED_CONFIG_KEYS = ("architecture", "dataset", "class_names", "input", "normalization")


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


def read_run_config(run_dir: Path) -> dict:
    """config.json of a run dir, checked for what the exporter relies on."""
    if not run_dir.is_dir():
        raise ExportError(f"{run_dir}: not a directory (expected a run dir written by `trainer`)")
    path = run_dir / CONFIG_FILENAME
    if not path.is_file():
        raise ExportError(f"{run_dir}: no {CONFIG_FILENAME} (expected a run dir written by `trainer`)")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ExportError(f"{path}: not readable JSON: {one_line(error)}") from None
    if not isinstance(config, dict):
        raise ExportError(f"{path}: expected a JSON object")
    version = config.get("format_version")
    if version not in SUPPORTED_FORMAT_VERSIONS:
        raise ExportError(f"{path}: format_version {version!r} is not supported (expected one of {SUPPORTED_FORMAT_VERSIONS})")
    missing = [key for key in REQUIRED_CONFIG_KEYS if key not in config]
    if missing:
        raise ExportError(f"{path}: missing key(s) {', '.join(missing)}")
    return config


def load_member(run_dir: str | Path) -> Member:
    """Load one run dir through the trainer's `load_serving_model`, and check what it returns."""
    run_dir = Path(run_dir)
    config = read_run_config(run_dir)
    if not (run_dir / WEIGHTS_FILENAME).is_file():
        raise ExportError(f"{run_dir}: no {WEIGHTS_FILENAME} (the run has no trained weights; did training finish?)")

    from trainer.checkpoint import RunDirError, load_serving_model  # the trainer owns how a run becomes a module

    try:
        module, _ = load_serving_model(run_dir)
    except RunDirError as error:  # already names the file and what is wrong with it
        raise ExportError(one_line(error)) from None
    except Exception as error:  # noqa: BLE001 - anything else here means weights and config disagree
        raise ExportError(
            f"{run_dir}: {WEIGHTS_FILENAME} does not match {CONFIG_FILENAME} "
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


def check_run_dirs(run_dirs: list[str | Path]) -> None:
    """Every config.json readable and the members compatible, before any weights are loaded."""
    if not run_dirs:
        raise ExportError("no run dirs given (expected at least one directory written by `trainer`)")
    resolved = [Path(run_dir).resolve() for run_dir in run_dirs]
    duplicates = {str(path) for path in resolved if resolved.count(path) > 1}
    if duplicates:
        raise ExportError(f"run dir given more than once: {', '.join(sorted(duplicates))}")
    configs = [read_run_config(Path(run_dir)) for run_dir in run_dirs]
    check_compatible(list(zip(map(Path, run_dirs), configs)))


def load_members(run_dirs: list[str | Path]) -> list[Member]:
    check_run_dirs(run_dirs)
    return [load_member(run_dir) for run_dir in run_dirs]


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
    with open(run_dir / WEIGHTS_FILENAME, "rb") as weights:
        for block in iter(lambda: weights.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
