"""Model control: load, reload and unload models while the server serves.

Triton's three modes (--model-control-mode), with its names and semantics:

  none      the models loaded at start-up stay as they are; load and unload calls are
            refused (UNAVAILABLE, as Triton answers).
  poll      every --repository-poll-secs a thread compares the repository's files with
            what it saw last: new models and version folders are loaded, changed ones
            (config.pbtxt, labels, model.onnx) reloaded, removed ones unloaded. Load and
            unload calls are refused, as in Triton.
  explicit  only --load-model at start-up; `load` and `unload` (RepositoryModelLoad /
            RepositoryModelUnload, tritonclient's load_model / unload_model) do the rest.

A (re)load never interrupts service. The versions to serve (config.pbtxt's
version_policy) are built beside the ones serving: sessions created and warmed up
(server/models/warmup.py). Then the registry switches to them in one assignment, and the
versions left out retire: they refuse new leases, finish every request that holds one
(in flight or queued), close their batcher, and drop their metrics series. A load that
fails changes nothing that serves; the reason goes to the log, to
ensemble_server_model_loads_total{outcome="failure"} and to the index.

Ensembles find their members in the registry at each request (server/models/ensemble.py), so
a reloaded member is picked up at once; an unloaded member makes its ensembles
unavailable, with the reason in the index, until it is back (or `unload_dependents`
unloads them too).

The controller knows no protocol: its errors are InferenceError(code, message), and
`index` returns plain `IndexEntry` rows; the gRPC servicer (and an HTTP endpoint) only
translate. Changes happen one at a time, under one lock, as in Triton.
"""

from __future__ import annotations

import ctypes
import logging
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import grpc

from ensemble_serving.model_config import CONFIG_FILENAME, ModelConfig
from server.config import ServerSettings
from server.errors import InferenceError
from server.models.autocomplete import AutoComplete
from server.models.loading import build_version, load_failure_reason
from server.models.model_files import check_name, folder_fingerprint, parse_config, version_fingerprint, write_files
from server.models.registry import LoadedModel, ModelRegistry
from server.models.repository import Repository, RepositoryError, check_ensemble, inside_model_folder, read_model
from server.observability.metrics import ServerMetrics

log = logging.getLogger(__name__)

READY, LOADING, UNLOADING, UNAVAILABLE = "READY", "LOADING", "UNLOADING", "UNAVAILABLE"
FILE_PARAMETER_PREFIX = "file:"  # a load request's model files, as tritonclient sends them


@dataclass(frozen=True)
class IndexEntry:
    """One row of RepositoryIndex: a model version's state ("" version: the model's own)."""

    name: str
    version: str
    state: str
    reason: str = ""


class ModelController:
    def __init__(self, settings: ServerSettings, repository: Repository, registry: ModelRegistry,
                 metrics: ServerMetrics):  # fmt: skip
        self.mode = settings.model_control_mode
        self._settings = settings
        self._root = Path(repository.root)
        self._registry = registry
        self._metrics = metrics
        self._changing = threading.RLock()  # one load or unload at a time
        # {name: {version: (state, reason)}}, version "" for the model as a whole. Replaced,
        # never changed in place, so that `index` reads it without the lock.
        self._states: dict[str, dict[str, tuple[str, str]]] = {}
        self._seen: dict[str, str] = {}  # poll mode: each model folder's fingerprint at the last look
        self._watched: set[str] | None = None  # poll mode with --model: the folders it watches (None: all)
        self._started = False
        self._stop = threading.Event()
        self._poller: threading.Thread | None = None
        # Told (name, serving) after each change: the app points it at grpc.health.v1.
        self.on_model_change: Callable[[str, bool], None] = lambda name, serving: None

    # -- lifecycle ----------------------------------------------------------------------
    def started(self, repository: Repository, failures: dict[str, str]) -> None:
        """Record what start-up loaded and why the others did not; start polling in poll mode."""
        with self._changing:
            for model in self._registry:
                model.fingerprint = version_fingerprint(model.spec.directory, model.version)
                self._set(model.spec.name, model.version, READY)
            for name in self._registry.names():
                self._count_load(name, "success")
            for name, reason in {**repository.errors, **failures}.items():
                self._set(name, "", UNAVAILABLE, reason)
                self._count_load(name, "failure")
            self._started = True
        if self.mode == "poll":
            if self._settings.models:  # --model: watch those (and the members they brought), not the rest
                self._watched = {*self._settings.models, *self._registry.names()}
            self._seen = {name: folder_fingerprint(self._root / name) for name in self._poll_folders()}
            self._poller = threading.Thread(target=self._poll_loop, name="repository-poll", daemon=True)
            self._poller.start()
            log.info("polling %s every %.1f s for model changes", self._root, self._settings.repository_poll_secs)

    def stop(self) -> None:
        self._stop.set()
        if self._poller is not None:
            self._poller.join()

    # -- the calls ----------------------------------------------------------------------
    def load(self, name: str, config_json: str | None = None, files: dict[str, bytes] | None = None) -> None:
        """Load `name` (and any model an ensemble needs), or reload it if it is loaded:
        every version its version_policy selects is built anew beside the serving ones.
        `config_json` (a ModelConfig in JSON) replaces config.pbtxt; `files`
        ({path in the model folder: bytes}, needs `config_json`) replace the folder."""
        self._require_explicit_mode()
        check_name(name, "load")
        override = parse_config(name, config_json) if config_json is not None else None
        if files and override is None:
            raise InferenceError(grpc.StatusCode.INVALID_ARGUMENT,
                                 f"failed to load {name!r}: model files need a 'config' parameter too")
        with self._changing:
            if files:
                with tempfile.TemporaryDirectory(prefix="ensemble-server-load-") as scratch:
                    directory = write_files(Path(scratch) / name, files, override)
                    self._apply(name, directory, override, force=True)
            else:
                self._load_with_members(name, override)
        _return_freed_memory()  # here, once the replaced versions are no longer referenced

    def unload(self, name: str, unload_dependents: bool = False) -> None:
        """Stop serving every version of `name` (after their requests finish); with
        `unload_dependents`, the ensembles that use it too. Without, those ensembles stay
        loaded but unavailable until `name` is back."""
        self._require_explicit_mode()
        check_name(name, "unload")
        with self._changing:
            if name not in self._registry.names() and not (self._root / name).is_dir():
                raise InferenceError(grpc.StatusCode.NOT_FOUND, f"failed to unload {name!r}: no such model "
                                     f"(models in the repository: {', '.join(self._folders()) or 'none'})")
            self._unload(name)
            if unload_dependents:
                for dependent in self._dependents(name):
                    self._unload(dependent)
        _return_freed_memory()

    def index(self, ready_only: bool = False) -> list[IndexEntry]:
        """Every model of the repository and every version served, with its state."""
        if not self._started:
            return self._starting_index()
        states = self._states
        entries = []
        for name in sorted({*self._folders(), *self._registry.names(), *states}):
            for version, (state, reason) in sorted(states.get(name, {}).items(), key=_version_key):
                served = self._registry.versions(name).get(version)
                if state == READY and served is not None and served.unready_reason():
                    state, reason = UNAVAILABLE, served.unready_reason()
                entries.append(IndexEntry(name, version, state, reason))
            if name not in states:
                entries.append(IndexEntry(name, "", UNAVAILABLE, self._not_loaded_reason()))
        return [entry for entry in entries if entry.state == READY] if ready_only else entries

    def _starting_index(self) -> list[IndexEntry]:
        """While start-up loads: every model LOADING (those with versions loaded, per version)."""
        entries = []
        for name in sorted({*self._folders(), *self._registry.names()}):
            versions = sorted(self._registry.versions(name), key=int) or [""]
            entries.extend(IndexEntry(name, version, LOADING, "the server is starting") for version in versions)
        return entries

    # -- loading ------------------------------------------------------------------------
    def _load_with_members(self, name: str, override: ModelConfig | None) -> None:
        """An ensemble's members are loaded first when they are not served yet (as Triton does)."""
        spec = self._read(name, self._model_folder(name), override, check_steps=False)
        for step in spec.steps:
            if not self._registry.versions(step.model_name):
                self._load_with_members(step.model_name, None)
        self._apply(name, spec.directory, override, force=True)

    def _apply(self, name: str, directory: Path, override: ModelConfig | None, force: bool) -> None:
        """Make the served versions of `name` what its folder (or `override`) says. With
        `force` every version is rebuilt; without (poll mode), only those whose files changed.
        Raises InferenceError when it fails, with nothing served changed."""
        started = time.perf_counter()
        spec = self._read(name, directory, override)
        current = self._registry.versions(name)
        wanted: dict[str, LoadedModel] = {}
        built: list[LoadedModel] = []
        for version in spec.versions:
            fingerprint = version_fingerprint(directory, version) + ("+override" if override else "")
            old = current.get(version)
            if old is not None and not force and old.fingerprint == fingerprint:
                wanted[version] = old
                continue
            if old is None:
                self._set(name, version, LOADING)  # a reloaded version stays READY: it serves meanwhile
            try:
                model = build_version(spec, version, self._registry, self._settings, self._metrics, fingerprint)
            except Exception as error:  # corrupt ONNX, a config the graph does not match, a failing warm-up
                self._discard(built, current)
                raise self._failed(name, version, load_failure_reason(name, error), current) from None
            built.append(model)
            wanted[version] = model
        self._switch(name, current, wanted)
        self._count_load(name, "success")
        log.info("model %s: serving version(s) %s (%s in %.2f s)", name, ", ".join(sorted(wanted, key=int)),
                 "reloaded" if current else "loaded", time.perf_counter() - started)

    def _read(self, name: str, directory: Path, override: ModelConfig | None, check_steps: bool = True):
        """The model's spec; an ensemble's steps checked against the members served."""
        try:
            spec = read_model(directory, override, AutoComplete.from_settings(self._settings))
            if spec.is_ensemble and check_steps:
                check_ensemble(spec, {step.model_name: self._registry.get(step.model_name).spec
                                      for step in spec.steps if self._registry.versions(step.model_name)})
            return spec
        except RepositoryError as error:
            raise self._failed(name, "", str(error), self._registry.versions(name)) from None

    def _switch(self, name: str, current: dict[str, LoadedModel], wanted: dict[str, LoadedModel]) -> None:
        """Serve `wanted` from now on; retire what it leaves out (after its last request)."""
        self._registry.set_versions(name, wanted)
        self.on_model_change(name, True)
        _rebind_pending(wanted.values())
        self._replace_states(name, {version: (READY, "") for version in wanted})
        for version, old in current.items():
            if wanted.get(version) is not old:
                self._retire(old, still_served=version in wanted)

    def _failed(self, name: str, version: str, reason: str, current: dict[str, LoadedModel]) -> InferenceError:
        """Record a failed load (log, metric, index) and return the error to raise."""
        log.error("model %s failed to load%s: %s", name, " (the versions loaded before keep serving)" if current
                  else "", reason)
        self._count_load(name, "failure")
        self._metrics.load_failures.labels(model=name).inc()
        if current:  # what served goes on serving; its rows say what failed
            states = {served: (READY, f"serving; the last load failed: {reason}") for served in current}
            if version and version not in current:
                states[version] = (UNAVAILABLE, reason)
        else:
            states = {version: (UNAVAILABLE, reason)}
        self._replace_states(name, states)
        return InferenceError(grpc.StatusCode.INTERNAL, f"failed to load {name!r}: {reason}")

    def _discard(self, built: list[LoadedModel], current: dict[str, LoadedModel]) -> None:
        """Versions built by a load that then failed: never served, closed at once."""
        for model in built:
            model.close()
            if model.version not in current:
                model.metrics.remove()
        _rebind_pending(current.values())

    # -- unloading ----------------------------------------------------------------------
    def _unload(self, name: str) -> None:
        current = self._registry.versions(name)
        self._registry.set_versions(name, {})
        self.on_model_change(name, False)
        for model in current.values():
            self._retire(model, still_served=False)
        self._replace_states(name, {version: (UNAVAILABLE, "unloaded") for version in current} or
                             {"": (UNAVAILABLE, "unloaded")})
        self._metrics.loaded_versions.labels(model=name).set(0)
        self._metrics.model_unloads.labels(model=name, outcome="success").inc()
        log.info("model %s: unloaded%s", name, f" (versions {', '.join(sorted(current, key=int))})" if current else "")

    def _retire(self, model: LoadedModel, still_served: bool) -> None:
        """A version no longer handed out: show it UNLOADING until its last request has
        finished, then close it. Its metrics series go unless the same version number
        serves on (a reload shares the series)."""
        name, version = model.spec.name, model.version
        if not still_served:
            self._replace_states(name, {**self._states.get(name, {}), version: (UNLOADING, "")})
        model.retire()
        if not still_served:
            model.metrics.remove()
            self._replace_states(name, {**self._states.get(name, {}), version: (UNAVAILABLE, "unloaded")})

    def _dependents(self, name: str) -> list[str]:
        return sorted({model.spec.name for model in self._registry
                       if model.spec.is_ensemble and name in model.spec.dependencies()})  # fmt: skip

    # -- poll mode ----------------------------------------------------------------------
    def _poll_loop(self) -> None:
        while not self._stop.wait(self._settings.repository_poll_secs):
            try:
                self.poll_once()
            except Exception:  # a bug in one poll must not end polling
                log.exception("repository poll failed")
            _return_freed_memory()

    def poll_once(self) -> None:
        """Load what is new, reload what changed, unload what was removed (members before
        ensembles, so that an ensemble checks against its members' new versions)."""
        with self._changing:
            now = {name: folder_fingerprint(self._root / name) for name in self._poll_folders()}
            for name in sorted(set(self._seen) - set(now)):
                if self._registry.versions(name):
                    self._unload(name)
            changed = [name for name, fingerprint in now.items() if self._seen.get(name) != fingerprint]
            self._seen = now
            for name in sorted(changed, key=self._is_ensemble):
                try:
                    self._apply(name, self._root / name, None, force=False)
                except InferenceError as error:
                    log.warning("poll: %s", error.message)

    def _poll_folders(self) -> list[str]:
        return [name for name in self._folders() if self._watched is None or name in self._watched]

    def _is_ensemble(self, name: str) -> bool:
        try:
            return "ensemble_scheduling" in (self._root / name / CONFIG_FILENAME).read_text(errors="replace")
        except OSError:
            return False

    # -- helpers ------------------------------------------------------------------------
    def _require_explicit_mode(self) -> None:
        if self.mode != "explicit":
            # Triton answers UNAVAILABLE ("explicit model load / unload is not allowed if
            # polling is enabled") in modes none and poll alike; we say which mode it is.
            raise InferenceError(grpc.StatusCode.UNAVAILABLE,
                                 f"explicit model load / unload is not allowed in model control mode "
                                 f"{self.mode!r}; start the server with --model-control-mode explicit")

    def _model_folder(self, name: str) -> Path:
        directory = self._root / name
        try:
            if directory.is_dir():
                return inside_model_folder(directory, self._root, "folder", name)
        except RepositoryError:  # a link out of the repository
            pass
        raise InferenceError(grpc.StatusCode.NOT_FOUND, f"failed to load {name!r}: no such model in "
                             f"{self._root} (found: {', '.join(self._folders()) or 'none'})")

    def _folders(self) -> list[str]:
        try:
            return sorted(child.name for child in self._root.iterdir()
                          if child.is_dir() and not child.name.startswith("."))  # fmt: skip
        except OSError:
            return []

    def _not_loaded_reason(self) -> str:
        if self.mode == "explicit":
            return "not loaded (load it with RepositoryModelLoad)"
        return "not loaded (not selected with --model)"

    def _set(self, name: str, version: str, state: str, reason: str = "") -> None:
        self._replace_states(name, {**self._states.get(name, {}), version: (state, reason)})

    def _replace_states(self, name: str, states: dict[str, tuple[str, str]]) -> None:
        self._states = {**self._states, name: states}
        why = next((reason for state, reason in states.values() if state == UNAVAILABLE), "")
        self._registry.note_unavailable(name, why)  # what a request for it is told while nothing serves

    def _count_load(self, name: str, outcome: str) -> None:
        self._metrics.model_loads.labels(model=name, outcome=outcome).inc()
        if outcome == "success":
            self._metrics.loaded_versions.labels(model=name).set(len(self._registry.versions(name)))


def _return_freed_memory() -> None:
    """Ask glibc to hand the freed heap back to the system: without it, a released
    session's pages stay in the process (RSS) until later allocations reuse them."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _load_libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (macOS, musl): nothing to trim
        return None


_LIBC = _load_libc()


def _rebind_pending(models) -> None:
    """Point each served batcher's pending-requests gauge back at it (a reload of the
    same version number shares the gauge with the build that replaced or failed it)."""
    for model in models:
        report = getattr(model.scheduler, "report_pending", None)
        if report is not None:
            report()


def _version_key(item) -> tuple[int, str]:
    version = item[0]
    return (int(version), "") if version.isdigit() else (-1, version)
