"""The variables that turn the sinks on (README.md, "Turning it on"), read once per process.

Pure: reads a mapping (``os.environ`` by default) and imports nothing heavy. Engines start their
workers with ``spawn``; each worker re-imports this module and so reads the environment it
inherited, which is what makes "configured only through ``OTEL_*`` variables" work there too.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional

from .request_tally import DEFAULT_IDLE_SECONDS, RequestSettings
from .step import DEFAULT_LINK_LIMIT
from .timeline import DEFAULT_SECONDS, DEFAULT_STEPS, TimelineSettings

#: The exporter process reads the resource of the provider it stands in for from here (JSON),
#: instead of building one from ``OTEL_SERVICE_NAME``/``OTEL_RESOURCE_ATTRIBUTES``.
RESOURCE_VARIABLE = "OTEL_STEPSPAN_RESOURCE"

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _flag(environ: Mapping[str, str], key: str) -> bool:
    return environ.get(key, "").strip().lower() in _TRUE


@dataclass(frozen=True)
class Settings:
    sdk_disabled: bool
    export_requested: bool
    span_name: str  # "label" or "mode"
    nvtx: bool
    gpu_timing: bool
    max_pending: int
    problems: tuple[str, ...] = ()

    otlp_only: bool = False  # the exporters asked for are OTLP alone
    timeline: TimelineSettings = field(default_factory=TimelineSettings)
    link_limit: int = DEFAULT_LINK_LIMIT
    requests: RequestSettings = field(default_factory=RequestSettings)
    #: ``OTEL_STEPSPAN_EXPORT``: "auto" (the exporter process wherever the provider in place
    #: exports OTLP), "process" (the exporter process, configured by the variables when the
    #: provider cannot be read), "provider" (in process, through the provider in place).
    export_via: str = "auto"

    @property
    def otel_wanted(self) -> bool:
        """True when the environment alone asks for OpenTelemetry export."""
        return self.export_requested and not self.sdk_disabled


def exporters_requested(environ: Mapping[str, str]) -> list[str]:
    """``OTEL_TRACES_EXPORTER`` as a list; ``otlp`` when only an endpoint is given."""
    raw = environ.get("OTEL_TRACES_EXPORTER", "").strip()
    if raw:
        return [name.strip().lower() for name in raw.split(",") if name.strip()]
    endpoint_keys = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    if any(environ.get(key, "").strip() for key in endpoint_keys):
        return ["otlp"]
    return []


class ExportConfigError(ValueError):
    """The ``OTEL_*`` variables ask for an export this process cannot do."""


def otlp_setting(environ: Mapping[str, str], name: str) -> Optional[str]:
    """``OTEL_EXPORTER_OTLP_TRACES_<name>``, else ``OTEL_EXPORTER_OTLP_<name>``; None when unset.

    The one reader of the OTLP exporter variables, for the exporter process's own senders and
    for the SDK exporter built in process, so that one set of variables means the same to both
    (and to the engine's own exporters, which read them in this order)."""
    for key in (f"OTEL_EXPORTER_OTLP_TRACES_{name}", f"OTEL_EXPORTER_OTLP_{name}"):
        value = environ.get(key, "").strip()
        if value:
            return value
    return None


def otlp_protocol(environ: Mapping[str, str]) -> str:
    """The OTLP protocol asked for (``grpc``, the Python SDK's default, or ``http/protobuf``);
    raises :class:`ExportConfigError` for one we cannot speak."""
    protocol = (otlp_setting(environ, "PROTOCOL") or "grpc").lower()
    if protocol not in ("grpc", "http/protobuf"):
        raise ExportConfigError(
            f"OTLP protocol {protocol!r} is not supported; use 'grpc' or 'http/protobuf' "
            "(OTEL_EXPORTER_OTLP_PROTOCOL / OTEL_EXPORTER_OTLP_TRACES_PROTOCOL)"
        )
    return protocol


def _positive(
    environ: Mapping[str, str], key: str, default: float, kind: Callable[[str], float], problems: list[str]
) -> float:
    """A positive number from the environment; the default (and a line in ``problems``) when the
    value is not one."""
    raw = environ.get(key, "").strip()
    if not raw:
        return default
    try:
        value = kind(raw)
        if value > 0:
            return value
    except ValueError:
        pass
    problems.append(f"{key}={raw!r} is not a positive {'integer' if kind is int else 'number'}; using {default:g}")
    return default


def read_timeline_settings(environ: Mapping[str, str], problems: list[str]) -> TimelineSettings:
    """``OTEL_STEPSPAN_TIMELINE`` (on/off), ``_STEPS`` and ``_SECONDS`` (see :mod:`.timeline`)."""
    raw = environ.get("OTEL_STEPSPAN_TIMELINE", "").strip().lower()
    if raw and raw not in _TRUE | _FALSE:
        problems.append(f"OTEL_STEPSPAN_TIMELINE={raw!r} is not 'on' or 'off'; using 'on'")
    return TimelineSettings(
        enabled=raw not in _FALSE,
        max_steps=int(_positive(environ, "OTEL_STEPSPAN_TIMELINE_STEPS", DEFAULT_STEPS, int, problems)),
        max_seconds=_positive(environ, "OTEL_STEPSPAN_TIMELINE_SECONDS", DEFAULT_SECONDS, float, problems),
    )


def read_request_settings(environ: Mapping[str, str], problems: list[str], links: int) -> RequestSettings:
    """``OTEL_STEPSPAN_REQUEST_SPANS`` (on/off) and ``_IDLE_SECONDS`` (see
    :mod:`.request_tally`); a request span links to as many windows as a step to requests
    (``links``, the link limit read by :func:`link_limit`)."""
    raw = environ.get("OTEL_STEPSPAN_REQUEST_SPANS", "").strip().lower()
    if raw and raw not in _TRUE | _FALSE:
        problems.append(f"OTEL_STEPSPAN_REQUEST_SPANS={raw!r} is not 'on' or 'off'; using 'on'")
    return RequestSettings(
        enabled=raw not in _FALSE,
        idle_seconds=_positive(environ, "OTEL_STEPSPAN_REQUEST_IDLE_SECONDS", DEFAULT_IDLE_SECONDS, float, problems),
        max_places=links,
    )


def link_limit(environ: Mapping[str, str], problems: list[str]) -> int:
    """Request links per step span: ``OTEL_SPAN_LINK_COUNT_LIMIT``, as for the SDK's spans."""
    return int(_positive(environ, "OTEL_SPAN_LINK_COUNT_LIMIT", DEFAULT_LINK_LIMIT, int, problems))


def read_settings(environ: Optional[Mapping[str, str]] = None) -> Settings:
    env = os.environ if environ is None else environ
    problems: list[str] = []
    exporters = [name for name in exporters_requested(env) if name != "none"]
    span_name = env.get("OTEL_STEPSPAN_SPAN_NAME", "label").strip().lower() or "label"
    if span_name not in ("label", "mode"):
        problems.append(f"OTEL_STEPSPAN_SPAN_NAME={span_name!r} is not 'label' or 'mode'; using 'label'")
        span_name = "label"
    max_pending = int(_positive(env, "OTEL_STEPSPAN_MAX_PENDING", 65536, int, problems))
    timeline = read_timeline_settings(env, problems)
    links = link_limit(env, problems)
    export_via = env.get("OTEL_STEPSPAN_EXPORT", "").strip().lower() or "auto"
    if export_via not in ("auto", "process", "provider"):
        problems.append(f"OTEL_STEPSPAN_EXPORT={export_via!r} is not 'process' or 'provider'; choosing for each provider")
        export_via = "auto"
    return Settings(
        sdk_disabled=_flag(env, "OTEL_SDK_DISABLED"),
        export_requested=bool(exporters),
        otlp_only=exporters == ["otlp"],
        span_name=span_name,
        nvtx=_flag(env, "OTEL_STEPSPAN_NVTX"),
        gpu_timing=_flag(env, "OTEL_STEPSPAN_GPU_TIMING"),
        max_pending=max_pending,
        timeline=timeline,
        link_limit=links,
        requests=read_request_settings(env, problems, links),
        export_via=export_via,
        problems=tuple(problems),
    )
