"""Jaeger's Monitor tab, for real: the Collector's span_metrics connector, Prometheus scraping it
with the project's prometheus/prometheus.yml, and Jaeger v2 querying Prometheus with the
project's jaeger/config.yaml, all three built from their Go modules at the versions
docker-compose.yml pins and run on 127.0.0.1 (scripts/backends.py, LocalBackends).

An engine stand-in sends a known number of steps of each mode; the tests then ask Jaeger what
the Monitor tab asks it (GET /api/metrics/calls and /latencies, grouped by operation, span kind
internal) and ask Prometheus for the counts. Nothing is timed: each check polls, with a
generous deadline, until the answer is complete, then asserts on it.

Skips only where Go is absent; CI (OTEL_STEPSPAN_REQUIRE_BACKENDS=1) turns that skip into a
failure.
"""

from __future__ import annotations

import json
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import backends  # noqa: E402
from backends_support import EngineRun, monitor_series, poll, prometheus_query, requires_go  # noqa: E402

pytestmark = [pytest.mark.backends, requires_go]

SERVICE = "otel-stepspan-monitor"
NOT_A_STEP = "(not a step)"  # prometheus/prometheus.yml: the timeline roots' row
DEADLINE_S = 120


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """Collector, Jaeger and Prometheus on free local ports. Jaeger's own OTLP exporter (used
    only if its self-tracing were on) points at its own receiver, as it does in a container:
    a `jaeger` service would then show up in its service list."""
    stack = backends.LocalBackends(tmp_path_factory.mktemp("monitor"))
    stack.jaeger_env.update({"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{stack.jaeger_ports.otlp_grpc}",
                             "OTEL_BSP_SCHEDULE_DELAY": "200"})
    with stack:
        yield stack


@pytest.fixture(scope="module")
def run(stack):
    """12 s of paced steps (prefill, decode x3, mixed, idle) at 50 a second: longer than a few
    of the connector's 5 s flushes and Prometheus's 5 s scrapes, so the rates Jaeger computes
    have more than one sample to work with."""
    run = EngineRun.start(stack.otlp_grpc_endpoint, SERVICE, 12, 50).finish()
    assert run.loss_lines == [], run.stderr
    assert set(run.sent) == {"prefill", "decode", "mixed", "idle"}
    return run


def _prometheus(stack, query: str) -> dict[str, float]:
    """An instant PromQL query: {span_name: value}."""
    return prometheus_query(stack.prometheus_url, query, "span_name")


def _poll(fetch, done):
    return poll(fetch, done, DEADLINE_S, 2.0)


def _expected_operations(run) -> set[str]:
    return {f"step[{mode}]" for mode in run.sent} | {NOT_A_STEP}


def test_prometheus_counts_every_step_by_mode_exactly(stack, run):
    expected = {f"step[{mode}]": float(n) for mode, n in run.sent.items()}
    query = f'sum by (span_name) (traces_span_metrics_calls_total{{service_name="{SERVICE}"}})'
    # (the connector reports a new series as 0 first, then its count: poll for both)
    got = _poll(lambda: _prometheus(stack, query),
                lambda got: {k: v for k, v in got.items() if k != NOT_A_STEP} == expected
                and got.get(NOT_A_STEP, 0) >= 1)
    assert {k: v for k, v in got.items() if k != NOT_A_STEP} == expected
    assert got.get(NOT_A_STEP, 0) >= 1  # the timeline roots: counted, under one name
    # the series keep the connector's own label too, for PromQL by mode
    by_mode = _prometheus(stack, f'count by (span_name, forward_mode) '
                                 f'(traces_span_metrics_calls_total{{service_name="{SERVICE}"}})')
    assert set(by_mode) == set(got)


def _shown(points: list) -> bool:
    """A value the Monitor tab draws: a number above zero (Jaeger sends "NaN" where Prometheus
    had no increase to compute a rate or a quantile from)."""
    return any(isinstance(v, (int, float)) and v == v and v > 0 for v in points)


def _steps_shown(series: dict, run) -> bool:
    steps = _expected_operations(run) - {NOT_A_STEP}
    return set(series) >= steps and all(_shown(points) for op in steps for points in series[op])


def test_monitor_tab_lists_one_call_rate_series_per_mode(stack, run):
    series = _poll(lambda: monitor_series(stack.jaeger_url, SERVICE, "calls"), lambda s: _steps_shown(s, run))
    assert set(series) == _expected_operations(run)
    assert all(len(per_op) == 1 for per_op in series.values()), series  # one series per mode
    for operation, (points,) in series.items():
        assert points and all(v >= 0 for v in points if v == v), (operation, points)
    assert _steps_shown(series, run), series  # a rate the tab draws, for every mode


def test_monitor_tab_lists_one_latency_series_per_mode(stack, run):
    series = _poll(lambda: monitor_series(stack.jaeger_url, SERVICE, "latencies", quantile="0.95"),
                   lambda s: _steps_shown(s, run))
    assert set(series) == _expected_operations(run)
    assert all(len(per_op) == 1 for per_op in series.values()), series
    assert _steps_shown(series, run), series  # a p95 in ms, not NaN, for every mode
    p95 = {op: max(v for v in points if v == v) for op, (points,) in series.items() if op != NOT_A_STEP}
    assert all(0 < ms < 10_000 for ms in p95.values()), p95  # the histogram's range, in ms


def test_monitor_tab_has_no_internal_series_for_a_service_that_sent_nothing(stack, run):
    monitor_series(stack.jaeger_url, SERVICE, "calls")  # the metrics store answers at all
    assert monitor_series(stack.jaeger_url, "no-such-service", "calls") == {}


def test_jaeger_does_not_trace_itself(stack, run):
    """Jaeger's self-tracing is off: after searches and Monitor queries (each one a span, were it
    on), the service list holds only what engines sent."""
    _poll(lambda: monitor_series(stack.jaeger_url, SERVICE, "calls"),
          lambda s: set(s) >= _expected_operations(run))
    for _ in range(5):
        urllib.request.urlopen(f"{stack.jaeger_url}/api/services", timeout=30).read()
        urllib.request.urlopen(f"{stack.jaeger_url}/api/traces?service={SERVICE}&limit=5", timeout=30).read()
    time.sleep(3)  # 15 times the export delay Jaeger's SDK would have here: nothing may arrive
    with urllib.request.urlopen(f"{stack.jaeger_url}/api/services", timeout=30) as response:
        services = json.load(response)["data"]
    assert services == [SERVICE]
