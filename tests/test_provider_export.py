"""Reading an SDK provider as the exporter process's variables: what the engines set up (sglang's
``--enable-trace``, vLLM's ``--otlp-traces-endpoint``, ``opentelemetry-instrument``) is read
back exactly; anything the variables cannot say keeps the spans on the provider, with a reason."""

from __future__ import annotations

import json

import pytest
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter
from opentelemetry.exporter.otlp.proto.http import Compression
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider, sampling
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SimpleSpanProcessor

from otel_stepspan.exporter.transport import GrpcSender, HttpSender
from otel_stepspan.settings import RESOURCE_VARIABLE
from otel_stepspan.sinks.provider_export import NotOtlp, provider_export


def _provider(*exporters, sampler=None, processor=BatchSpanProcessor, **resource) -> TracerProvider:
    provider = TracerProvider(resource=Resource.create(resource or {"service.name": "engine"}), sampler=sampler)
    for exporter in exporters:
        provider.add_span_processor(processor(exporter))
    return provider


def test_sglangs_provider_becomes_the_same_grpc_export():
    """As sglang 0.5.23's process_tracing_init builds it: gRPC, insecure, batch processor."""
    provider = _provider(GrpcExporter(endpoint="collector:4317", insecure=True), **{"service.name": "sglang"})
    export = provider_export(provider)
    sender = GrpcSender(export.environ)
    try:
        assert sender.endpoint == "http://collector:4317" and sender.metadata == ()
    finally:
        sender.close()
    assert export.environ["OTEL_TRACES_SAMPLER"] == "parentbased_always_on"
    assert json.loads(export.environ[RESOURCE_VARIABLE])["service.name"] == "sglang"
    assert export.description == "OTLP grpc to http://collector:4317"


def test_http_settings_headers_and_certificate_are_carried(tmp_path):
    certificate = tmp_path / "ca.pem"
    certificate.write_text("not read here")
    exporter = HttpExporter(endpoint="https://collector:4318/v1/traces", certificate_file=str(certificate),
                            headers={"Authorization": "Bearer a=b,c"}, timeout=7, compression=Compression.Gzip)
    environ = provider_export(_provider(exporter)).environ
    sender = HttpSender(environ)
    try:
        assert sender.endpoint == "https://collector:4318/v1/traces"
        assert sender.headers["authorization"] == "Bearer a=b,c"  # quoted through the variable and back
        assert sender.gzip and sender.timeout_s == 7.0
    finally:
        sender.close()
    assert environ["OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE"] == str(certificate)


@pytest.mark.parametrize("sampler, variables", [
    (sampling.ParentBased(sampling.TraceIdRatioBased(0.25)),
     {"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.25"}),
    (sampling.TraceIdRatioBased(0.5), {"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.5"}),
    (sampling.ALWAYS_OFF, {"OTEL_TRACES_SAMPLER": "always_off"}),
    (sampling.ParentBased(sampling.ALWAYS_OFF), {"OTEL_TRACES_SAMPLER": "parentbased_always_off"}),
])
def test_the_standard_samplers_are_named(sampler, variables):
    environ = provider_export(_provider(GrpcExporter(endpoint="c:4317", insecure=True), sampler=sampler)).environ
    assert {k: v for k, v in environ.items() if k.startswith("OTEL_TRACES_SAMPLER")} == variables


class _Custom(sampling.Sampler):
    def should_sample(self, *args, **kwargs):
        return sampling.SamplingResult(sampling.Decision.RECORD_AND_SAMPLE)

    def get_description(self):
        return "custom"


@pytest.mark.parametrize("provider, reason", [
    (lambda: _provider(ConsoleSpanExporter(), processor=SimpleSpanProcessor), "an exporter that is not OTLP"),
    (lambda: _provider(GrpcExporter(endpoint="a:4317", insecure=True), GrpcExporter(endpoint="b:4317", insecure=True)),
     "more than one OTLP destination"),
    (lambda: _provider(GrpcExporter(endpoint="a:4317", insecure=True), sampler=_Custom()), "a sampler the variables cannot name (_Custom)"),
    (lambda: _provider(GrpcExporter(endpoint="a:4317", insecure=True),
                       sampler=sampling.ParentBased(sampling.ALWAYS_ON, remote_parent_not_sampled=sampling.ALWAYS_ON)),
     "a sampler the variables cannot name (ParentBased)"),
    (lambda: _provider(), "the provider has no span processor"),
])
def test_what_the_variables_cannot_say_stays_on_the_provider(provider, reason):
    with pytest.raises(NotOtlp, match=reason.replace("(", r"\(").replace(")", r"\)")):
        provider_export(provider())


def test_two_processors_to_one_destination_are_one_export():
    provider = _provider(GrpcExporter(endpoint="a:4317", insecure=True), GrpcExporter(endpoint="a:4317", insecure=True))
    assert provider_export(provider).environ["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"] == "http://a:4317"
