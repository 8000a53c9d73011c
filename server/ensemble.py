"""Ensemble models (platform "ensemble"): run the steps of ensemble_scheduling.

Each step hands some ensemble tensors to another model and names its outputs as new
ensemble tensors. Steps whose inputs are all available run together, so the members
of an averaging ensemble run at the same time and the average runs after them. Each
step goes through that model's own scheduler: concurrent ensemble requests are
batched per member, exactly as direct requests to the member would be.
"""

from __future__ import annotations

import asyncio
import time
from typing import Protocol

import numpy as np

from server.repository import EnsembleStep, ModelSpec
from server.statistics import ModelStats

Tensors = dict[str, np.ndarray]


class Scheduler(Protocol):
    async def infer(self, inputs: Tensors, batch_size: int, deadline: float | None) -> Tensors: ...


def _waves(spec: ModelSpec) -> list[list[int]]:
    """Group step indices into waves: every step of a wave only needs tensors produced
    before it. (repository.check_ensemble has already proved every input is produced.)"""
    available = {tensor.name for tensor in spec.inputs}
    remaining = list(range(len(spec.steps)))
    waves = []
    while remaining:
        wave = [i for i in remaining if set(spec.steps[i].input_map.values()) <= available]
        if not wave:
            raise ValueError(f"ensemble {spec.name!r}: steps {remaining} wait on tensors nobody produces")
        for i in wave:
            available.update(spec.steps[i].output_map.values())
        remaining = [i for i in remaining if i not in wave]
        waves.append(wave)
    return waves


class EnsembleScheduler:
    def __init__(self, spec: ModelSpec, members: list[Scheduler], stats: ModelStats):
        self.spec = spec
        self._members = members  # one scheduler per step, in step order
        self._waves = _waves(spec)
        self._stats = stats

    async def _run_step(self, step: EnsembleStep, member: Scheduler, tensors: Tensors, batch_size: int,
                        deadline: float | None) -> Tensors:  # fmt: skip
        inputs = {member_input: tensors[source] for member_input, source in step.input_map.items()}
        outputs = await member.infer(inputs, batch_size, deadline)
        return {target: outputs[member_output] for member_output, target in step.output_map.items()}

    async def infer(self, inputs: Tensors, batch_size: int, deadline: float | None) -> Tensors:
        start = time.monotonic_ns()
        tensors = dict(inputs)
        try:
            for wave in self._waves:
                results = await asyncio.gather(*(
                    self._run_step(self.spec.steps[i], self._members[i], tensors, batch_size, deadline) for i in wave
                ))
                for produced in results:
                    tensors.update(produced)
        except Exception:
            self._stats.record_failure(time.monotonic_ns() - start)
            raise
        elapsed = time.monotonic_ns() - start
        # One "execution" per ensemble request; its compute time is the whole pipeline and
        # its own queue time is nil (the waiting happens in the members' queues). The queue
        # count matters: perf_analyzer finds the version it measured by that count rising.
        self._stats.queue.add(0)
        self._stats.record_execution(batch_size, 0, elapsed, 0, requests=1)
        self._stats.record_success(elapsed)
        return {tensor.name: tensors[tensor.name] for tensor in self.spec.outputs}
