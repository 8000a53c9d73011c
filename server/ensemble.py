"""Ensemble models (platform "ensemble"): run the steps of ensemble_scheduling.

Each step hands some ensemble tensors to another model and names its outputs as new
ensemble tensors. Steps whose inputs are all available run together (a wave): every
step of a wave is submitted to its model's batcher before the first answer is awaited,
so the members of an averaging ensemble run at the same time and the average runs after
them. Each step goes through that model's own batcher: concurrent ensemble requests are
batched per member, exactly as direct requests to the member would be.
"""

from __future__ import annotations

import time
from server.batcher import CallScope, DynamicBatcher
from server.repository import ModelSpec
from server.request_codec import Tensors
from server.scheduling import Steps
from server.statistics import ModelStats


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
    def __init__(self, spec: ModelSpec, members: list[DynamicBatcher], stats: ModelStats):
        self.spec = spec
        self._members = members  # the batcher of each step, in step order
        self._waves = _waves(spec)
        self._stats = stats

    def steps(self, inputs: Tensors, batch_size: int, deadline: float | None,
              scope: CallScope | None = None) -> Steps:  # fmt: skip
        start = time.monotonic_ns()
        tensors = dict(inputs)
        try:
            for wave in self._waves:
                tickets = []
                for index in wave:
                    step_inputs = {member_input: tensors[source]
                                   for member_input, source in self.spec.steps[index].input_map.items()}
                    tickets.append((self._members[index], self._members[index].submit(
                        step_inputs, batch_size, deadline, scope)))
                answers = yield tickets
                for index, outputs in zip(wave, answers):
                    tensors.update({target: outputs[member_output]
                                    for member_output, target in self.spec.steps[index].output_map.items()})
        except Exception:
            self._stats.record_failure(time.monotonic_ns() - start)
            raise
        elapsed = time.monotonic_ns() - start
        # One "execution" per ensemble request; its compute time is the whole pipeline and
        # its own queue time is nil (the waiting happens in the members' queues). The queue
        # count matters: perf_analyzer finds the version it measured by that count rising.
        self._stats.record_batch(batch_size, (0, elapsed, 0), [0], [elapsed])
        return {tensor.name: tensors[tensor.name] for tensor in self.spec.outputs}

    def close(self) -> None:
        """Nothing of its own to stop: its members' batchers are closed as models."""
