"""Server settings: one dataclass, filled from command-line flags or environment variables.

Every flag has an environment-variable twin named ENSEMBLE_SERVER_<FLAG> (for example
`--grpc-port` <-> ENSEMBLE_SERVER_GRPC_PORT), which is how containers configure it.
A flag given on the command line wins over the environment.

`settings_options` is the list of click options the `server` command is built from;
keeping them next to the dataclass means a new setting is added in one file.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Callable

import click

ENV_PREFIX = "ENSEMBLE_SERVER_"
DEVICES = ("auto", "cpu", "cuda")
LOG_LEVELS = ("debug", "info", "warning", "error")
MODEL_CONTROL_MODES = ("none", "poll", "explicit")  # Triton's --model-control-mode
QUEUE_DELAY_RULES = ("adaptive", "triton")  # server/scheduling/batcher.py: when a batch waits for more requests

# When a config.pbtxt leaves max_queue_size at 0 ("unbounded" in Triton) we still bound
# the queue, so that an overload answers RESOURCE_EXHAUSTED instead of growing memory.
DEFAULT_MAX_QUEUE_SIZE = 1024


@dataclass(frozen=True)
class ServerSettings:
    model_repository: Path
    grpc_port: int = 8001
    http_port: int = 8000  # 0: no HTTP/REST endpoint
    metrics_port: int = 8002
    host: str = "0.0.0.0"
    device: str = "auto"
    models: tuple[str, ...] = ()  # empty: every model in the repository
    intra_op_threads: int = 0  # 0: onnxruntime's default (one per physical core)
    inter_op_threads: int = 0
    spinning: bool = False
    global_thread_pool: bool = False
    max_message_size: int = 64 * 1024 * 1024
    log_level: str = "info"
    # Batching overrides; None keeps what each model's config.pbtxt says.
    max_queue_delay_us: int | None = None
    max_queue_size: int | None = None
    dynamic_batching: bool = True
    queue_delay: str = "adaptive"
    grace_period_s: float = 30.0
    workers: int = 1  # server processes sharing the ports (server/process/workers.py)
    # Reliability and security (server/transport/security.py); all off by default.
    strict: bool = False  # a model that fails to load fails the start-up
    metrics_host: str | None = None  # None: the same as `host`
    max_concurrent_rpcs: int | None = None  # None: unbounded
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    auth_tokens_file: Path | None = None
    # The HTTP edge (server/transport/http_edge.py) and the workers' supervisor
    # (server/process/supervisor.py).
    http_header_timeout_s: float = 15.0
    http_keep_alive_timeout_s: float = 60.0
    http_max_connections: int | None = None  # None: unbounded (per worker with --workers)
    max_worker_deaths: int = 5  # --workers: deaths within the window that stop the server
    worker_death_window_s: float = 60.0
    # Model control (server/models/control.py): Triton's modes, flags and defaults.
    model_control_mode: str = "none"
    repository_poll_secs: float = 15.0
    load_models: tuple[str, ...] = ()  # explicit mode: loaded at start-up ("*": all)
    # -- tracing (server/observability/tracing.py); off by default --
    trace_rate: float | None = None  # None: OTEL_TRACES_SAMPLER decides (unset: off)
    # Config auto-complete (server/models/autocomplete.py), Triton's flags.
    disable_auto_complete_config: bool = False
    backend_config: tuple[str, ...] = ()  # "[onnxruntime,]default-max-batch-size=N"

    @property
    def grpc_address(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    @property
    def metrics_address(self) -> str:
        return self.metrics_host or self.host

    @property
    def default_max_batch_size(self) -> int:
        """The max_batch_size auto-complete gives a model that can batch (the last
        --backend-config default-max-batch-size, else Triton's 4)."""
        values = [int(value) for _, key, value in map(parse_backend_config, self.backend_config)
                  if key == DEFAULT_MAX_BATCH_SIZE_KEY]  # fmt: skip
        return values[-1] if values else TRITON_DEFAULT_MAX_BATCH_SIZE


# Triton's --backend-config settings that this server understands (onnxruntime's, or global).
DEFAULT_MAX_BATCH_SIZE_KEY = "default-max-batch-size"
TRITON_DEFAULT_MAX_BATCH_SIZE = 4  # tritonserver's default for it
BACKENDS = ("onnxruntime",)


def parse_backend_config(text: str) -> tuple[str, str, str]:
    """Triton's `--backend-config` value, "<backend>,<setting>=<value>" or (for every
    backend) "<setting>=<value>", as (backend or "", setting, value); ValueError otherwise."""
    backend, _, setting = text.rpartition(",")
    key, equals, value = setting.partition("=")
    if not equals or (backend and backend not in BACKENDS):
        raise ValueError(f"{text!r}: expected [onnxruntime,]{DEFAULT_MAX_BATCH_SIZE_KEY}=N "
                         f"(Triton's <backend>,<setting>=<value>; this server has the onnxruntime backend only)")
    if key != DEFAULT_MAX_BATCH_SIZE_KEY:
        raise ValueError(f"{text!r}: setting {key!r} is not understood; this server takes "
                         f"{DEFAULT_MAX_BATCH_SIZE_KEY} only")
    if not value.strip().isdigit():
        raise ValueError(f"{text!r}: {DEFAULT_MAX_BATCH_SIZE_KEY} must be a whole number >= 0, got {value!r}")
    return backend, key, value.strip()


def _check_backend_config(context, parameter, values: tuple[str, ...]) -> tuple[str, ...]:
    for value in values:
        try:
            parse_backend_config(value)
        except ValueError as error:
            raise click.BadParameter(str(error)) from None
    return values


def _env(name: str) -> str:
    return ENV_PREFIX + name.upper().replace("-", "_")


# Each default is written once, in ServerSettings; the flags take theirs from there.
_DEFAULTS = {field.name: field.default for field in fields(ServerSettings) if field.default is not MISSING}


def _option(flag: str, *names: str, **kwargs) -> Callable:
    """A click option that also reads ENSEMBLE_SERVER_<FLAG> and shows it in --help; its
    default is that of the ServerSettings field it fills (named in `names`, or the flag's)."""
    env_name = flag.split("/")[0].lstrip("-")
    field = names[0] if names else env_name.replace("-", "_")
    if field in _DEFAULTS:
        kwargs.setdefault("default", _DEFAULTS[field])
    return click.option(flag, *names, envvar=_env(env_name), show_envvar=True, **kwargs)


settings_options: list[Callable] = [
    _option("--model-repository", "model_repository", required=True,
            type=click.Path(exists=True, file_okay=False, path_type=Path),
            help="Triton-layout model repository: one folder per model with config.pbtxt and "
                 "numbered version folders holding model.onnx."),
    _option("--grpc-port", type=click.IntRange(0, 65535), show_default=True,
            help="Port of the KServe v2 / Triton gRPC inference service (plus health and reflection)."),
    _option("--http-port", type=click.IntRange(0, 65535), show_default=True,
            help="Port of the KServe v2 REST endpoint (Triton's HTTP/REST protocol: JSON and binary "
                 "tensors, health, metadata, statistics); 0 turns it off. Same models and batchers as gRPC."),
    _option("--metrics-port", type=click.IntRange(0, 65535), show_default=True,
            help="Port of the Prometheus /metrics endpoint."),
    _option("--host", show_default=True, help="Address the gRPC, HTTP and metrics ports listen on."),
    _option("--device", type=click.Choice(DEVICES), show_default=True,
            help="auto: CUDA when onnxruntime has it, else CPU (the fallback is logged and shown in "
                 "metrics and ModelConfig). cuda: fail at start-up when CUDA is unavailable."),
    _option("--model", "models", multiple=True,
            help="Load only this model (repeatable; an ensemble brings its steps; the environment "
                 "variable takes names separated by spaces). Default: every model."),
    _option("--intra-op-threads", type=click.IntRange(0), show_default=True,
            help="onnxruntime threads inside one operator (0: onnxruntime decides)."),
    _option("--inter-op-threads", type=click.IntRange(0), show_default=True,
            help="onnxruntime threads across independent operators (0: onnxruntime decides)."),
    _option("--spinning/--no-spinning", "spinning", show_default=True,
            help="Let onnxruntime's threads busy-wait for work: lower latency on a dedicated, idle "
                 "machine; on shared cores it steals CPU from everything else."),
    _option("--global-thread-pool/--per-session-threads", "global_thread_pool", show_default=True,
            help="One onnxruntime thread pool shared by every model (sized by --intra-op-threads) instead of "
                 "one per model: the members of an ensemble share the cores rather than oversubscribe them."),
    _option("--max-message-size", type=click.IntRange(1024), show_default=True,
            help="Largest gRPC message, in bytes, sent or received."),
    _option("--log-level", type=click.Choice(LOG_LEVELS), show_default=True,
            help="Log verbosity (logs go to stderr)."),
    _option("--max-queue-delay-us", type=click.IntRange(0),
            help="Override every model's dynamic_batching max_queue_delay_microseconds: how long "
                 "the oldest queued request may wait for a fuller batch."),
    _option("--queue-delay", type=click.Choice(QUEUE_DELAY_RULES), show_default=True,
            help="When a batch stops waiting (up to max_queue_delay) for more requests. adaptive: "
                 "also as soon as the queue holds as many requests as the model has lately held at "
                 "once (its recent peak, queued + computing), so clients that wait for each answer "
                 "are not held back for nothing. triton: only when the batch is full or the delay "
                 "has passed, as Triton does."),
    _option("--max-queue-size", type=click.IntRange(1),
            help=f"Override every model's queue bound (requests waiting, not yet computing); "
                 f"beyond it requests get RESOURCE_EXHAUSTED. Default: config.pbtxt's "
                 f"default_queue_policy.max_queue_size, or {DEFAULT_MAX_QUEUE_SIZE} when that is 0."),
    _option("--dynamic-batching/--no-dynamic-batching", "dynamic_batching", show_default=True,
            help="Gather concurrent requests into one onnxruntime call (models whose config.pbtxt "
                 "has dynamic_batching). Off: every request runs alone."),
    _option("--grace-period", "grace_period_s", type=click.FloatRange(0), show_default=True,
            help="Seconds to finish in-flight requests after SIGTERM/SIGINT before exiting."),
    _option("--workers", type=click.IntRange(1), show_default=True,
            help="Server processes sharing the gRPC and HTTP ports (SO_REUSEPORT: the kernel spreads "
                 "connections among them), each with its own onnxruntime sessions and batchers: for "
                 "machines with more cores than one Python process can keep busy. /metrics, "
                 "ModelStatistics and the SIGTERM drain cover every worker. Not with "
                 "--model-control-mode explicit (a load call would reach one worker only)."),
    # -- reliability and security (server/transport/security.py) --
    _option("--strict/--no-strict", "strict", show_default=True,
            help="A model that fails to load (corrupt ONNX, bad config.pbtxt, missing version folder) "
                 "stops the start-up. Default: it is logged, counted in "
                 "ensemble_server_model_load_failures_total and listed UNAVAILABLE in RepositoryIndex, "
                 "and the other models serve."),
    _option("--metrics-host",
            help="Address the metrics port listens on, e.g. 127.0.0.1 to keep /metrics off the "
                 "network while gRPC listens on --host. Default: --host."),
    _option("--max-concurrent-rpcs", type=click.IntRange(1),
            help="Most gRPC calls handled at once (health watches included); beyond it gRPC answers "
                 "RESOURCE_EXHAUSTED. Bounds memory to about this many x --max-message-size. "
                 "Default: unbounded (the per-model queues still bound inference)."),
    _option("--tls-cert", type=click.Path(exists=True, dir_okay=False, path_type=Path),
            help="Serve gRPC over TLS with this certificate (PEM; with its chain). Needs --tls-key."),
    _option("--tls-key", type=click.Path(exists=True, dir_okay=False, path_type=Path),
            help="Private key (PEM) of --tls-cert."),
    _option("--tls-client-ca", type=click.Path(exists=True, dir_okay=False, path_type=Path),
            help="Mutual TLS: accept only clients presenting a certificate signed by this CA (PEM). "
                 "Needs --tls-cert and --tls-key."),
    _option("--auth-tokens-file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
            help="Require 'authorization: Bearer <token>' metadata on every call except grpc.health.v1 "
                 "(others get UNAUTHENTICATED). The file holds one token per line ('#' comments). "
                 "Tokens can also come, comma-separated, from $ENSEMBLE_SERVER_AUTH_TOKENS. "
                 "Use with TLS: in plaintext tokens can be read off the network."),
    # -- the HTTP edge (server/transport/http_edge.py) and worker supervision (server/process/supervisor.py) --
    _option("--http-header-timeout", "http_header_timeout_s", type=click.FloatRange(min=0.001), show_default=True,
            help="Seconds a client has, from connecting (or from the first byte of its next request on a "
                 "kept-alive connection), to send complete request headers; then the server answers 408 and "
                 "closes the connection (as nginx's client_header_timeout), so clients that trickle headers "
                 "cannot hold connections open. Counted in "
                 "ensemble_server_http_connections_closed_total{reason=\"header_timeout\"}."),
    _option("--http-keep-alive-timeout", "http_keep_alive_timeout_s", type=click.FloatRange(min=0.001),
            show_default=True,
            help="Seconds an idle keep-alive HTTP connection stays open after its last response "
                 "(reason=\"keep_alive_timeout\" in the same counter)."),
    _option("--http-max-connections", type=click.IntRange(1),
            help="Most HTTP connections open at once (per worker with --workers); a connection beyond it is "
                 "closed as soon as it is accepted (reason=\"max_connections\"). Bounds the file descriptors "
                 "and memory that HTTP clients can take. Default: unbounded (the header and keep-alive "
                 "timeouts still close idle and slow ones)."),
    _option("--max-worker-deaths", type=click.IntRange(1), show_default=True,
            help="With --workers, a worker that dies (killed, crashed) is restarted, with backoff (0.5 s, "
                 "doubling up to 10 s), while the others serve; it listens again once its models are "
                 "loaded. This many deaths within --worker-death-window stop the whole server instead "
                 "(exit 1, with an error naming the deaths); 1: the first death stops it."),
    _option("--worker-death-window", "worker_death_window_s", type=click.FloatRange(min=1), show_default=True,
            help="Seconds over which --max-worker-deaths counts worker deaths."),
    # -- model control (server/models/control.py) --
    _option("--model-control-mode", type=click.Choice(MODEL_CONTROL_MODES), show_default=True,
            help="none: load the models at start-up, then never change them. poll: also watch the repository "
                 "every --repository-poll-secs and load, reload or unload what changed. explicit: load only "
                 "--load-model at start-up; RepositoryModelLoad / RepositoryModelUnload (tritonclient's "
                 "load_model / unload_model) change the rest. Load and unload calls are refused in the "
                 "other modes, as Triton does."),
    _option("--repository-poll-secs", "repository_poll_secs", type=click.FloatRange(min=0.1), show_default=True,
            help="How often poll mode looks at the repository for new, changed or removed models and versions."),
    _option("--load-model", "load_models", multiple=True,
            help="Explicit mode: load this model at start-up (repeatable; '*' for every model; an ensemble "
                 "brings its steps; the environment variable takes names separated by spaces). Default: none."),
    # -- tracing (server/observability/tracing.py) --
    _option("--trace-rate", "trace_rate", type=click.FloatRange(0, 1),
            help="Turn on OpenTelemetry tracing and keep this fraction of the requests (0 < R <= 1; 0: off): "
                 "one trace per inference request (HTTP and gRPC) with spans for its queue wait, its batch and "
                 "each ensemble step, exported over OTLP/HTTP to $OTEL_EXPORTER_OTLP_ENDPOINT (default "
                 "http://localhost:4318). A request carrying a client's W3C traceparent follows the client's "
                 "sampling decision (sampler parentbased_traceidratio). Without the flag, the standard "
                 "OTEL_TRACES_SAMPLER[_ARG] variables decide (unset: tracing off); OTEL_SERVICE_NAME names the "
                 "service (default ensemble-serving). Needs the `tracing` extra."),
    # -- config auto-complete (server/models/autocomplete.py) --
    _option("--disable-auto-complete-config", "disable_auto_complete_config", is_flag=True,
            help="Do not fill in a model's config from its ONNX graph: every model then needs a config.pbtxt "
                 "declaring its inputs, outputs and max_batch_size (as with Triton's flag of that name). "
                 "Default: a missing or partial config.pbtxt, or a load_model config override, is completed "
                 "from the graph as Triton's onnxruntime backend does (docs/model_control.md)."),
    _option("--backend-config", "backend_config", multiple=True, callback=_check_backend_config,
            help=f"Triton's backend setting, as onnxruntime,{DEFAULT_MAX_BATCH_SIZE_KEY}=N (or "
                 f"{DEFAULT_MAX_BATCH_SIZE_KEY}=N): the max_batch_size auto-complete gives a model whose "
                 f"inputs and outputs all have a dynamic first dimension and whose config sets none "
                 f"(default {TRITON_DEFAULT_MAX_BATCH_SIZE}; above 1 it also turns dynamic batching on). "
                 f"The only setting understood."),
]


def apply_settings_options(command: Callable) -> Callable:
    for option in reversed(settings_options):
        command = option(command)
    return command
