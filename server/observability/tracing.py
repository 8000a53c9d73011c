"""OpenTelemetry tracing of inference requests: the switch that a request's path reads.

Off by default. It is on when `--trace-rate R` (0 < R <= 1) is given, or when the standard
OTEL_TRACES_SAMPLER variable names a sampler other than always_off; OTEL_SDK_DISABLED=true
turns it off whatever else says. The rest is configured the standard OpenTelemetry way
and read by the SDK itself: OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT (default
http://localhost:4318, OTLP over HTTP/protobuf), OTEL_SERVICE_NAME (default
ensemble-serving), OTEL_TRACES_SAMPLER[_ARG], OTEL_PROPAGATORS, OTEL_BSP_*.
`--trace-rate R` is the sampler parentbased_traceidratio with ratio R: a request whose
client sent a sampled W3C traceparent is traced, others with probability R.

`active` is None while tracing is off, and every hook on a request's path is one
`if tracing.active is not None`: no span object is made, no header is parsed. When on, it
is a `RequestTracer` (server/observability/tracing_spans.py, the only module that imports
OpenTelemetry: the `tracing` extra, so that the server installs and starts without it).
"""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from server.observability.tracing_spans import RequestTracer

log = logging.getLogger(__name__)

active: RequestTracer | None = None  # None: tracing is off

OFF_SAMPLERS = ("always_off", "parentbased_always_off")
SAMPLERS = ("always_on", "traceidratio", "parentbased_always_on", "parentbased_traceidratio", *OFF_SAMPLERS)
RATIO_SAMPLERS = ("traceidratio", "parentbased_traceidratio")
SUPPORTED_PROTOCOLS = ("http/protobuf",)
# What the `tracing` extra brings; checked before any port opens.
REQUIRED_MODULES = ("opentelemetry.sdk.trace", "opentelemetry.exporter.otlp.proto.http.trace_exporter")
INSTALL_HINT = "pip install 'ensemble-serving[tracing]'"


class TracingConfigError(Exception):
    """Tracing was asked for but cannot run; the message says why and what to do."""


def requested(trace_rate: float | None, environ: Mapping[str, str] = os.environ) -> bool:
    """Whether these settings turn tracing on (see the module's docstring)."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    if trace_rate is not None:
        return trace_rate > 0
    sampler = environ.get("OTEL_TRACES_SAMPLER", "").strip().lower()
    return sampler not in ("", *OFF_SAMPLERS)


def check(trace_rate: float | None, environ: Mapping[str, str] = os.environ) -> bool:
    """True when tracing is on and can run; TracingConfigError when it is asked for but the
    `tracing` extra is missing or the exporter protocol is one we do not ship."""
    if not requested(trace_rate, environ):
        return False
    why = _asked_by(trace_rate, environ)
    missing = [name for name in REQUIRED_MODULES if not _importable(name)]
    if missing:
        raise TracingConfigError(f"tracing is on ({why}) but OpenTelemetry is not installed (no module "
                                 f"{missing[0]}): {INSTALL_HINT}, or leave tracing off")
    _check_sampler(trace_rate, environ)
    protocol = (environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
                or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "http/protobuf").strip().lower()
    if protocol not in SUPPORTED_PROTOCOLS:
        raise TracingConfigError(f"OTEL_EXPORTER_OTLP_PROTOCOL {protocol!r} is not supported: the server exports "
                                 f"OTLP over HTTP/protobuf (a collector's port 4318); set it to "
                                 f"{' or '.join(SUPPORTED_PROTOCOLS)} or leave it unset")
    return True


def start(trace_rate: float | None, resource_attributes: Mapping[str, str] | None = None) -> None:
    """Turn tracing on in this process when the settings ask for it (after `check`). The
    SDK reads its OTEL_* variables from os.environ itself."""
    global active
    if not check(trace_rate):
        return
    from server.observability.tracing_spans import RequestTracer  # the `tracing` extra

    active = RequestTracer.from_environment(trace_rate, dict(resource_attributes or {}))
    log.info("tracing on (%s): %s", _asked_by(trace_rate, os.environ), active.describe())


def stop() -> None:
    """Export what is still buffered and turn tracing off."""
    global active
    tracer, active = active, None
    if tracer is not None:
        tracer.shutdown()


def _check_sampler(trace_rate: float | None, environ: Mapping[str, str]) -> None:
    """The SDK would take an unknown sampler or ratio for parentbased_always_on (every
    request traced) after a warning: refuse it instead."""
    if trace_rate is not None:
        return  # --trace-rate replaces OTEL_TRACES_SAMPLER
    sampler = environ.get("OTEL_TRACES_SAMPLER", "").strip().lower()
    if sampler not in SAMPLERS:
        raise TracingConfigError(f"OTEL_TRACES_SAMPLER {sampler!r} is not a sampler; use one of {', '.join(SAMPLERS)} "
                                 f"(or --trace-rate)")
    if sampler in RATIO_SAMPLERS:
        arg = environ.get("OTEL_TRACES_SAMPLER_ARG", "").strip()
        try:
            ratio = float(arg)
        except ValueError:
            ratio = -1.0
        if not 0.0 <= ratio <= 1.0:
            raise TracingConfigError(f"OTEL_TRACES_SAMPLER={sampler} needs OTEL_TRACES_SAMPLER_ARG, the fraction "
                                     f"of traces to keep, between 0 and 1; got {arg!r}")


def _asked_by(trace_rate: float | None, environ: Mapping[str, str]) -> str:
    if trace_rate is not None:
        return f"--trace-rate {trace_rate:g}"
    return f"OTEL_TRACES_SAMPLER={environ.get('OTEL_TRACES_SAMPLER', '').strip()}"


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package that is missing, or blocked in sys.modules
        return False
