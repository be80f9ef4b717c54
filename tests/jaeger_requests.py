"""What the request tests against the real Jaeger share: putting a run's spans into Jaeger, waiting
until it holds all of them, and holding ``otel-stepspan request`` from Jaeger to the same report
from the run's spans file."""

from __future__ import annotations

import json
import sys
import time
import urllib.request
from pathlib import Path
from typing import Iterable

from otel_stepspan.cli.jaeger import JaegerClient
from otel_stepspan.cli.main import main as cli_main
from otel_stepspan.otlp_json import StepSpan, iter_otlp_documents, iter_spans, otlp_json_to_request

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import backends  # noqa: E402,F401  (scripts/backends.py: LocalBackends for the tests that import this)


def replay(spans_file: Path, otlp_http_endpoint: str) -> int:
    """Send every OTLP/JSON document of ``spans_file`` to a Collector's OTLP/HTTP receiver as
    the protobuf an SDK sends; the spans' ids and times are kept. Returns the documents sent."""
    sent = 0
    for document in iter_otlp_documents(spans_file):
        body = otlp_json_to_request(document).SerializeToString()
        request = urllib.request.Request(
            otlp_http_endpoint.rstrip("/") + "/v1/traces", data=body,
            headers={"Content-Type": "application/x-protobuf"}, method="POST",
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            assert response.status == 200, response.status
        sent += 1
    return sent


def spans_by_trace(spans: Iterable[StepSpan]) -> dict[str, set[str]]:
    traces: dict[str, set[str]] = {}
    for span in spans:
        traces.setdefault(span.trace_id, set()).add(span.span_id)
    return traces


def wait_until_stored(jaeger_url: str, spans_file: Path, timeout_s: float = 120) -> dict[str, list[StepSpan]]:
    """Every trace of the file as Jaeger returns it, once Jaeger holds each of its spans."""
    expected = spans_by_trace(iter_spans(spans_file))
    client = JaegerClient(jaeger_url, timeout_s=30)
    held: dict[str, list[StepSpan]] = {}
    deadline = time.monotonic() + timeout_s
    while True:
        for trace_id, span_ids in expected.items():
            if trace_id in held and {s.span_id for s in held[trace_id]} >= span_ids:
                continue
            held[trace_id] = list(iter_spans(client.get_trace(trace_id)))
        missing = {t: ids - {s.span_id for s in held[t]} for t, ids in expected.items()}
        missing = {t: ids for t, ids in missing.items() if ids}
        if not missing:
            return held
        if time.monotonic() > deadline:
            raise AssertionError(f"Jaeger lacks {sum(map(len, missing.values()))} spans of {len(missing)} traces")
        time.sleep(1.0)


def request_report(capsys, key: str, *source: str) -> dict:
    """``otel-stepspan request KEY <source> --json``, the CLI itself, in this process."""
    status = cli_main(["request", key, *source, "--json"])
    out, err = capsys.readouterr()
    assert status == 0, f"request {key} {' '.join(source)}: exit {status}: {err}"
    return json.loads(out)


def traced_requests(spans_file: Path) -> dict[str, str]:
    """Request id -> trace id of every request the file's steps link to."""
    found: dict[str, str] = {}
    for span in iter_spans(spans_file):
        for link in span.links:
            request_id = link.attributes.get("request.id")
            if isinstance(request_id, str):
                found.setdefault(request_id, link.trace_id)
    return found


def assert_reports_lead_to_the_windows_of_their_steps(held: dict[str, list[StepSpan]], trace_id: str) -> None:
    """The request's ``request.steps`` spans, as Jaeger holds them, are children of a span of its
    trace, count its steps, and link to exactly the windows (or lone steps) holding them."""
    everything = [span for spans in held.values() for span in spans]
    steps = [s for s in everything if "forward.mode" in s.attributes and any(l.trace_id == trace_id for l in s.links)]
    assert steps, f"no step links to {trace_id}"
    by_id = {(s.trace_id, s.span_id): s for s in everything}
    places = {
        (s.trace_id, s.parent_span_id) if by_id.get((s.trace_id, s.parent_span_id), s).name == "timeline"
        else (s.trace_id, s.span_id)
        for s in steps
    }
    reports = [s for s in held[trace_id] if s.name == "request.steps"]
    assert reports, f"request trace {trace_id} holds no request.steps span"
    assert {(l.trace_id, l.span_id) for r in reports for l in r.links} == places
    assert sum(r.attributes["request.steps"] for r in reports) == len(steps)
    assert all(r.parent_span_id for r in reports)
