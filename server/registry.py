"""The loaded models, by name and version, and how they get loaded.

`load_models` walks the repository's load order (ensemble steps first) at start-up;
`build_version` (also what model control calls) creates the onnxruntime session of one
model version, warms it up, and wraps it in its dynamic batcher (an ensemble: a
scheduler that finds its members in the registry at each request), and prepares the
ModelMetadata / ModelConfig answers once. Requests hold a lease on the version they
use (`ModelRegistry.acquire`), so that a replaced version is closed only after its
last request.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass, field

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
from server.runtime import CUDA, DeviceError, OnnxModel, SessionSettings, session_parameters
from server.statistics import ModelStats
from server.warmup import warm_up

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
    fingerprint: str = ""  # of the files it was loaded from (poll mode reloads when they change)
    # Leases: every request holds one while it uses the model, so that a replaced or
    # unloaded version finishes its requests before its scheduler closes.
    _users: int = field(default=0, repr=False)
    _retiring: bool = field(default=False, repr=False)
    _idle: threading.Condition = field(default_factory=threading.Condition, repr=False)

    def lease(self) -> bool:
        """Count one more user; False once the model is retiring (look it up again)."""
        with self._idle:
            if self._retiring:
                return False
            self._users += 1
            return True

    def release(self) -> None:
        with self._idle:
            self._users -= 1
            if self._users == 0:
                self._idle.notify_all()

    def retire(self) -> None:
        """Refuse new leases, wait for the last user to finish, then close the scheduler.
        Call it after the registry stopped handing the model out."""
        with self._idle:
            self._retiring = True
            self._idle.wait_for(lambda: self._users == 0)
        self.close()

    def unready_reason(self) -> str:
        """Why the model cannot serve now ("" when it can): an ensemble whose member is missing."""
        missing = getattr(self.scheduler, "missing_members", None)
        return missing() if missing else ""

    def close(self) -> None:
        self.scheduler.close()


class ModelRegistry:
    """The served models by name and version.

    Requests read it from many threads while model control changes it: every change
    builds new dicts and swaps them in with one assignment (copy-on-write), so a reader
    that took `self._models` once sees one consistent state without taking a lock.
    """

    def __init__(self) -> None:
        self._models: dict[str, dict[str, LoadedModel]] = {}
        self._writing = threading.Lock()

    def add(self, model: LoadedModel) -> None:
        with self._writing:
            versions = {**self._models.get(model.spec.name, {}), model.version: model}
            self._models = {**self._models, model.spec.name: versions}

    def set_versions(self, name: str, versions: dict[str, LoadedModel]) -> None:
        """Serve exactly `versions` of `name` from now on (none: forget the name)."""
        with self._writing:
            models = dict(self._models)
            if versions:
                models[name] = dict(versions)
            else:
                models.pop(name, None)
            self._models = models

    def names(self) -> list[str]:
        return sorted(self._models)

    def remove(self, name: str) -> list[LoadedModel]:
        """Forget every version of `name` (a model whose later version failed to load)."""
        removed = list(self._models.get(name, {}).values())
        self.set_versions(name, {})
        return removed

    def versions(self, name: str) -> dict[str, LoadedModel]:
        return self._models.get(name, {})

    def __iter__(self):
        models = self._models
        for name in sorted(models):
            yield from models[name].values()

    def get(self, name: str, version: str = "") -> LoadedModel:
        """The model version a request names ("" = the highest served); NOT_FOUND otherwise."""
        models = self._models
        versions = models.get(name)
        if not versions:
            available = ", ".join(sorted(models)) or "none"
            raise InferenceError(grpc.StatusCode.NOT_FOUND,
                                 f"unknown model {name!r}; models served: {available}")
        if not version:
            return versions[max(versions, key=int)]
        model = versions.get(version)
        if model is None:
            raise InferenceError(grpc.StatusCode.NOT_FOUND,
                                 f"model {name!r} has no version {version!r} loaded; versions served: "
                                 f"{', '.join(sorted(versions, key=int))}")
        return model

    def acquire(self, name: str, version: str = "") -> LoadedModel:
        """`get`, with a lease the caller must `release()`. A version retired between the
        look-up and the lease has already been replaced in the registry: look again."""
        while True:
            model = self.get(name, version)
            if model.lease():
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
