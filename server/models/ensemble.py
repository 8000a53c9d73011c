"""Ensemble models (platform "ensemble"): run the steps of ensemble_scheduling.

Each step hands some ensemble tensors to another model and names its outputs as new
ensemble tensors. Steps whose inputs are all available run together (a wave): every
step of a wave is submitted to its model's batcher before the first answer is awaited,
so the members of an averaging ensemble run at the same time and the average runs after
them. Each step goes through that model's own batcher: concurrent ensemble requests are
batched per member, exactly as direct requests to the member would be. The members are
looked up in the registry at each request (see EnsembleScheduler), so model control can
replace or unload them without rebuilding the ensemble.
"""

from __future__ import annotations

import time

import grpc

from server.errors import InferenceError
from server.models.registry import ModelRegistry
from server.models.repository import ModelSpec
from server.observability import tracing
from server.observability.statistics import ModelStats
from server.scheduling.batcher import CallScope, DynamicBatcher, Steps, Tensors


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
    """Runs the steps on whichever versions of its members the registry serves at the
    time of each request: a reloaded member is picked up by the next request, and a
    member that is unloaded makes the ensemble unavailable (with the reason) until it
    is back. Each request leases its members for its whole run, so that a member
    version replaced meanwhile finishes this request first."""

    def __init__(self, spec: ModelSpec, registry: ModelRegistry, stats: ModelStats):
        self.spec = spec
        self._registry = registry
        self._waves = _waves(spec)
        self._stats = stats

    def missing_members(self) -> str:
        """Why the ensemble cannot run now ("" when every step's model is served)."""
        for step in self.spec.steps:
            try:
                self._registry.get(step.model_name, step.model_version)
            except InferenceError as error:
                return f"ensemble {self.spec.name!r} needs model {step.model_name!r}: {error.message}"
        return ""

    def _lease_members(self) -> list:
        leased = []
        try:
            for step in self.spec.steps:
                leased.append(self._registry.acquire(step.model_name, step.model_version))
        except InferenceError as error:
            for member in leased:
                member.release()
            raise InferenceError(grpc.StatusCode.UNAVAILABLE, f"ensemble {self.spec.name!r} is not ready: it "
                                 f"needs model {step.model_name!r}: {error.message}") from None
        return leased

    def steps(self, inputs: Tensors, batch_size: int, deadline: float | None,
              scope: CallScope | None = None) -> Steps:  # fmt: skip
        start = time.monotonic_ns()
        members = self._lease_members()
        try:
            tensors = yield from self._run_steps([member.scheduler for member in members], inputs, batch_size,
                                                 deadline, scope)  # fmt: skip
        except Exception:
            self._stats.record_failure(time.monotonic_ns() - start)
            raise
        finally:
            for member in members:
                member.release()
        elapsed = time.monotonic_ns() - start
        # One "execution" per ensemble request; its compute time is the whole pipeline and
        # its own queue time is nil (the waiting happens in the members' queues). The queue
        # count matters: perf_analyzer finds the version it measured by that count rising.
        self._stats.record_batch(batch_size, (0, elapsed, 0), [0], [elapsed])
        return {tensor.name: tensors[tensor.name] for tensor in self.spec.outputs}

    def _run_steps(self, batchers: list[DynamicBatcher], inputs: Tensors, batch_size: int, deadline: float | None,
                   scope: CallScope | None) -> Steps:  # fmt: skip
        """Every wave's tickets submitted at once, then yielded to wait for; returns every tensor."""
        tensors = dict(inputs)
        request_span = scope.trace if scope is not None else None
        tracer = tracing.active if request_span is not None else None  # None unless this request is traced
        for wave in self._waves:
            tickets = []
            spans = [] if tracer is None else [
                tracer.start_step(request_span, self.spec.name, batchers[index].name, batchers[index].version)
                for index in wave]  # fmt: skip
            try:
                for position, index in enumerate(wave):
                    step_inputs = {member_input: tensors[source]
                                   for member_input, source in self.spec.steps[index].input_map.items()}
                    step_span = spans[position] if spans else None
                    tickets.append((batchers[index],
                                    batchers[index].submit(step_inputs, batch_size, deadline, scope, step_span)))
                answers = yield tickets
            except BaseException as error:  # also GeneratorExit: an abandoned request ends its steps' spans
                if spans:
                    tracer.end_steps(spans, error)
                raise
            if spans:
                tracer.end_steps(spans, None)
            for index, outputs in zip(wave, answers):
                tensors.update({target: outputs[member_output]
                                for member_output, target in self.spec.steps[index].output_map.items()})
        return tensors

    def close(self) -> None:
        """Nothing of its own to stop: its members' batchers are closed as models."""
