"""The Triton model repository layout (docs/design.md §3): model dirs, config.pbtxt, labels, staging.

    <repository>/<model>/config.pbtxt     ModelConfig, written through ensemble_serving.model_config
    <repository>/<model>/labels.txt       one class name per line (the output's label_filename)
    <repository>/<model>/parity.json      the exporter's proof (beside the version dir; Triton ignores it)
    <repository>/<model>/1/model.onnx     version 1 (ensembles get an empty 1/, as Triton requires)

Everything is first written into a staging directory next to the repository and only
moved into place, model dir by model dir with os.rename, once every check has passed;
an export that fails leaves the repository exactly as it was.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

from ensemble_serving.model_config import ModelConfig, save_model_config
from ensemble_serving.protocol import model_config_pb2 as pb
from exporter.average import member_output_name
from exporter.errors import ExportError

ONNX_PLATFORM = "onnxruntime_onnx"
ENSEMBLE_PLATFORM = "ensemble"
VERSION = "1"
MODEL_FILENAME = "model.onnx"
LABELS_FILENAME = "labels.txt"
INSTANCE_KINDS = {
    "auto": pb.ModelInstanceGroup.KIND_AUTO,  # Triton's reading: GPU when available, else CPU
    "cpu": pb.ModelInstanceGroup.KIND_CPU,
    "gpu": pb.ModelInstanceGroup.KIND_GPU,
}
DEFAULT_MAX_QUEUE_DELAY_US = 1000
MODEL_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def check_model_name(name: str) -> str:
    if not MODEL_NAME_PATTERN.match(name):
        raise ExportError(f"model name {name!r}: expected letters, digits, '_', '.', '-' (it becomes a directory name)")
    return name


# --------------------------------------------------------------------------- config.pbtxt


def _serving_io(config: ModelConfig, input_shape: tuple[int, int, int], num_classes: int) -> None:
    """The signature every servable model shares: images UINT8 [H, W, C] -> probabilities FP32 [C]."""
    config.input.add(name="images", data_type=pb.TYPE_UINT8, format=pb.ModelInput.FORMAT_NHWC, dims=list(input_shape))
    config.output.add(name="probabilities", data_type=pb.TYPE_FP32, dims=[num_classes], label_filename=LABELS_FILENAME)


def _runtime_settings(config: ModelConfig, instance_kind: str, instances: int, max_queue_delay_us: int) -> None:
    config.dynamic_batching.max_queue_delay_microseconds = max_queue_delay_us
    config.instance_group.add(kind=INSTANCE_KINDS[instance_kind], count=instances)


def member_config(name: str, input_shape: tuple[int, int, int], num_classes: int, *, max_batch_size: int,
                  instance_kind: str = "cpu", instances: int = 1,
                  max_queue_delay_us: int = DEFAULT_MAX_QUEUE_DELAY_US) -> ModelConfig:  # fmt: skip
    """An ONNX model taking images (also used for a fused ensemble)."""
    config = ModelConfig(name=name, platform=ONNX_PLATFORM, max_batch_size=max_batch_size)
    _serving_io(config, input_shape, num_classes)
    _runtime_settings(config, instance_kind, instances, max_queue_delay_us)
    return config


def average_config(name: str, num_members: int, num_classes: int, *, max_batch_size: int,
                   instance_kind: str = "cpu", instances: int = 1,
                   max_queue_delay_us: int = DEFAULT_MAX_QUEUE_DELAY_US) -> ModelConfig:  # fmt: skip
    config = ModelConfig(name=name, platform=ONNX_PLATFORM, max_batch_size=max_batch_size)
    for index in range(num_members):
        config.input.add(name=member_output_name(index), data_type=pb.TYPE_FP32, dims=[num_classes])
    config.output.add(name="probabilities", data_type=pb.TYPE_FP32, dims=[num_classes], label_filename=LABELS_FILENAME)
    _runtime_settings(config, instance_kind, instances, max_queue_delay_us)
    return config


def ensemble_config(name: str, member_names: list[str], average_name: str, input_shape: tuple[int, int, int],
                    num_classes: int, *, max_batch_size: int) -> ModelConfig:  # fmt: skip
    """Platform "ensemble": every member maps images -> probabilities_i, then the average."""
    config = ModelConfig(name=name, platform=ENSEMBLE_PLATFORM, max_batch_size=max_batch_size)
    _serving_io(config, input_shape, num_classes)
    for index, member in enumerate(member_names):
        config.ensemble_scheduling.step.add(
            model_name=member, model_version=-1,
            input_map={"images": "images"}, output_map={"probabilities": member_output_name(index)},
        )  # fmt: skip
    config.ensemble_scheduling.step.add(
        model_name=average_name, model_version=-1,
        input_map={member_output_name(i): member_output_name(i) for i in range(len(member_names))},
        output_map={"probabilities": "probabilities"},
    )  # fmt: skip
    return config


# --------------------------------------------------------------------------- staging and commit


class StagedRepository:
    """Model dirs built in a private staging dir, moved into the repository on commit().

    Use as a context manager: leaving the block without commit() (an error) removes the
    staging dir and leaves the repository untouched.
    """

    def __init__(self, repository: str | os.PathLike):
        self.repository = Path(repository).resolve()
        if self.repository.exists() and not self.repository.is_dir():
            raise ExportError(f"--repository {self.repository}: exists and is not a directory")
        # Stage on the same file system as the repository so that the final moves are renames.
        anchor = self.repository
        while not anchor.exists():
            anchor = anchor.parent
        if anchor == self.repository:
            anchor = self.repository.parent
        self.root = Path(tempfile.mkdtemp(prefix=f".{self.repository.name}.exporter-staging-", dir=anchor))
        self.model_names: list[str] = []

    def __enter__(self) -> "StagedRepository":
        return self

    def __exit__(self, *exc_info) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

    def existing(self, names: list[str]) -> list[str]:
        return [name for name in names if (self.repository / name).exists()]

    def write_model(self, name: str, config: ModelConfig, class_names: list[str], *, model_bytes: bytes | None = None,
                    reports: dict[str, dict] | None = None) -> Path:  # fmt: skip
        """One model dir: config.pbtxt, labels.txt, reports (JSON) and 1/model.onnx (or an empty 1/)."""
        model_dir = self.root / "models" / check_model_name(name)
        (model_dir / VERSION).mkdir(parents=True)
        save_model_config(config, model_dir / "config.pbtxt")
        (model_dir / LABELS_FILENAME).write_text("".join(f"{label}\n" for label in class_names), encoding="utf-8")
        if model_bytes is not None:
            (model_dir / VERSION / MODEL_FILENAME).write_bytes(model_bytes)
        for filename, report in (reports or {}).items():
            (model_dir / filename).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        self.model_names.append(name)
        return self.repository / name

    def commit(self, overwrite: bool) -> list[Path]:
        """Move every staged model dir into the repository (replacing old ones only with overwrite)."""
        clashes = self.existing(self.model_names)
        if clashes and not overwrite:
            raise ExportError(refuse_existing_message(self.repository, clashes))
        self.repository.mkdir(parents=True, exist_ok=True)
        replaced_root = self.root / "replaced"
        replaced_root.mkdir()
        placed: list[str] = []
        try:
            for name in self.model_names:
                target = self.repository / name
                if target.exists():
                    os.rename(target, replaced_root / name)
                os.rename(self.root / "models" / name, target)
                placed.append(name)
        except OSError as error:
            self._roll_back(placed, replaced_root)
            raise ExportError(f"could not move the models into {self.repository}: {error}") from None
        return [self.repository / name for name in self.model_names]

    def _roll_back(self, placed: list[str], replaced_root: Path) -> None:
        for name in placed:
            shutil.rmtree(self.repository / name, ignore_errors=True)
        for old in replaced_root.iterdir():
            os.rename(old, self.repository / old.name)


def refuse_existing_message(repository: Path, names: list[str]) -> str:
    listed = ", ".join(names)
    return f"{repository}: model(s) {listed} already exist; pass --overwrite to replace them"
