"""The loaded models, by name and version, and how they get loaded.

`load_models` walks the repository's load order (ensemble steps first), creates an
onnxruntime session per ONNX model version (in a worker thread, so the event loop
keeps answering liveness and readiness while large models load), wraps each in its
dynamic batcher, wires ensembles to their members' batchers, and prepares the
ModelMetadata / ModelConfig answers once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

import grpc

from ensemble_serving.protocol import grpc_service_pb2 as pb
from ensemble_serving.protocol import model_config_pb2
from server.batcher import BatchingPolicy, DynamicBatcher
from server.config import DEFAULT_MAX_QUEUE_SIZE, ServerSettings
from server.ensemble import EnsembleScheduler
from server.scheduling import Scheduler
from server.metrics import ModelMetrics, ServerMetrics
from server.request_codec import InferenceError
from server.repository import ModelSpec, RepositoryError
from server.runtime import CUDA, DeviceError, OnnxModel, SessionSettings
from server.statistics import ModelStats

log = logging.getLogger(__name__)

EXECUTION_PROVIDER_PARAMETER = "execution_provider"


@dataclass
class LoadedModel:
    spec: ModelSpec
    version: str
    scheduler: Scheduler
    stats: ModelStats
    metrics: ModelMetrics
    provider: str  # the execution provider it runs on (an ensemble: its members')
    config: model_config_pb2.ModelConfig  # as served by ModelConfig: the effective settings

    def close(self) -> None:
        self.scheduler.close()


class ModelRegistry:
    def __init__(self) -> None:
        self._models: dict[str, dict[str, LoadedModel]] = {}

    def add(self, model: LoadedModel) -> None:
        self._models.setdefault(model.spec.name, {})[model.version] = model

    def names(self) -> list[str]:
        return sorted(self._models)

    def remove(self, name: str) -> list[LoadedModel]:
        """Forget every version of `name` (a model whose later version failed to load)."""
        return list(self._models.pop(name, {}).values())

    def versions(self, name: str) -> dict[str, LoadedModel]:
        return self._models.get(name, {})

    def __iter__(self):
        for name in self.names():
            yield from self._models[name].values()

    def get(self, name: str, version: str = "") -> LoadedModel:
        """The model version a request names ("" = the latest); NOT_FOUND otherwise."""
        versions = self._models.get(name)
        if not versions:
            available = ", ".join(self.names()) or "none"
            raise InferenceError(grpc.StatusCode.NOT_FOUND,
                                 f"unknown model {name!r}; models served: {available}")
        if not version:
            return versions[max(versions, key=int)]
        model = versions.get(version)
        if model is None:
            raise InferenceError(grpc.StatusCode.NOT_FOUND,
                                 f"model {name!r} has no version {version!r}; versions served: "
                                 f"{', '.join(sorted(versions, key=int))}")
        return model

    def metadata(self, name: str, version: str = "") -> pb.ModelMetadataResponse:
        model = self.get(name, version)
        spec = model.spec
        return pb.ModelMetadataResponse(
            name=spec.name,
            versions=sorted(self.versions(name), key=int),
            platform=spec.platform,
            inputs=[pb.ModelMetadataResponse.TensorMetadata(name=t.name, datatype=t.datatype,
                                                            shape=t.shape(spec.batching)) for t in spec.inputs],
            outputs=[pb.ModelMetadataResponse.TensorMetadata(name=t.name, datatype=t.datatype,
                                                             shape=t.shape(spec.batching)) for t in spec.outputs],
        )

    def close(self) -> None:
        for model in self:
            model.close()


def batching_policy(spec: ModelSpec, settings: ServerSettings) -> BatchingPolicy:
    """config.pbtxt's dynamic_batching, with the command line's overrides."""
    config = spec.config
    has_dynamic = config.WhichOneof("scheduling_choice") == "dynamic_batching"
    delay_us = config.dynamic_batching.max_queue_delay_microseconds
    if settings.max_queue_delay_us is not None:
        delay_us = settings.max_queue_delay_us
    queue_size = settings.max_queue_size or config.dynamic_batching.default_queue_policy.max_queue_size
    instances = sum(group.count or 1 for group in config.instance_group) or 1
    return BatchingPolicy(
        max_batch_size=config.max_batch_size,
        max_queue_delay_s=delay_us / 1e6,
        max_queue_size=queue_size or DEFAULT_MAX_QUEUE_SIZE,
        dynamic=settings.dynamic_batching and has_dynamic and config.max_batch_size > 0,
        instances=instances,
    )


def effective_config(spec: ModelSpec, provider: str, policy: BatchingPolicy | None) -> model_config_pb2.ModelConfig:
    """The config as served: Triton-style completed (backend, instance_group), the
    batching actually applied, and the execution provider in `parameters`."""
    config = model_config_pb2.ModelConfig()
    config.CopyFrom(spec.config)
    if not spec.is_ensemble:
        config.platform = config.platform or "onnxruntime_onnx"
        config.backend = config.backend or "onnxruntime"
        kind = (model_config_pb2.ModelInstanceGroup.KIND_GPU if provider == CUDA
                else model_config_pb2.ModelInstanceGroup.KIND_CPU)
        if not config.instance_group:
            config.instance_group.add(name=spec.name, kind=kind, count=1)
        else:
            for group in config.instance_group:
                group.kind = kind
    if policy is not None:
        if policy.dynamic:
            config.dynamic_batching.max_queue_delay_microseconds = round(policy.max_queue_delay_s * 1e6)
        elif config.HasField("dynamic_batching"):
            config.ClearField("dynamic_batching")
    config.parameters[EXECUTION_PROVIDER_PARAMETER].string_value = provider
    return config


def _load_onnx(spec: ModelSpec, version: str, session_settings: SessionSettings) -> tuple[OnnxModel, float]:
    start = time.perf_counter()
    model = OnnxModel(spec, version, session_settings)
    try:
        model.warm_up()
    except Exception as error:  # a graph that loads but cannot run is a load failure, said in one line
        raise RepositoryError(f"model {spec.name!r} version {version}: warm-up inference failed: {error}") from None
    return model, time.perf_counter() - start


async def load_models(specs: list[ModelSpec], settings: ServerSettings,
                      metrics: ServerMetrics) -> tuple[ModelRegistry, dict[str, str]]:  # fmt: skip
    """Load `specs` in order (dependencies first); returns the registry and {name: reason}
    for each model that did not load. With --strict a model that cannot load raises
    RepositoryError instead; without it, that model and any ensemble that needs it are
    left out and the others load. A DeviceError always raises: it concerns every model."""
    registry = ModelRegistry()
    failures: dict[str, str] = {}
    session_settings = SessionSettings(settings.device, settings.intra_op_threads, settings.inter_op_threads,
                                       settings.spinning, settings.global_thread_pool)
    for spec in specs:
        broken = [step.model_name for step in spec.steps if step.model_name in failures]
        if broken:
            failures[spec.name] = f"ensemble {spec.name!r} needs model {broken[0]!r}, which failed to load"
            continue
        try:
            for version in spec.versions:
                registry.add(await _load_version(spec, version, registry, settings, session_settings, metrics))
        except DeviceError:
            raise
        except Exception as error:  # corrupt ONNX, a graph that does not match config.pbtxt, a failing warm-up
            reason = str(error) if isinstance(error, RepositoryError) else (
                f"model {spec.name!r}: cannot load: {type(error).__name__}: {error}")
            for model in registry.remove(spec.name):  # versions loaded before the one that failed
                model.close()
            if settings.strict:
                raise RepositoryError(reason) from None
            failures[spec.name] = reason
    return registry, failures


async def _load_version(spec: ModelSpec, version: str, registry: ModelRegistry, settings: ServerSettings,
                        session_settings: SessionSettings, metrics: ServerMetrics) -> LoadedModel:  # fmt: skip
    """One version of one model: an ensemble over its members' batchers (already in
    `registry`), or an ONNX session (created in a worker thread) behind its batcher."""
    model_metrics = metrics.for_model(spec.name, version)
    stats = ModelStats(spec.name, version)
    if spec.is_ensemble:
        members = [registry.get(step.model_name, step.model_version) for step in spec.steps]
        provider = ",".join(sorted({member.provider for member in members}))
        scheduler = EnsembleScheduler(spec, [member.scheduler for member in members], stats)
        model_metrics.record_load(0.0, provider, provider)
        log.info("loaded ensemble %s version %s: steps %s", spec.name, version,
                 " -> ".join(step.model_name for step in spec.steps))
        return LoadedModel(spec, version, scheduler, stats, model_metrics, provider,
                           effective_config(spec, provider, None))
    onnx_model, seconds = await asyncio.to_thread(_load_onnx, spec, version, session_settings)
    policy = batching_policy(spec, settings)
    scheduler = DynamicBatcher(spec.name, version, onnx_model.run, policy, stats, model_metrics)
    scheduler.start()
    model_metrics.record_load(seconds, onnx_model.provider, onnx_model.requested_providers[0])
    log.info("loaded %s version %s on %s in %.2f s (max_batch_size %d, dynamic batching %s, "
             "max queue delay %.0f us, queue bound %d, instances %d)", spec.name, version, onnx_model.provider,
             seconds, policy.max_batch_size, "on" if policy.dynamic else "off",
             policy.max_queue_delay_s * 1e6, policy.max_queue_size, policy.instances)
    return LoadedModel(spec, version, scheduler, stats, model_metrics, onnx_model.provider,
                       effective_config(spec, onnx_model.provider, policy))
