"""A request, as a user finds it in Jaeger: the reference engine's demo exports to the real
Collector and Jaeger through OTEL_* variables (and writes its spans file beside), with request
tracing on and windows small enough that requests span several of them.

- ``otel-stepspan request`` from Jaeger equals the report from the spans file, for every traced
  request, by trace id and by request id: Jaeger drops link attributes, the step's request arrays
  carry them.
- Every request's trace, as Jaeger returns it, holds the project's ``request.steps`` span, whose
  links lead to exactly the windows holding the request's steps; the UI's own trace API shows
  them as references.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))
import backends  # noqa: E402
from backends_support import requires_go  # noqa: E402
from jaeger_requests import (  # noqa: E402
    assert_reports_lead_to_the_windows_of_their_steps,
    request_report,
    traced_requests,
    wait_until_stored,
)

pytestmark = [pytest.mark.backends, requires_go]

SERVICE = "otel-stepspan-requests"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("jaeger-requests")
    with backends.LocalBackends(workdir) as stack:
        env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
        env.update({
            "OTEL_SERVICE_NAME": SERVICE,
            "OTEL_EXPORTER_OTLP_ENDPOINT": stack.otlp_grpc_endpoint,
            "OTEL_BSP_SCHEDULE_DELAY": "200",
            "OTEL_STEPSPAN_TIMELINE_STEPS": "40",  # several windows per request
        })
        result = subprocess.run(
            [sys.executable, "-m", "otel_stepspan.cli", "demo", "--requests", "12", "--no-profiler", "--quiet",
             "--out-dir", str(workdir)],
            env=env, capture_output=True, text=True, timeout=300,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        spans_file = workdir / "spans.jsonl"
        held = wait_until_stored(stack.jaeger_url, spans_file)
        yield {"jaeger": stack.jaeger_url, "file": spans_file, "held": held, "requests": traced_requests(spans_file)}


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
