"""How models get loaded: at start-up, and by model control while serving.

`load_models` walks the repository's load order (ensemble steps first) at start-up;
`build_version` (also what model control calls) creates the onnxruntime session of one
model version, warms it up, and wraps it in its dynamic batcher (an ensemble: a
scheduler that finds its members in the registry at each request), and prepares the
ModelMetadata / ModelConfig answers once.
"""

from __future__ import annotations

import asyncio
import logging
import time

from ensemble_serving.protocol import model_config_pb2
from server.config import DEFAULT_MAX_QUEUE_SIZE, ServerSettings
from server.errors import InferenceError
from server.models.ensemble import EnsembleScheduler
from server.models.registry import LoadedModel, ModelRegistry
from server.models.repository import ModelSpec, RepositoryError
from server.models.runtime import CUDA, DeviceError, OnnxModel, SessionSettings, session_parameters
from server.models.warmup import warm_up
from server.observability.metrics import ServerMetrics
from server.observability.statistics import ModelStats
from server.scheduling.batcher import BatchingPolicy, DynamicBatcher

log = logging.getLogger(__name__)

EXECUTION_PROVIDER_PARAMETER = "execution_provider"


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
        adaptive_delay=settings.queue_delay == "adaptive",
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


def session_settings(settings: ServerSettings) -> SessionSettings:
    return SessionSettings(settings.device, settings.intra_op_threads, settings.inter_op_threads,
                           settings.spinning, settings.global_thread_pool)


def _load_onnx(spec: ModelSpec, version: str, session_settings: SessionSettings) -> tuple[OnnxModel, float]:
    start = time.perf_counter()
    model = OnnxModel(spec, version, session_settings)
    try:
        warm_up(model)
    except Exception as error:  # a graph that loads but cannot run is a load failure, said in one line
        raise RepositoryError(f"model {spec.name!r} version {version}: warm-up inference failed: {error}") from None
    return model, time.perf_counter() - start


async def load_models(specs: list[ModelSpec], settings: ServerSettings, metrics: ServerMetrics,
                      registry: ModelRegistry | None = None) -> tuple[ModelRegistry, dict[str, str]]:  # fmt: skip
    """Load `specs` in order (dependencies first) into `registry` (a new one by default);
    returns the registry and {name: reason} for each model that did not load. With
    --strict a model that cannot load raises RepositoryError instead; without it, that
    model and any ensemble that needs it are left out and the others load. A DeviceError
    always raises: it concerns every model."""
    registry = ModelRegistry() if registry is None else registry
    failures: dict[str, str] = {}
    for spec in specs:
        broken = [step.model_name for step in spec.steps if step.model_name in failures]
        if broken:
            failures[spec.name] = f"ensemble {spec.name!r} needs model {broken[0]!r}, which failed to load"
            continue
        try:
            for version in spec.versions:
                # In a worker thread: the event loop keeps answering liveness while large models load.
                registry.add(await asyncio.to_thread(build_version, spec, version, registry, settings, metrics))
        except DeviceError:
            raise
        except Exception as error:  # corrupt ONNX, a graph that does not match config.pbtxt, a failing warm-up
            reason = load_failure_reason(spec.name, error)
            for model in registry.remove(spec.name):  # versions loaded before the one that failed
                model.close()
            if settings.strict:
                raise RepositoryError(reason) from None
            failures[spec.name] = reason
    return registry, failures


def load_failure_reason(name: str, error: Exception) -> str:
    """The one line that says why a model did not load."""
    if isinstance(error, (RepositoryError, DeviceError)):
        return str(error)
    if isinstance(error, InferenceError):
        return error.message
    return f"model {name!r}: cannot load: {type(error).__name__}: {error}"


def build_version(spec: ModelSpec, version: str, registry: ModelRegistry, settings: ServerSettings,
                  metrics: ServerMetrics, fingerprint: str = "") -> LoadedModel:  # fmt: skip
    """One version of one model, ready to serve but not yet in `registry`: an ensemble
    (over the members `registry` serves), or an ONNX session, warmed up, behind its
    started batcher. Blocks while the session loads. Its metrics series are created only
    once it has loaded, so that a failed load leaves none behind."""
    stats = ModelStats(spec.name, version)
    if spec.is_ensemble:
        members = [registry.get(step.model_name, step.model_version) for step in spec.steps]
        provider = ",".join(sorted({member.provider for member in members}))
        scheduler = EnsembleScheduler(spec, registry, stats)
        model_metrics = metrics.for_model(spec.name, version)
        model_metrics.record_load(0.0, provider, provider)
        log.info("loaded ensemble %s version %s: steps %s", spec.name, version,
                 " -> ".join(step.model_name for step in spec.steps))
        return LoadedModel(spec, version, scheduler, stats, model_metrics, provider,
                           effective_config(spec, provider, None), fingerprint)
    onnx_model, seconds = _load_onnx(spec, version, session_settings(settings))
    policy = batching_policy(spec, settings)
    model_metrics = metrics.for_model(spec.name, version)
    scheduler = DynamicBatcher(spec.name, version, onnx_model.run, policy, stats, model_metrics)
    scheduler.start()
    model_metrics.record_load(seconds, onnx_model.provider, onnx_model.requested_providers[0])
    log.info("loaded %s version %s on %s in %.2f s (max_batch_size %d, dynamic batching %s, "
             "max queue delay %.0f us (%s rule), queue bound %d, instances %d)", spec.name, version, onnx_model.provider,
             seconds, policy.max_batch_size, "on" if policy.dynamic else "off", policy.max_queue_delay_s * 1e6,
             "adaptive" if policy.adaptive_delay else "triton", policy.max_queue_size, policy.instances)
    tuned = session_parameters(spec)
    if tuned:
        log.info("model %s: session parameters from config.pbtxt: %s", spec.name,
                 ", ".join(f"{key}={value}" for key, value in sorted(tuned.items())))
    return LoadedModel(spec, version, scheduler, stats, model_metrics, onnx_model.provider,
                       effective_config(spec, onnx_model.provider, policy), fingerprint)
