"""The run dir: what the trainer leaves behind and the exporter loads (docs/design.md §2).

This module is the run dir's one owner: read_config is the one reader and validator of
config.json, RunDirError the one error type, for the trainer and the exporter alike.

    model.safetensors   the network's state_dict (safetensors: loading never runs code)
    config.json         everything needed to rebuild the network and its preprocessing
    checkpoint.pt       only while training: optimizer/schedule/RNG state for --resume
                        (read with torch.load(weights_only=True): tensors and plain data only)

load_serving_model() is the one way to turn a run dir into a model: it returns the
ServingModel (trainer/serving.py), which takes raw uint8 NHWC images and returns
probabilities, so the preprocessing and any test-time augmentation live inside the
exported graph.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from trainer.models import build_model
from trainer.serving import TTA_MODES, ServingModel, serving_model_from

FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TRAINING_STATE_FILE = "checkpoint.pt"
# What every consumer relies on; the trainer writes more (seed, metrics, versions, ...).
REQUIRED_KEYS = ("architecture", "dataset", "class_names", "input", "normalization", "serving")


class RunDirError(ValueError):
    """A run dir is missing files or holds something we cannot use."""


def build_network(config: dict) -> nn.Module:
    shape = config["input"]
    return build_model(
        config["architecture"],
        in_channels=shape["channels"],
        num_classes=len(config["class_names"]),
        image_size=shape["height"],
        **config.get("arch_args", {}),
    )


def load_serving_model(run_dir: str | os.PathLike, config: dict | None = None) -> tuple[ServingModel, dict]:
    """(eval-mode fp32 ServingModel on CPU, config dict) for a finished (or interrupted) run dir.

    `config`: the run dir's config.json as read_config returned it, to spare a second read.
    """
    run_dir = Path(run_dir)
    config = read_config(run_dir) if config is None else config
    weights = run_dir / WEIGHTS_FILE
    if not weights.is_file():
        raise RunDirError(f"{run_dir}: no {WEIGHTS_FILE} (the run has no trained weights; did training finish?)")
    try:
        network = build_network(config)
    except (KeyError, TypeError, ValueError) as error:
        raise RunDirError(f"{run_dir / CONFIG_FILE} does not describe a buildable network: {error}") from None
    try:
        state = load_file(weights)
    except Exception as error:  # safetensors raises its own error types on bad bytes
        raise RunDirError(f"{weights} is corrupt or not safetensors: {error}") from None
    try:
        network.load_state_dict(state, strict=True)
    except RuntimeError as error:
        first_line = str(error).splitlines()[0]
        raise RunDirError(f"{weights} does not match architecture {config['architecture']!r}: {first_line}") from None
    model = serving_model_from(network, config).float().eval()
    return model, config


def read_config(run_dir: str | os.PathLike) -> dict:
    """config.json of a run dir, checked for what every consumer relies on."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunDirError(f"{run_dir}: not a directory (expected a run dir written by `trainer`)")
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        raise RunDirError(f"{run_dir} has no {CONFIG_FILE}; is it a trainer run dir?")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise RunDirError(f"{path} is not readable JSON: {error}") from None
    if not isinstance(config, dict):
        raise RunDirError(f"{path} is not a JSON object")
    version = config.get("format_version")
    if version != FORMAT_VERSION:
        raise RunDirError(f"{path} has format_version {version!r}; this trainer reads {FORMAT_VERSION}")
    missing = [key for key in REQUIRED_KEYS if key not in config]
    if missing:
        raise RunDirError(f"{path} lacks {', '.join(missing)}")
    tta = config["serving"].get("tta") if isinstance(config["serving"], dict) else None
    if tta not in TTA_MODES:
        raise RunDirError(f"{path}: serving.tta is {tta!r}, expected one of {', '.join(TTA_MODES)}")
    return config


def write_config(run_dir: Path, config: dict) -> None:
    _atomic_write_bytes(Path(run_dir) / CONFIG_FILE, (json.dumps(config, indent=2) + "\n").encode())


def save_weights(run_dir: Path, network: nn.Module) -> None:
    """safetensors needs contiguous, unshared tensors: channels_last weights are copied."""
    state = {name: tensor.detach().to("cpu").contiguous().clone() for name, tensor in network.state_dict().items()}
    run_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".model.", suffix=".safetensors", dir=run_dir)
    os.close(fd)
    try:
        save_file(state, tmp, metadata={"format": "pt"})
        _make_readable(tmp)
        os.replace(tmp, run_dir / WEIGHTS_FILE)
    finally:
        Path(tmp).unlink(missing_ok=True)


def save_training_state(run_dir: Path, state: dict) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".checkpoint.", suffix=".pt", dir=run_dir)
    os.close(fd)
    try:
        torch.save(state, tmp)
        os.replace(tmp, run_dir / TRAINING_STATE_FILE)
    finally:
        Path(tmp).unlink(missing_ok=True)


def load_training_state(run_dir: Path) -> dict | None:
    path = Path(run_dir) / TRAINING_STATE_FILE
    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise RunDirError(f"{path} cannot be read ({error}); delete it to start the run afresh") from None


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        _make_readable(tmp)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def _make_readable(path) -> None:
    """mkstemp creates files 0600; give the final file the usual umask-based mode."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)
