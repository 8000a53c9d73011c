"""`server --workers N`: N worker processes serving one set of ports.

One Python process cannot use many cores: the GIL serialises its request handling. With
`--workers N` a supervisor process starts N workers, each a whole server (its own
onnxruntime sessions, batchers, gRPC and HTTP endpoints) listening on the same ports
with SO_REUSEPORT, so that the kernel spreads the incoming connections among them
(per connection: a client's calls on one channel all go to one worker).

What stays one server across the workers:
  /metrics     served by the supervisor, summing every worker's series (prometheus_client's
               multiprocess mode: the workers write their values to files in a private
               directory, the supervisor reads them at scrape time);
  statistics   a worker asked for ModelStatistics (gRPC or HTTP) adds its siblings' counters,
               asked over their private Unix sockets (server/process/siblings.py);
  SIGTERM      the supervisor passes it to every worker; each drains its requests in flight
               as a single server does; the supervisor exits 0 when all of them did.
  a death    a worker that dies is restarted while the others serve; workers that keep
               dying stop the server (server/process/supervisor.py).
Explicit model control is refused: a load call would reach one worker only.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import multiprocessing
import os
import secrets
import shutil
import signal
import socket
import sys
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

from server.process.app import StartupError, check_startup
from server.process.run import configure_logging, run_server
from server.process.supervisor import Supervisor, WorkerMetrics
from server.process.worker_role import WorkerRole

log = logging.getLogger("server.process.workers")

_PR_SET_PDEATHSIG = 1  # prctl(2)


class WorkersError(Exception):
    """The workers cannot start: the message says why."""


def check_workers_settings(settings) -> None:
    if settings.workers > 1 and settings.model_control_mode == "explicit":
        raise WorkersError("--workers > 1 needs --model-control-mode none or poll: with explicit model "
                           "control a load or unload call would reach only the worker that received it")


# -- the supervisor ----------------------------------------------------------------------------
def supervise(settings) -> int:
    """Run `settings.workers` workers until they stop; the exit status for the command."""
    with contextlib.ExitStack() as cleanup:
        try:
            check_workers_settings(settings)
            check_startup(settings)  # the workers' own start-up checks, run once here
            reserved = _reserve_ports(settings)
            cleanup.callback(reserved.close)
            runtime_dir = _make_runtime_dir()
            cleanup.callback(shutil.rmtree, runtime_dir, True)
            metrics_server, metrics_registry = _serve_merged_metrics(settings, runtime_dir / "metrics")
            cleanup.callback(metrics_server.server_close)
            cleanup.callback(metrics_server.shutdown)
        except (WorkersError, StartupError, OSError) as error:
            print(f"server: error: {error}", file=sys.stderr)
            return 2
        settings = replace(settings, grpc_port=reserved.grpc_port, http_port=reserved.http_port,
                           intra_op_threads=_intra_op_threads(settings))
        return _run_workers(settings, runtime_dir, metrics_registry)


def _make_runtime_dir() -> Path:
    """A private directory for the workers' sockets and metrics files."""
    try:
        runtime_dir = Path(tempfile.mkdtemp(prefix="ensemble-server-"))  # mode 0700
    except OSError as error:
        raise OSError(f"--workers needs a writable directory for the workers' sockets and metrics files "
                      f"({error}); set TMPDIR to one") from None
    (runtime_dir / "metrics").mkdir()
    return runtime_dir


def _intra_op_threads(settings) -> int:
    """onnxruntime's default, a thread per core in every session of every worker, would put
    `workers` threads on each core; left at 0, the workers share the cores instead."""
    if settings.intra_op_threads:
        return settings.intra_op_threads
    threads = max(1, len(os.sched_getaffinity(0)) // settings.workers)
    log.info("each worker's onnxruntime sessions use %d intra-op thread(s) (--intra-op-threads to choose)", threads)
    return threads


@dataclass
class _ReservedPorts:
    """The ports the workers will share, held by the supervisor: a port given as 0 gets its
    number here, and no process without SO_REUSEPORT can take one meanwhile."""

    sockets: list[socket.socket]
    grpc_port: int
    http_port: int

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()


def _reserve_ports(settings) -> _ReservedPorts:
    sockets = []
    try:
        grpc_port = _reserve(settings.host, settings.grpc_port, "gRPC", sockets)
        http_port = _reserve(settings.host, settings.http_port, "HTTP", sockets) if settings.http_port else 0
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    return _ReservedPorts(sockets, grpc_port, http_port)


def _reserve(host: str, port: int, what: str, sockets: list[socket.socket]) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # First without SO_REUSEPORT: a port some other server listens on (Triton's gRPC sets
    # SO_REUSEPORT too) must fail here, not be silently shared with it.
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, port))
        except OSError as error:
            raise OSError(f"cannot listen for {what} on {host}:{port}: {error.strerror}") from None
        port = probe.getsockname()[1]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))  # bound, not listening: it takes no connections
    sockets.append(sock)
    return port


def _serve_merged_metrics(settings, metrics_dir: Path):
    """/metrics: the sum of what the workers write to `metrics_dir`."""
    from prometheus_client import CollectorRegistry, start_http_server
    from prometheus_client.multiprocess import MultiProcessCollector

    # Read when a worker first imports prometheus_client: it then writes its values there.
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(metrics_dir))
    try:
        server, _thread = start_http_server(settings.metrics_port, addr=settings.metrics_address, registry=registry)
    except OSError as error:
        raise OSError(f"cannot serve metrics on {settings.metrics_address}:{settings.metrics_port}: {error}") from None
    log.info("metrics of all %d workers on http://%s:%d/metrics", settings.workers, settings.metrics_address,
             server.server_port)
    return server, registry


def _run_workers(settings, runtime_dir: Path, metrics_registry) -> int:
    context = multiprocessing.get_context("spawn")  # no fork of a process with threads
    secret = secrets.token_hex(16)

    def start(index: int, replacement: bool):
        role = WorkerRole(index, settings.workers, runtime_dir, secret, replacement=replacement)
        worker = context.Process(target=worker_main, name=f"worker-{index}", args=(settings, role))
        worker.start()
        return worker

    supervisor = Supervisor(settings.workers, start, settings, runtime_dir / "metrics")
    metrics_registry.register(WorkerMetrics(supervisor.slots))
    log.info("%d workers on gRPC %s:%d%s", settings.workers, settings.host, settings.grpc_port,
             f", HTTP {settings.host}:{settings.http_port}" if settings.http_port else "")
    return supervisor.run()


# -- one worker --------------------------------------------------------------------------------
def worker_main(settings, role: WorkerRole) -> None:
    """The entry point of a worker process (spawned: it imports everything afresh)."""
    _die_with_parent()
    configure_logging(settings, f"worker-{role.index}")
    os.setpgid(0, 0)  # out of the terminal's process group: Ctrl-C reaches the supervisor, which passes it on
    sys.exit(run_server(settings, role))


def _die_with_parent() -> None:
    """SIGTERM this worker when the supervisor dies (even by SIGKILL): no orphan keeps the ports."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
