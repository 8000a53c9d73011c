"""The run dir: what the trainer leaves behind and the exporter loads (DESIGN.md §2).

    model.safetensors   the network's state_dict (safetensors: loading never runs code)
    config.json         everything needed to rebuild the network and its preprocessing
    checkpoint.pt       only while training: optimizer/schedule/RNG state for --resume
                        (read with torch.load(weights_only=True): tensors and plain data only)

load_serving_model() is the one way to turn a run dir into a model: it returns the
ServingModel, which takes raw uint8 NHWC images and returns probabilities, so the
preprocessing and any test-time augmentation live inside the exported graph.
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

FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TRAINING_STATE_FILE = "checkpoint.pt"


class RunDirError(ValueError):
    """A run dir is missing files or holds something we cannot use."""


TTA_MODES = ("none", "hflip", "hflip_translate")


class ServingModel(nn.Module):
    """uint8 images [N, H, W, C] -> float32 probabilities [N, num_classes].

    Scaling, normalization, layout change, the network, optional test-time
    augmentation and softmax, all in ops that ONNX exports (Cast, Transpose, Mul/Add,
    Pad, Slice, Concat, Reshape, ReduceSum, Softmax), so the exported graph does
    exactly what the trainer measured. Test-time augmentation averages logits over views:
      "hflip":            the image and its mirror, 1/2 each;
      "hflip_translate":  those two (1/4 each) plus both, shifted one pixel up-left and
                          one pixel down-right with mirrored borders (1/8 each).
    """

    def __init__(self, network: nn.Module, mean: list[float], std: list[float], tta: str = "none"):
        super().__init__()
        if tta not in TTA_MODES:
            raise ValueError(f"unknown test-time augmentation {tta!r}: expected one of {', '.join(TTA_MODES)}")
        self.network = network
        self.tta = tta
        channels = len(mean)
        # Folded into one multiply-add: (x / 255 - mean) / std == x * scale + shift.
        std_t, mean_t = torch.tensor(std, dtype=torch.float32), torch.tensor(mean, dtype=torch.float32)
        self.register_buffer("scale", (1 / (255 * std_t)).view(1, channels, 1, 1), persistent=False)
        self.register_buffer("shift", (-mean_t / std_t).view(1, channels, 1, 1), persistent=False)
        view_weights = {"none": [1.0], "hflip": [0.5, 0.5], "hflip_translate": [0.25, 0.25] + [0.125] * 4}[tta]
        self.register_buffer("view_weights", torch.tensor(view_weights).view(-1, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.permute(0, 3, 1, 2).to(torch.float32) * self.scale + self.shift
        if self.tta == "none":
            return torch.softmax(self.network(x), dim=1)
        views = [x, torch.flip(x, dims=[3])]
        if self.tta == "hflip_translate":
            padded = torch.nn.functional.pad(x, (1, 1, 1, 1), mode="reflect")
            for shifted in (padded[:, :, :-2, :-2], padded[:, :, 2:, 2:]):
                views += [shifted, torch.flip(shifted, dims=[3])]
        logits = self.network(torch.cat(views, dim=0))
        logits = logits.reshape(len(views), x.shape[0], logits.shape[-1])
        return torch.softmax((logits * self.view_weights).sum(dim=0), dim=1)


def build_network(config: dict) -> nn.Module:
    shape = config["input"]
    return build_model(
        config["architecture"],
        in_channels=shape["channels"],
        num_classes=len(config["class_names"]),
        image_size=shape["height"],
        **config.get("arch_args", {}),
    )


def serving_model_from(network: nn.Module, config: dict) -> ServingModel:
    norm = config["normalization"]
    serving = config.get("serving", {})
    # Run dirs written before "tta" existed say {"hflip_tta": true/false}.
    tta = serving.get("tta") or ("hflip" if serving.get("hflip_tta") else "none")
    return ServingModel(network, norm["mean"], norm["std"], tta=tta)


def load_serving_model(run_dir: str | os.PathLike) -> tuple[ServingModel, dict]:
    """(eval-mode fp32 ServingModel on CPU, config dict) for a finished (or interrupted) run dir."""
    run_dir = Path(run_dir)
    config = read_config(run_dir)
    weights = run_dir / WEIGHTS_FILE
    if not weights.is_file():
        raise RunDirError(f"{run_dir} has no {WEIGHTS_FILE}; is it a trainer run dir?")
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


def read_config(run_dir: Path) -> dict:
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise RunDirError(f"{run_dir} has no {CONFIG_FILE}; is it a trainer run dir?")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise RunDirError(f"{path} is not valid JSON: {error}") from None
    version = config.get("format_version")
    if version != FORMAT_VERSION:
        raise RunDirError(f"{path} has format_version {version!r}; this trainer reads {FORMAT_VERSION}")
    missing = [k for k in ("architecture", "class_names", "input", "normalization") if k not in config]
    if missing:
        raise RunDirError(f"{path} lacks {', '.join(missing)}")
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
