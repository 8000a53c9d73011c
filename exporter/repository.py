"""The Triton model repository layout (docs/design.md §3): model dirs, config.pbtxt, labels, staging.

    <repository>/<model>/config.pbtxt     ModelConfig, written through ensemble_serving.model_config
    <repository>/<model>/labels.txt       one class name per line (the output's label_filename)
    <repository>/<model>/parity.json      the exporter's proof (beside the version dir; Triton ignores it)
    <repository>/<model>/1/model.onnx     version 1 (ensembles get an empty 1/, as Triton requires)

Everything is first written into a staging directory next to the repository and only
moved into place, model dir by model dir with os.rename, once every check has passed;
an export that fails leaves the repository exactly as it was.

With a version (`--version V` / `--next-version`) an export adds version V to models
that already exist instead of replacing them: only the staged `V/` folder is renamed
into `<model>/V` (config.pbtxt, labels and the other versions are left alone), so a
server polling the repository sees either no new version or a complete one. Its
reports then go inside `V/`. Models that do not exist yet are moved in whole.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
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


@dataclass(frozen=True)
class VersionChoice:
    """Which version an export writes: `number` (--version), or the next free one."""

    number: int | None = None
    next_free: bool = False

    def resolve(self, repository: Path, names: list[str]) -> str:
        """The version folder name, the same for every model of the export."""
        if self.number is not None:
            if self.number < 1:
                raise ExportError(f"--version {self.number}: expected a positive integer")
            taken = [name for name in names if (repository / name / str(self.number)).exists()]
            if taken:
                raise ExportError(f"{repository}: version {self.number} of {', '.join(taken)} already exists; "
                                  f"versions are never overwritten (use --next-version)")
            return str(self.number)
        highest = max((version for name in names for version in existing_versions(repository / name)), default=0)
        return str(highest + 1)


def existing_versions(model_dir: Path) -> list[int]:
    if not model_dir.is_dir():
        return []
    return sorted(int(child.name) for child in model_dir.iterdir() if child.is_dir() and child.name.isdigit())


def publish_version(staged_version: Path, model_dir: Path, version: str) -> Path:
    """Move a complete version folder into `model_dir` with one rename (same file system):
    a server polling the repository sees all of it or nothing."""
    target = model_dir / version
    if target.exists():
        raise ExportError(f"{target} already exists; versions are never overwritten")
    os.rename(staged_version, target)
    return target


class StagedRepository:
    """Model dirs built in a private staging dir, moved into the repository on commit().

    Use as a context manager: leaving the block without commit() (an error) removes the
    staging dir and leaves the repository untouched.
    """

    def __init__(self, repository: str | os.PathLike, version: str = VERSION, add_version: bool = False):
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
        self.version = version  # the version folder written
        self.add_version = add_version  # commit adds `version` to existing models instead of replacing them

    def __enter__(self) -> "StagedRepository":
        return self

    def __exit__(self, *exc_info) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

    def existing(self, names: list[str]) -> list[str]:
        return [name for name in names if (self.repository / name).exists()]

    def write_model(self, name: str, config: ModelConfig, class_names: list[str], *, model_bytes: bytes | None = None,
                    reports: dict[str, dict] | None = None) -> Path:  # fmt: skip
        """One model dir: config.pbtxt, labels.txt, reports (JSON) and <version>/model.onnx (an
        ensemble: an empty 1/, whatever the version: its members' versions are what change)."""
        model_dir = self.root / "models" / check_model_name(name)
        version_dir = model_dir / (self.version if model_bytes is not None else VERSION)
        version_dir.mkdir(parents=True)
        save_model_config(config, model_dir / "config.pbtxt")
        (model_dir / LABELS_FILENAME).write_text("".join(f"{label}\n" for label in class_names), encoding="utf-8")
        if model_bytes is not None:
            (version_dir / MODEL_FILENAME).write_bytes(model_bytes)
        reports_dir = version_dir if self.add_version and model_bytes is not None else model_dir
        for filename, report in (reports or {}).items():
            (reports_dir / filename).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        self.model_names.append(name)
        return self.repository / name

    def commit(self, overwrite: bool) -> list[Path]:
        """Move every staged model dir into the repository (replacing old ones only with overwrite)."""
        if self.add_version:
            return self._commit_versions()
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

    def _commit_versions(self) -> list[Path]:
        """Version mode: new models move in whole; existing ONNX models get the new version
        folder only; an existing ensemble keeps its config (its steps ask for the latest
        member version, model_version -1) unless a step pins a version, which then follows."""
        self.repository.mkdir(parents=True, exist_ok=True)
        for name in self.model_names:
            staged, target = self.root / "models" / name, self.repository / name
            if not target.exists():
                os.rename(staged, target)
            elif (staged / self.version / MODEL_FILENAME).exists():
                _check_same_signature(staged, target)
                publish_version(staged / self.version, target, self.version)
            else:
                _follow_pinned_versions(target, self.version)
        return [self.repository / name for name in self.model_names]

    def _roll_back(self, placed: list[str], replaced_root: Path) -> None:
        for name in placed:
            shutil.rmtree(self.repository / name, ignore_errors=True)
        for old in replaced_root.iterdir():
            os.rename(old, self.repository / old.name)


def _check_same_signature(staged: Path, target: Path) -> None:
    """A new version must fit the config.pbtxt all versions share."""
    from ensemble_serving.model_config import load_model_config

    new, old = load_model_config(staged), load_model_config(target)
    if list(new.input) != list(old.input) or list(new.output) != list(old.output):
        raise ExportError(f"{target}: the new version's inputs/outputs differ from {target / 'config.pbtxt'}; "
                          f"export it under another --name (or replace the model with --overwrite, no --version)")


def _follow_pinned_versions(ensemble_dir: Path, version: str) -> None:
    """Steps that pin a member version move to the new one (written aside, then os.replace)."""
    from ensemble_serving.model_config import load_model_config

    config = load_model_config(ensemble_dir)
    pinned = [step for step in config.ensemble_scheduling.step if step.model_version > 0]
    if not pinned:
        return
    for step in pinned:
        step.model_version = int(version)
    temporary = ensemble_dir / ".config.pbtxt.new"
    save_model_config(config, temporary)
    os.replace(temporary, ensemble_dir / "config.pbtxt")


def refuse_existing_message(repository: Path, names: list[str]) -> str:
    listed = ", ".join(names)
    return f"{repository}: model(s) {listed} already exist; pass --overwrite to replace them"
