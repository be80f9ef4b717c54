"""A request, as a user finds it in Jaeger: the reference engine's demo exports to the real
Collector and Jaeger through OTEL_* variables (and writes its spans file beside), with request
tracing on and windows small enough that requests span several of them.

- ``otel-stepspan request`` from Jaeger equals the report from the spans file, for every traced
  request, by trace id and by request id: Jaeger drops link attributes, the step's request arrays
  carry them.
- Every request's trace, as Jaeger returns it, holds the project's ``request.steps`` span, whose
  links lead to exactly the windows holding the request's steps; the UI's own trace API shows
  them as references.
- The UI's search for decode steps at least the run's p90 decode duration long answers exactly
  the windows holding such a step (through the search front, scripts/backends.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import pytest

from backends_support import requires_go
from jaeger_requests import (
    assert_reports_lead_to_the_windows_of_their_steps,
    request_report,
    traced_requests,
    wait_until_stored,
)

pytestmark = [pytest.mark.backends, requires_go]

SERVICE = "otel-stepspan-requests"


@pytest.fixture(scope="module")
def run(jaeger_stack, tmp_path_factory):
    workdir, stack = tmp_path_factory.mktemp("jaeger-requests"), jaeger_stack
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env.update({
        "OTEL_SERVICE_NAME": SERVICE,
        "OTEL_EXPORTER_OTLP_ENDPOINT": stack.otlp_grpc_endpoint,
        "OTEL_BSP_SCHEDULE_DELAY": "200",
        "OTEL_STEPSPAN_TIMELINE_STEPS": "8",  # many windows: several per request, not all slow
    })
    result = subprocess.run(
        [sys.executable, "-m", "otel_stepspan.cli", "demo", "--requests", "12", "--no-profiler", "--quiet",
         "--out-dir", str(workdir)],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    spans_file = workdir / "spans.jsonl"
    held = wait_until_stored(stack.jaeger_url, spans_file)
    return {"jaeger": stack.jaeger_url, "direct": stack.jaeger_direct_url, "file": spans_file, "held": held,
           "requests": traced_requests(spans_file)}


def test_a_requests_report_from_jaeger_equals_the_one_from_the_spans_file(run, capsys):
    assert len(run["requests"]) == 12
    jaeger = ("--jaeger", run["jaeger"], "--since", "1h")
    for request_id, trace_id in run["requests"].items():
        from_file = request_report(capsys, trace_id, "--file", str(run["file"]))
        assert from_file["tokens"] > 0 and {s["work"] for s in from_file["steps"]} <= {"prefill", "decode"}
        assert request_report(capsys, trace_id, *jaeger) == from_file
        by_id = request_report(capsys, request_id, *jaeger)
        assert by_id == {**from_file, "key": request_id}


def test_every_requests_trace_holds_its_report_linked_to_the_windows_of_its_steps(run):
    windows = {s.trace_id for spans in run["held"].values() for s in spans if s.name == "timeline"}
    assert len(windows) >= 3
    spread = 0
    for trace_id in run["requests"].values():
        assert_reports_lead_to_the_windows_of_their_steps(run["held"], trace_id)
        spread += sum(len(s.links) for s in run["held"][trace_id] if s.name == "request.steps") > 1
    assert spread, "no request spans several windows: the test would not see a wrong link"


def test_the_jaeger_ui_shows_the_reports_links_as_references(run):
    """The trace view calls /api/traces/{id}; a link becomes a FOLLOWS_FROM reference there."""
    trace_id = next(iter(run["requests"].values()))
    with urllib.request.urlopen(f"{run['jaeger']}/api/traces/{trace_id}", timeout=30) as response:
        [trace] = json.loads(response.read())["data"]
    [report] = [s for s in trace["spans"] if s["operationName"] == "request.steps"]
    references = {(r["traceID"], r["spanID"]) for r in report["references"] if r["refType"] == "FOLLOWS_FROM"}
    held = [s for s in run["held"][trace_id] if s.name == "request.steps"]
    assert references == {(link.trace_id, link.span_id) for s in held for link in s.links}
    parent = [r for r in report["references"] if r["refType"] == "CHILD_OF"]
    assert [r["spanID"] for r in parent] == [held[0].parent_span_id]
    tags = {t["key"]: t["value"] for t in report["tags"]}
    assert tags["request.steps"] > 0 and tags["request.id"] in run["requests"]


def _ui_search(base: str, **params: str) -> set[str]:
    """The trace ids of the Jaeger UI's search (GET /api/traces, as the UI sends it)."""
    now_us = time.time_ns() // 1000
    query = {"service": SERVICE, "start": str(now_us - 3600 * 10**6), "end": str(now_us + 60 * 10**6),
             "lookback": "1h", "limit": "1000", **params}
    with urllib.request.urlopen(f"{base}/api/traces?{urllib.parse.urlencode(query)}", timeout=60) as response:
        return {trace["traceID"] for trace in json.loads(response.read())["data"]}


def test_the_uis_search_for_slow_decodes_answers_exactly_the_windows_holding_one(run):
    """At the run's p90 decode duration (as Jaeger keeps it, in microseconds): the windows holding
    a decode at least that long, all of them and no other. Jaeger alone (Badger) matches the tag
    and the duration on any two spans of a window, so it answers at least those; that it answers
    more is shown on planted windows (tests/test_search_front.py)."""
    decodes = [s for spans in run["held"].values() for s in spans if s.attributes.get("forward.mode") == "decode"]
    durations_us = sorted(s.duration_ns // 1000 for s in decodes)
    p90_us = durations_us[int(0.9 * (len(durations_us) - 1))]
    expected = {s.trace_id for s in decodes if s.duration_ns // 1000 >= p90_us}
    assert expected
    conditions = {"tags": json.dumps({"forward.mode": "decode"}), "minDuration": f"{p90_us}us"}
    assert _ui_search(run["jaeger"], **conditions) == expected
    assert _ui_search(run["direct"], **conditions) >= expected
