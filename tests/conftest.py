"""Shared fixtures: a clean OTEL_* environment per test and a fresh in-memory tracer provider."""

from __future__ import annotations

import os

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import otel_stepspan
from otel_stepspan import runtime
from otel_stepspan.timeline import ROOT_NAME


@pytest.fixture(autouse=True)
def clean_otel_env(monkeypatch):
    """No test sees the OTEL_* variables of the machine it runs on, nor a provider set by
    another test."""
    for key in list(os.environ):
        if key.startswith("OTEL_"):
            monkeypatch.delenv(key)
    monkeypatch.setattr(trace, "_TRACER_PROVIDER", None)
    runtime.refresh_settings()
    yield
    runtime.refresh_settings()


class MemorySpans:
    def __init__(self) -> None:
        self.exporter = InMemorySpanExporter()
        self.provider = TracerProvider()
        self.provider.add_span_processor(SimpleSpanProcessor(self.exporter))

    def all_spans(self):
        """Every span so far, timeline roots included (the OTel sink creates them off-thread:
        flush first)."""
        assert otel_stepspan.flush(10.0)
        return list(self.exporter.get_finished_spans())

    def spans(self):
        """Every step span so far: without the timeline roots."""
        return [span for span in self.all_spans() if "forward.mode" in (span.attributes or {})]

    def timelines(self):
        """The timeline roots ended so far."""
        return [span for span in self.all_spans() if span.name == ROOT_NAME]


@pytest.fixture
def memory_spans(monkeypatch) -> MemorySpans:
    """An SDK provider installed as the process's provider for this test only."""
    memory = MemorySpans()
    monkeypatch.setattr(trace, "_TRACER_PROVIDER", memory.provider)
    yield memory
    otel_stepspan.flush(5.0)
    memory.provider.shutdown()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """In CI (OTEL_STEPSPAN_REQUIRE_BACKENDS=1) a skipped real-backend or real-engine test is a
    failure: there, the Collector, Jaeger and the engines' environments are always built."""
    outcome = yield
    report = outcome.get_result()
    if (
        report.skipped
        and any(item.get_closest_marker(name) is not None for name in ("backends", "engines"))
        and os.environ.get("OTEL_STEPSPAN_REQUIRE_BACKENDS") == "1"
    ):
        report.outcome = "failed"
        report.longrepr = f"real-backend or real-engine test skipped in CI: {report.longrepr}"


@pytest.fixture(scope="module")
def jaeger_stack(tmp_path_factory):
    """The real Collector, Jaeger and Prometheus (scripts/backends.py, LocalBackends) for one test
    module: what a user reads from Jaeger."""
    from jaeger_requests import backends

    with backends.LocalBackends(tmp_path_factory.mktemp("jaeger")) as stack:
        yield stack
