"""The loaded models, by name and version (server/models/loading.py loads them).

A `LoadedModel` is one version ready to serve: its scheduler (a dynamic batcher, or an
ensemble's), statistics, metrics and the ModelConfig answer. Requests hold a lease on the
version they use (`ModelRegistry.acquire`), so that a replaced version is closed only
after its last request.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field

import grpc

from ensemble_serving.protocol import grpc_service_pb2 as pb
from ensemble_serving.protocol import model_config_pb2
from server.errors import InferenceError
from server.models.repository import ModelSpec
from server.observability.metrics import ModelMetrics
from server.observability.statistics import ModelStats
from server.scheduling.steps import Scheduler

log = logging.getLogger(__name__)


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
        self._unavailable: dict[str, str] = {}  # name -> why it serves no version (a failed load, unloaded)
        self._writing = threading.Lock()

    def note_unavailable(self, name: str, reason: str) -> None:
        """Why `name` serves no version ("" to forget): model control tells it, requests read it."""
        with self._writing:
            unavailable = {key: value for key, value in self._unavailable.items() if key != name}
            self._unavailable = {**unavailable, name: reason} if reason else unavailable

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
            reason = self._unavailable.get(name)
            if reason:  # known to the repository, but it failed to load or was unloaded
                raise InferenceError(grpc.StatusCode.NOT_FOUND,
                                     f"Request for unknown model: {name!r} has no available versions ({reason})")
            available = ", ".join(sorted(models)) or "none"
            # Triton's wording first (clients match on "Request for unknown model"), ours after.
            raise InferenceError(grpc.StatusCode.NOT_FOUND,
                                 f"Request for unknown model: {name!r} is not found (models served: {available})")
        if not version:
            return versions[max(versions, key=int)]
        model = versions.get(version)
        if model is None:
            raise InferenceError(grpc.StatusCode.NOT_FOUND,
                                 f"Request for unknown model: {name!r} version {version} is not found "
                                 f"(versions served: {', '.join(sorted(versions, key=int))})")
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
