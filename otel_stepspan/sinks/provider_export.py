"""Where an SDK tracer provider exports to, as the variables of an exporter process.

An engine that traces its requests sets up a provider of its own in the process that runs the
steps (sglang ``--enable-trace``, vLLM ``--otlp-traces-endpoint``), and so does
``opentelemetry-instrument``. Step spans made through that provider would be built and exported
under the engine's GIL, by the SDK's batch thread: the stalls and shutdown losses that the
exporter process removes. Wherever the provider only exports OTLP, the exporter process can send
the same spans to the same place instead: this module reads the provider's exporter (endpoint,
protocol, headers, certificate, compression, timeout), its resource and its sampler, and says
them as the ``OTEL_*`` variables the exporter process reads. Anything it cannot say that way (a
console or custom exporter, a custom sampler, credentials built in code) keeps the spans on the
provider, with the reason.

The exporter objects keep their settings in private attributes; they are read defensively and
for the SDK releases the engines ship (1.2x to 1.4x): a field not found is a reason to stay on
the provider, never an error.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Mapping, Optional
from urllib.parse import quote

from ..settings import RESOURCE_VARIABLE, otlp_setting

_TRACES = "OTEL_EXPORTER_OTLP_TRACES_"
#: Headers the SDK's HTTP exporter adds itself; the exporter process adds its own.
_OWN_HTTP_HEADERS = {"content-type", "user-agent", "content-encoding"}


@dataclass(frozen=True)
class ProviderExport:
    #: The variables that make the exporter process export as the provider does.
    environ: Mapping[str, str]
    #: For the one line that says where step spans go, e.g. ``OTLP grpc to collector:4317``.
    description: str


class NotOtlp(Exception):
    """The provider does something the exporter process cannot do for it; the message says what."""


def provider_export(provider: Any) -> ProviderExport:
    """The exporter process's variables for ``provider``; raises :class:`NotOtlp` (with the
    reason) when its spans must stay on it."""
    exporters = [_exporter_of(processor) for processor in _processors(provider)]
    if not exporters:
        raise NotOtlp("the provider has no span processor")
    settings = {tuple(sorted(_otlp_settings(exporter).items())) for exporter in exporters}
    if len(settings) != 1:
        raise NotOtlp("the provider exports to more than one OTLP destination")
    environ = dict(next(iter(settings)))
    environ.update(_sampler_variables(getattr(provider, "sampler", None)))
    resource = getattr(provider, "resource", None)
    attributes = dict(getattr(resource, "attributes", {}) or {})
    environ[RESOURCE_VARIABLE] = json.dumps({k: list(v) if isinstance(v, tuple) else v for k, v in attributes.items()})
    description = f"OTLP {environ[_TRACES + 'PROTOCOL']} to {environ[_TRACES + 'ENDPOINT']}"
    return ProviderExport(environ, description)


def _processors(provider: Any) -> list:
    multi = getattr(provider, "_active_span_processor", None)
    processors = getattr(multi, "_span_processors", None)
    if processors is None:
        raise NotOtlp(f"{type(provider).__name__} is not the SDK's TracerProvider")
    return list(processors)


def _exporter_of(processor: Any) -> Any:
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

    if isinstance(processor, SimpleSpanProcessor):
        return processor.span_exporter
    if isinstance(processor, BatchSpanProcessor):
        inner = getattr(processor, "_batch_processor", None)  # SDK 1.33+
        exporter = getattr(inner, "_exporter", None) or getattr(processor, "span_exporter", None)
        if exporter is not None:
            return exporter
    raise NotOtlp(f"a span processor the exporter process cannot stand in for ({type(processor).__name__})")


def _otlp_settings(exporter: Any) -> dict[str, str]:
    kind = type(exporter).__module__
    if kind == "opentelemetry.exporter.otlp.proto.grpc.trace_exporter":
        return _grpc_settings(exporter)
    if kind == "opentelemetry.exporter.otlp.proto.http.trace_exporter":
        return _http_settings(exporter)
    raise NotOtlp(f"an exporter that is not OTLP ({type(exporter).__module__}.{type(exporter).__name__})")


def _field(obj: Any, name: str) -> Any:
    if not hasattr(obj, name):
        raise NotOtlp(f"this SDK's {type(obj).__name__} keeps no {name.lstrip('_')} where it is read")
    return getattr(obj, name)


def _headers_variable(headers: Any) -> str:
    pairs = headers.items() if isinstance(headers, Mapping) else (headers or ())
    return ",".join(f"{quote(str(k), safe='')}={quote(str(v), safe='')}" for k, v in pairs
                    if str(k).lower() not in _OWN_HTTP_HEADERS)


def _grpc_settings(exporter: Any) -> dict[str, str]:
    endpoint = str(_field(exporter, "_endpoint"))
    insecure = bool(_field(exporter, "_insecure"))
    if not insecure and getattr(exporter, "_credentials", None) is not None:
        # The SDK's own credentials come from the certificate variables, which the exporter
        # process reads the same way; credentials made in code cannot be read back.
        if not otlp_setting(os.environ, "CERTIFICATE"):
            raise NotOtlp("the gRPC exporter has TLS credentials made in code")
    compression = str(getattr(exporter, "_compression", "") or "").lower()
    settings = {
        _TRACES + "PROTOCOL": "grpc",
        _TRACES + "ENDPOINT": ("http://" if insecure else "https://") + endpoint.split("://")[-1],
        _TRACES + "TIMEOUT": str(float(getattr(exporter, "_timeout", 10.0) or 10.0)),
        _TRACES + "COMPRESSION": "gzip" if "gzip" in compression else "none",
    }
    headers = _headers_variable(getattr(exporter, "_headers", None))
    if headers:
        settings[_TRACES + "HEADERS"] = headers
    return settings


def _http_settings(exporter: Any) -> dict[str, str]:
    client = getattr(exporter, "_client", exporter)  # SDK 1.40+ keeps them on a client
    compression = str(getattr(client, "_compression", "") or "").lower()
    settings = {
        _TRACES + "PROTOCOL": "http/protobuf",
        _TRACES + "ENDPOINT": str(_field(client, "_endpoint")),
        _TRACES + "TIMEOUT": str(float(getattr(client, "_timeout", 10.0) or 10.0)),
        _TRACES + "COMPRESSION": "gzip" if "gzip" in compression else "none",
    }
    headers = _headers_variable(getattr(client, "_headers", None))
    if headers:
        settings[_TRACES + "HEADERS"] = headers
    session = getattr(getattr(client, "_transport", None), "_session", None) or getattr(exporter, "_session", None)
    certificate = getattr(exporter, "_certificate_file", None) or getattr(session, "verify", None)
    if isinstance(certificate, str):
        settings[_TRACES + "CERTIFICATE"] = certificate
    client_certificate = getattr(session, "cert", None)
    if isinstance(client_certificate, tuple):
        settings[_TRACES + "CLIENT_CERTIFICATE"], settings[_TRACES + "CLIENT_KEY"] = client_certificate
    elif isinstance(client_certificate, str):
        settings[_TRACES + "CLIENT_CERTIFICATE"] = client_certificate
    return settings


def _sampler_variables(sampler: Any) -> dict[str, str]:
    """``OTEL_TRACES_SAMPLER``/``_ARG`` for the SDK's standard samplers: the exporter process
    then samples each timeline window as the provider would."""
    from opentelemetry.sdk.trace import sampling

    def plain(inner: Any) -> Optional[tuple[str, Optional[float]]]:
        if type(inner) is sampling.StaticSampler:
            sampled = getattr(inner, "_decision", None) is sampling.Decision.RECORD_AND_SAMPLE
            return ("always_on" if sampled else "always_off"), None
        if type(inner) is sampling.TraceIdRatioBased:
            return "traceidratio", inner.rate
        return None

    if sampler is None:
        return {}
    found = plain(sampler)
    if found is None and type(sampler) is sampling.ParentBased:
        root = plain(getattr(sampler, "_root", None))
        delegates = [getattr(sampler, f"_{name}", None) for name in (
            "remote_parent_sampled", "local_parent_sampled", "remote_parent_not_sampled", "local_parent_not_sampled")]
        defaults = [("always_on", None)] * 2 + [("always_off", None)] * 2
        if root is not None and [plain(d) for d in delegates] == defaults:
            found = ("parentbased_" + root[0], root[1])
    if found is None:
        raise NotOtlp(f"a sampler the variables cannot name ({type(sampler).__name__})")
    name, rate = found
    return {"OTEL_TRACES_SAMPLER": name, **({"OTEL_TRACES_SAMPLER_ARG": repr(rate)} if rate is not None else {})}
