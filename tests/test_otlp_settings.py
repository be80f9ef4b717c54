"""One reader of the OTLP exporter variables, for the exporter process and the in-process SDK
exporter alike: the traces-specific variable first, then the general one."""

from __future__ import annotations

import pytest
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HTTPExporter

from otel_stepspan.exporter.transport import HttpSender, sender_from_environment
from otel_stepspan.settings import ExportConfigError, otlp_protocol, otlp_setting
from otel_stepspan.sinks.otel_provider import _otlp_exporter


def test_the_traces_variable_wins_and_blank_means_unset():
    environ = {"OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": " HTTP/protobuf ", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
               "OTEL_EXPORTER_OTLP_TRACES_HEADERS": "  ", "OTEL_EXPORTER_OTLP_HEADERS": "a=b"}
    assert otlp_protocol(environ) == "http/protobuf"
    assert otlp_setting(environ, "HEADERS") == "a=b"
    assert otlp_setting(environ, "TIMEOUT") is None
    assert otlp_protocol({}) == "grpc"


def test_both_exporters_read_the_same_protocol_and_refuse_the_same_one():
    environ = {"OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}
    assert isinstance(sender_from_environment(environ), HttpSender)
    assert isinstance(_otlp_exporter(environ), HTTPExporter)
    for read in (sender_from_environment, _otlp_exporter, otlp_protocol):
        with pytest.raises(ExportConfigError, match="'http/json' is not supported"):
            read({"OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"})
