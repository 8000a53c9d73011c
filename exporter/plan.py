"""What one export will do, decided before any work: the plan, its checks and its result types.

plan_names() names every model an export writes; _check_options() refuses bad options
before a run dir is read; Steps is the progress protocol and ExportResult/WrittenModel
what export_repository returns. exporter.export re-exports the public names.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from exporter.errors import ExportError
from exporter.repository import INSTANCE_KINDS, check_model_name

QUANTIZE_MODES = ("int8",)


class Steps(Protocol):
    """Progress reporting: begin(total) once, then step(description) before each step."""

    def begin(self, total: int) -> None: ...

    def step(self, description: str) -> None: ...


class _NoProgress:
    def begin(self, total: int) -> None:
        pass

    def step(self, description: str) -> None:
        pass


@dataclass
class WrittenModel:
    name: str
    kind: str  # "member" | "average" | "ensemble" | "fused" | "int8" | "int8-ensemble"
    platform: str
    path: Path  # the model dir in the repository
    reports: dict[str, dict] = field(default_factory=dict)  # filename -> report written beside the model


@dataclass
class ExportResult:
    repository: Path
    name: str
    models: list[WrittenModel]

    def __getitem__(self, model_name: str) -> WrittenModel:
        for model in self.models:
            if model.name == model_name:
                return model
        raise KeyError(model_name)

    @property
    def model_names(self) -> list[str]:
        return [model.name for model in self.models]


@dataclass(frozen=True)
class Plan:
    """Which models one export writes, by name."""

    name: str
    members: list[str]
    average: str | None
    ensemble: str | None
    fused: str | None
    int8_members: list[str]
    int8_ensemble: str | None

    @property
    def all_names(self) -> list[str]:
        names = [*self.members, self.average, self.ensemble, self.fused, *self.int8_members, self.int8_ensemble]
        return [name for name in names if name]


def plan_names(name: str, num_members: int, fused: bool, quantize: str | None) -> Plan:
    check_model_name(name)
    ensemble = num_members > 1
    members = [f"{name}-m{i}" for i in range(num_members)] if ensemble else [name]
    int8 = quantize == "int8"
    return Plan(
        name=name,
        members=members,
        average=f"{name}-average" if ensemble else None,
        ensemble=name if ensemble else None,
        fused=f"{name}-fused" if fused else None,
        int8_members=[f"{member}-int8" for member in members] if int8 else [],
        int8_ensemble=f"{name}-int8" if int8 and ensemble else None,
    )


def _check_options(run_dirs, fused, max_batch_size, quantize, max_accuracy_drop, instance_kind, instances) -> None:
    if not run_dirs:
        raise ExportError("no run dirs given (expected at least one directory written by `trainer`)")
    if fused and len(run_dirs) < 2:
        raise ExportError("--fused needs at least two run dirs (a single model is already one graph)")
    if max_batch_size < 1:
        raise ExportError(f"--max-batch-size {max_batch_size}: expected at least 1")
    if quantize not in (None, *QUANTIZE_MODES):
        raise ExportError(f"--quantize {quantize!r}: expected one of {', '.join(QUANTIZE_MODES)}")
    if not max_accuracy_drop >= 0:
        raise ExportError(f"--max-accuracy-drop {max_accuracy_drop}: expected a non-negative number of points")
    if instance_kind not in INSTANCE_KINDS:
        raise ExportError(f"--instance-kind {instance_kind!r}: expected one of {', '.join(INSTANCE_KINDS)}")
    if instances < 1:
        raise ExportError(f"--instances {instances}: expected at least 1")


def _count_steps(num_members: int, fused: bool, quantize: str | None, weigh: bool = False) -> int:
    steps = 3 * num_members + (1 if num_members > 1 else 0) + (2 if fused else 0) + 1 + (1 if weigh else 0)
    if quantize:
        steps += 1 + 2 * num_members + (1 if num_members > 1 else 0)
    return steps
