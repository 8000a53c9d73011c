"""Wire the server together and run its lifecycle.

  start:    read the repository, check the device, open the metrics port, start gRPC
            and HTTP (live at once, not ready), load the models (members before
            ensembles), then turn ready (ServerReady, ModelReady, /v2/health/ready,
            grpc.health.v1 SERVING).
  SIGTERM / SIGINT:  turn not-ready, answer new inference requests UNAVAILABLE (HTTP 503),
            let the requests in flight on either protocol finish (up to --grace-period),
            stop HTTP and gRPC, exit 0. A second signal exits at once.

A problem found before serving (bad repository, `--device cuda` without CUDA, a port
in use, a bad TLS or token setting, no model loadable) is a `StartupError`: one line,
exit status 2. A model that fails to load is one too with --strict; without it, that
model is logged (one line), counted (ensemble_server_model_load_failures_total), shown
UNAVAILABLE in RepositoryIndex, and the others serve.

After start-up, server/models/control.py changes the models served: never (mode none,
the default), from the repository's changes (poll), or on load / unload calls (explicit).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc

from ensemble_serving.protocol import grpc_service_pb2_grpc as pb_grpc
from server.config import ServerSettings
from server.inference.service import InferenceService, ServerState
from server.models.autocomplete import AutoComplete
from server.models.control import ModelController
from server.models.loading import load_models
from server.models.registry import ModelRegistry
from server.models.repository import (
    ModelSpec,
    Repository,
    RepositoryError,
    load_order,
    load_order_skipping_broken,
    scan_repository,
)
from server.models.runtime import DeviceError, choose_providers
from server.observability.health import HealthReporter, enable_reflection
from server.observability import tracing
from server.observability.metrics import ServerMetrics
from server.process.siblings import SiblingStatistics
from server.process.worker_role import WorkerRole
from server.transport.grpc_servicer import InferenceServicer
from server.transport.http_app import HttpApp
from server.transport.http_server import HttpEndpoint
from server.transport.security import (
    AUTH_TOKENS_ENV,
    BearerTokenInterceptor,
    SecurityConfigError,
    TokenCheck,
    load_auth_tokens,
    server_credentials,
)

log = logging.getLogger("server")

# After in-flight inference has finished, how long other RPCs (health watches,
# metadata calls) get before gRPC cancels them.
FINAL_STOP_GRACE_S = 1.0
# Each call holds a worker thread until it is answered (threads start on demand).
# --max-concurrent-rpcs, when set, answers RESOURCE_EXHAUSTED beyond its limit.
GRPC_WORKER_THREADS = 512


class StartupError(Exception):
    """The server cannot start; the message says why."""


def _grpc_options(settings: ServerSettings, role: WorkerRole | None) -> list[tuple[str, int]]:
    return [
        ("grpc.max_send_message_length", settings.max_message_size),
        ("grpc.max_receive_message_length", settings.max_message_size),
        # A single server fails on a port already in use instead of silently sharing it with
        # another process; workers share theirs (the supervisor checked it was free).
        ("grpc.so_reuseport", int(role is not None)),
    ]


def _install_signal_handlers(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()

    def on_signal(signum: int) -> None:
        name = signal.Signals(signum).name
        if stop.is_set():
            log.warning("second %s: exiting now without draining", name)
            os._exit(1)
        log.info("%s received: shutting down", name)
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)


@dataclass(frozen=True)
class Security:
    """TLS and bearer tokens, as both transports apply them."""

    grpc_credentials: grpc.ServerCredentials | None  # None: plaintext
    tokens: TokenCheck | None  # None: no authentication
    sibling_secret: str | None = None  # --workers: the calls between workers carry it instead of a token

    def grpc_interceptors(self) -> list:
        return [] if self.tokens is None else [BearerTokenInterceptor(self.tokens, self.sibling_secret)]


def _security(settings: ServerSettings, metrics: ServerMetrics, role: WorkerRole | None) -> Security:
    """TLS credentials and token checking from the settings."""
    if settings.tls_client_ca and not settings.tls_cert:
        raise SecurityConfigError("--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key")
    if bool(settings.tls_cert) != bool(settings.tls_key):
        raise SecurityConfigError("--tls-cert and --tls-key go together")
    credentials = None
    if settings.tls_cert:
        credentials = server_credentials(settings.tls_cert, settings.tls_key, settings.tls_client_ca)
    tokens = load_auth_tokens(settings.auth_tokens_file, os.environ.get(AUTH_TOKENS_ENV))
    check = None
    if tokens:
        check = TokenCheck(tokens, on_reject=lambda reason: metrics.unauthenticated.labels(reason=reason).inc())
    log.info("security (gRPC and HTTP): %s; %s",
             "plaintext" if credentials is None else
             "TLS with client certificates required (mutual TLS)" if settings.tls_client_ca else "TLS",
             f"bearer tokens required ({len(tokens)} accepted; health checks open)" if tokens else "no authentication")
    return Security(credentials, check, role.secret if role is not None else None)


async def serve(settings: ServerSettings, role: WorkerRole | None = None) -> None:
    """Run one server (or, with `role`, one worker of `--workers N`) until a signal stops it."""
    repository, specs, failures = _plan(settings)
    names = [spec.name for spec in specs]
    tracing.start(settings.trace_rate, {"ensemble_serving.worker": role.index} if role is not None else None)
    metrics = ServerMetrics(multiprocess=role is not None)
    state = ServerState()
    state.controller = ModelController(settings, repository, state.registry, metrics)
    siblings = SiblingStatistics(role) if role is not None else None
    service = InferenceService(state, metrics, siblings)
    # A restarted worker listens only once it can serve: until then the kernel gives the
    # shared ports' new connections to its siblings (server/process/supervisor.py).
    listen_late = role is not None and role.replacement
    ports = None
    try:
        if not listen_late:
            ports = await _listen(settings, service, role, state, names)
        log.info("%s; loading %d model(s) from %s: %s",
                 "not listening until loaded (a restarted worker)" if ports is None else
                 f"{ports.describe()} (live, not ready)", len(names), settings.model_repository, ", ".join(names))
        stop = asyncio.Event()
        _install_signal_handlers(stop)
        started = time.perf_counter()
        loaded = await _load_unless_stopped(specs, settings, metrics, state.registry, stop)
        if loaded is None:  # a signal during loading: leave without serving
            return
        load_failures = loaded[1]  # the models are in state.registry
        names = _report_load_failures({**failures, **load_failures}, names, repository, metrics, settings)
        state.controller.started(repository, {**failures, **load_failures})
        state.ready = True
        if ports is None:  # ready before its first connection can arrive
            ports = await _listen(settings, service, role, state, names)
            log.info("%s", ports.describe())
        metrics.ready.set(1)
        ports.health.serving(names)
        log.info("ready: %d model(s) loaded in %.1f s", len(names), time.perf_counter() - started)

        await stop.wait()
        await _drain(state, settings.grace_period_s, ports.health, metrics)
    finally:
        await asyncio.to_thread(state.controller.stop)
        if ports is not None:
            await ports.stop()
        await asyncio.to_thread(state.registry.close)
        state.shared_memory.close()  # unmap every region still registered
        metrics.shutdown()
        await asyncio.to_thread(tracing.stop)  # exports the spans still buffered
    log.info("stopped")


async def _listen(settings: ServerSettings, service: InferenceService, role: WorkerRole | None,
                  state: ServerState, names: list[str]) -> Ports:  # fmt: skip
    """Open the ports and start serving on them (not ready until the models have loaded)."""
    ports = _open_ports(settings, service, role)
    state.controller.on_model_change = ports.health.model_changed
    try:
        await ports.start(names)
    except BaseException:
        await ports.stop()  # the caller's clean-up does not know of these ports yet
        raise
    return ports


def check_startup(settings: ServerSettings) -> None:
    """The checks `serve` makes before any port opens; StartupError for a problem."""
    _plan(settings)


def _plan(settings: ServerSettings) -> tuple[Repository, list[ModelSpec], dict[str, str]]:
    """Read the repository and check the device before any port opens: the models to
    load (dependencies first) and, without --strict, {name: reason} for those left out."""
    try:
        repository = scan_repository(settings.model_repository, AutoComplete.from_settings(settings))
        wanted = _models_to_load(settings, repository)
        if settings.model_control_mode == "explicit" and not wanted:  # no --load-model: start empty
            specs, failures = [], {}
        elif settings.strict:
            specs, failures = load_order(repository, wanted), {}
        else:
            specs, failures = load_order_skipping_broken(repository, wanted)
            if settings.model_control_mode != "explicit":
                _check_some_model_loads([spec.name for spec in specs], failures)
        choose_providers(settings.device)  # `--device cuda` without CUDA fails here
        tracing.check(settings.trace_rate)  # asked for without the `tracing` extra: fails here
    except (RepositoryError, DeviceError, tracing.TracingConfigError) as error:
        raise StartupError(str(error)) from None
    names = [spec.name for spec in specs]
    for name, reason in repository.errors.items():
        if name not in names and name not in failures:
            log.warning("not loading %s: %s", name, reason)
    return repository, specs, failures


def _models_to_load(settings: ServerSettings, repository: Repository) -> tuple[str, ...]:
    """The models start-up loads: --model in modes none and poll (empty: all), --load-model
    in explicit mode (none by default, '*': all), as in Triton."""
    if settings.model_control_mode != "explicit":
        if settings.load_models:
            raise StartupError("--load-model needs --model-control-mode explicit "
                               "(--model chooses the models of modes none and poll)")
        return settings.models
    if "*" in settings.load_models:
        return tuple(repository.names)
    return settings.load_models


def _check_some_model_loads(loaded: list[str], failures: dict[str, str]) -> None:
    if not loaded:
        raise StartupError("no model could be loaded: " + "; ".join(failures.values()))


@dataclass
class Ports:
    """What listens: gRPC (with health and reflection), HTTP/REST when on, and /metrics."""

    grpc: grpc.Server
    health: HealthReporter
    http: HttpEndpoint | None
    settings: ServerSettings

    async def start(self, names: list[str]) -> None:
        self.grpc.start()
        self.health.starting(names)
        if self.http is not None:
            await self.http.start()

    def describe(self) -> str:
        http = f", HTTP on {self.settings.host}:{self.http.port}" if self.http is not None else ", no HTTP"
        return f"gRPC on {self.settings.grpc_address}{http}"

    async def stop(self) -> None:
        if self.http is not None:
            await self.http.stop()
        await asyncio.to_thread(lambda: self.grpc.stop(FINAL_STOP_GRACE_S).wait())


def _open_ports(settings: ServerSettings, service: InferenceService, role: WorkerRole | None) -> Ports:
    """Serve /metrics (a worker's supervisor does) and bind gRPC and HTTP (not serving yet);
    a bad TLS or token setting, or a port in use, is a StartupError."""
    metrics = service.metrics
    try:
        security = _security(settings, metrics, role)
    except SecurityConfigError as error:
        raise StartupError(str(error)) from None
    try:
        if role is None:
            metrics.serve(settings.metrics_address, settings.metrics_port)
    except OSError as error:
        address = f"{settings.metrics_address}:{settings.metrics_port}"
        raise StartupError(f"cannot serve metrics on {address}: {error}") from None
    try:
        server, health = _grpc_server(settings, service, security, role)
        http = None
        if settings.http_port:
            app = HttpApp(service, security.tokens, settings.max_message_size)
            http = HttpEndpoint(app, settings, metrics, shared_port=role is not None)
    except StartupError:
        metrics.shutdown()
        raise
    except OSError as error:
        metrics.shutdown()
        raise StartupError(f"cannot listen for HTTP on {settings.host}:{settings.http_port}: {error}") from None
    return Ports(server, health, http, settings)


def _grpc_server(settings: ServerSettings, service: InferenceService, security: Security,
                 role: WorkerRole | None) -> tuple[grpc.Server, HealthReporter]:  # fmt: skip
    # grpcio's thread-pool server, not grpc.aio. grpc.aio costs less CPU per call (bare, at
    # concurrency 16 here: 6,300 req/s against 3,800), but through grpcio 1.85 every grpc.aio
    # call that ends by its deadline or a client's cancel leaks native memory
    # (grpc/grpc#43360): measured on our server, 100-400 bytes each, even when the server
    # answers DEADLINE_EXCEEDED before the deadline; the 5-minute soak grew 15 %. The
    # servicer runs on the worker threads and waits there for its batch: no event loop.
    server = grpc.server(ThreadPoolExecutor(max_workers=GRPC_WORKER_THREADS, thread_name_prefix="grpc"),
                         options=_grpc_options(settings, role), interceptors=security.grpc_interceptors(),
                         maximum_concurrent_rpcs=settings.max_concurrent_rpcs)  # fmt: skip
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceServicer(service), server)
    health = HealthReporter(server)
    enable_reflection(server)
    try:
        if security.grpc_credentials is None:
            server.add_insecure_port(settings.grpc_address)
        else:
            server.add_secure_port(settings.grpc_address, security.grpc_credentials)
    except RuntimeError as error:
        raise StartupError(f"cannot listen for gRPC on {settings.grpc_address}: {error}") from None
    if role is not None:  # where the sibling workers ask for this one's statistics
        server.add_insecure_port(f"unix:{role.own_socket}")
    return server, health


async def _load_unless_stopped(specs: list[ModelSpec], settings: ServerSettings, metrics: ServerMetrics,
                               registry: ModelRegistry, stop: asyncio.Event
                               ) -> tuple[ModelRegistry, dict[str, str]] | None:  # fmt: skip
    """`load_models` into `registry`, or None when a signal comes first (the loading is then cancelled)."""
    loading = asyncio.create_task(load_models(specs, settings, metrics, registry))
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait({loading, stopping}, return_when=asyncio.FIRST_COMPLETED)
    if not loading.done():
        loading.cancel()
        await asyncio.gather(loading, return_exceptions=True)
        return None
    stopping.cancel()
    try:
        return loading.result()
    except (RepositoryError, DeviceError) as error:
        raise StartupError(str(error)) from None


def _report_load_failures(failures: dict[str, str], names: list[str], repository: Repository,
                          metrics: ServerMetrics, settings: ServerSettings) -> list[str]:  # fmt: skip
    """Without --strict: one log line and one metric per model left out, its reason shown
    by RepositoryIndex; returns the names that did load. Nothing loaded at all is still a
    start-up failure."""
    for name, reason in failures.items():
        log.error("model %s failed to load and is not served: %s", name, reason)
        metrics.load_failures.labels(model=name).inc()
        repository.errors[name] = reason
    loaded = [name for name in names if name not in failures]
    if settings.model_control_mode != "explicit":  # explicit mode may start with no model at all
        _check_some_model_loads(loaded, failures)
    return loaded


async def _drain(state: ServerState, grace_period_s: float, health: HealthReporter, metrics: ServerMetrics) -> None:
    state.draining = True
    metrics.ready.set(0)
    health.shutting_down()
    log.info("not ready; waiting up to %.1f s for %d request(s) in flight", grace_period_s, state.in_flight)
    if await asyncio.to_thread(state.wait_idle, grace_period_s):
        log.info("all in-flight requests finished")
    else:
        log.warning("grace period over with %d request(s) still in flight; they are cancelled", state.in_flight)
