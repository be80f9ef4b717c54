"""The variables that turn the sinks on (CONTRACT §3), read once per process.

Pure: reads a mapping (``os.environ`` by default) and imports nothing heavy. Engines start their
workers with ``spawn``; each worker re-imports this module and so reads the environment it
inherited, which is what makes "configured only through ``OTEL_*`` variables" work there too.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Mapping, Optional

from .timeline import TimelineSettings, read_timeline_settings

_TRUE = {"1", "true", "yes", "on"}


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


def read_settings(environ: Optional[Mapping[str, str]] = None) -> Settings:
    env = os.environ if environ is None else environ
    problems: list[str] = []
    exporters = [name for name in exporters_requested(env) if name != "none"]
    span_name = env.get("OTEL_STEPSPAN_SPAN_NAME", "label").strip().lower() or "label"
    if span_name not in ("label", "mode"):
        problems.append(f"OTEL_STEPSPAN_SPAN_NAME={span_name!r} is not 'label' or 'mode'; using 'label'")
        span_name = "label"
    raw_pending = env.get("OTEL_STEPSPAN_MAX_PENDING", "").strip()
    max_pending = 65536
    if raw_pending:
        try:
            max_pending = int(raw_pending)
            if max_pending < 1:
                raise ValueError
        except ValueError:
            problems.append(f"OTEL_STEPSPAN_MAX_PENDING={raw_pending!r} is not a positive integer; using 65536")
            max_pending = 65536
    timeline, timeline_problems = read_timeline_settings(env)
    problems += timeline_problems
    return Settings(
        sdk_disabled=_flag(env, "OTEL_SDK_DISABLED"),
        export_requested=bool(exporters),
        otlp_only=exporters == ["otlp"],
        span_name=span_name,
        nvtx=_flag(env, "OTEL_STEPSPAN_NVTX"),
        gpu_timing=_flag(env, "OTEL_STEPSPAN_GPU_TIMING"),
        max_pending=max_pending,
        problems=tuple(problems),
        timeline=timeline,
    )
