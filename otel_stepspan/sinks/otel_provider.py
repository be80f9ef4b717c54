"""Find or build the tracer provider the step spans go to (README.md, "Turning it on").

An engine (or ``opentelemetry-instrument``) that already set an SDK provider keeps it: we only
take a tracer from it. Only when nobody set one and the standard variables ask for export do we
build one, once per process, the first time a step runs. Doing it that late, rather than at
import, leaves the engine free to set its own provider first, and lets each spawned or forked
worker build its own exporter threads.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Mapping, Optional

from opentelemetry import trace

from ..settings import ExportConfigError, exporters_requested, otlp_protocol, otlp_setting

logger = logging.getLogger("otel_stepspan")

_lock = threading.Lock()


def current_provider() -> Optional[trace.TracerProvider]:
    """The provider the process set, or ``None`` if there is none that records spans."""
    provider = getattr(trace, "_TRACER_PROVIDER", None)
    if provider is None or isinstance(provider, (trace.NoOpTracerProvider, trace.ProxyTracerProvider)):
        return None
    return provider


def provider_link_limit(provider: trace.TracerProvider) -> Optional[int]:
    """The links an SDK provider keeps on a span (its ``SpanLimits``), None when unbounded or
    not an SDK provider: a step span made through it must not carry more, or the SDK would drop
    the rest silently while ``forward.request_links`` counted them."""
    limits = getattr(provider, "_span_limits", None)
    max_links = getattr(limits, "max_links", None)
    return max_links if isinstance(max_links, int) and max_links >= 0 else None


def _otlp_exporter(environ: Mapping[str, str]):
    """The SDK's OTLP exporter for the protocol asked for; it reads the other variables itself
    (endpoint, headers, compression, timeout), as our own senders do (one reader of the
    variables: :func:`otel_stepspan.settings.otlp_setting`)."""
    if otlp_protocol(environ) == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter()
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HTTPExporter

    certificate = otlp_setting(environ, "CERTIFICATE")
    if certificate:
        # requests lets REQUESTS_CA_BUNDLE / CURL_CA_BUNDLE override a session's CA file, so
        # on machines that set them the OTLP certificate would be ignored: keep the
        # environment out of this session (proxies from the environment included).
        import requests

        session = requests.Session()
        session.trust_env = False
        session.verify = certificate
        return HTTPExporter(session=session)
    return HTTPExporter()


def _exporter(name: str, environ: Mapping[str, str]):
    if name == "otlp":
        return _otlp_exporter(environ)
    if name == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter()
    raise ExportConfigError(
        f"OTEL_TRACES_EXPORTER names {name!r}; supported here: otlp, console, none"
    )


class ExportHealth:
    """What happened to spans after they left the step sink, for the providers we built.

    The SDK's batch processor warns once per dropped span when its queue is full (during a
    collector outage: once per step) and drops silently otherwise; here the drops and failed
    exports are counted instead, and the step sink reports them in one line per interval.
    """

    def __init__(self) -> None:
        self.exported = 0
        self.export_failed = 0
        self.queue_full = 0

    def snapshot(self) -> tuple[int, int, int]:
        return self.exported, self.export_failed, self.queue_full


health = ExportHealth()


def _counting_processor(exporter):
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

    class CountingExporter(SpanExporter):
        def export(self, spans):
            result = exporter.export(spans)
            if result == SpanExportResult.SUCCESS:
                health.exported += len(spans)
            else:
                health.export_failed += len(spans)
            return result

        def shutdown(self):
            return exporter.shutdown()

        def force_flush(self, timeout_millis: int = 30000):
            return exporter.force_flush(timeout_millis)

    class CountingBatchSpanProcessor(BatchSpanProcessor):
        def on_end(self, span):
            queue = getattr(getattr(self, "_batch_processor", None), "_queue", None)
            if queue is not None and queue.maxlen is not None and len(queue) >= queue.maxlen:
                health.queue_full += 1
                return
            super().on_end(span)

    return CountingBatchSpanProcessor(CountingExporter())


def add_env_exporters(provider, environ: Optional[Mapping[str, str]] = None) -> list[str]:
    """Add one batch processor per exporter that ``OTEL_TRACES_EXPORTER`` (or an OTLP endpoint)
    names; returns their names. Raises :class:`ExportConfigError` before adding anything when a
    name or protocol is not supported.

    Each exporter reads its own endpoint, headers, certificate, compression and timeout from the
    variables, and the batch processor its ``OTEL_BSP_*`` settings, as the specification defines.
    """
    env = os.environ if environ is None else environ
    names = [name for name in exporters_requested(env) if name != "none"]
    exporters = [_exporter(name, env) for name in names]
    for exporter in exporters:
        provider.add_span_processor(_counting_processor(exporter))
    return names


def build_provider(environ: Optional[Mapping[str, str]] = None):
    """An SDK provider configured from the standard variables: the SDK reads the resource
    (``OTEL_SERVICE_NAME``, ``OTEL_RESOURCE_ATTRIBUTES``) and the sampler
    (``OTEL_TRACES_SAMPLER[_ARG]``); :func:`add_env_exporters` adds the exporters."""
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import SpanLimits, TracerProvider

    from ..settings import link_limit

    # Links as the step sink keeps them (a whole batch by default), not the SDK's 128.
    limits = SpanLimits(max_links=link_limit(os.environ if environ is None else environ, []))
    provider = TracerProvider(resource=Resource.create({"process.pid": os.getpid()}), span_limits=limits)
    try:
        add_env_exporters(provider, environ)
    except ExportConfigError:
        provider.shutdown()
        raise
    return provider


def resolve_provider(export_requested: bool) -> Optional[trace.TracerProvider]:
    """The provider to use now, building and installing one if the environment asks for it."""
    provider = current_provider()
    if provider is not None or not export_requested:
        return provider
    with _lock:
        provider = current_provider()
        if provider is None:
            try:
                built = build_provider()
            except ExportConfigError as exc:
                logger.error("otel_stepspan: OpenTelemetry export is off: %s", exc)
                return None
            trace.set_tracer_provider(built)
            provider = current_provider()
    return provider
