"""The search front (jaeger/search_front) against the real Collector and Jaeger (Badger).

Timeline windows with known step durations are planted through the Collector, then the UI's
search (`GET /api/traces?service=...&tags=...&minDuration=...`) is asked exactly as the UI asks
it, once through the front (what users reach) and once of Jaeger directly: through the front the
answer is the windows holding ONE span that meets every condition; Jaeger alone also returns
windows whose slow span is another one (the `timeline` root, a prefill), which shows that the
front is what makes the answer exact. Everything else passes through unchanged.

Skips only where Go is absent; CI (OTEL_STEPSPAN_REQUIRE_BACKENDS=1) turns that skip into a
failure.
"""

from __future__ import annotations

import gzip
import json
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))
import backends  # noqa: E402
from backends_support import requires_go  # noqa: E402

pytestmark = [pytest.mark.backends, requires_go]

SERVICE = "search-front-e2e"
ENVIRONMENT = "search-front-test"  # a resource attribute: a process tag in Jaeger's JSON
MS = 1_000_000  # ns

# The planted windows: (mode, batch size, duration ms) per step, one after the other in a
# `timeline` root of WINDOW_MS. Every window holds decodes, and its root lasts longer than any
# threshold searched below, so Jaeger alone (per trace) matches each of them.
WINDOW_MS = 1000
FAST = [("decode", 2, 5)] * 8 + [("decode", 8, 5)] * 4
WINDOWS = {
    "slow_prefill": FAST + [("prefill", 1, 400)],  # slow, but not a decode
    "one_slow_decode": FAST + [("decode", 4, 300)],
    "none": FAST,
    "very_slow_decode": [("decode", 2, 5)] * 8 + [("decode", 8, 600)],  # no fast bs=8 decode
}


def _plant(otlp_endpoint: str) -> dict[str, str]:
    """Export the windows over OTLP gRPC, as an engine's timeline would; their trace ids."""
    from opentelemetry import trace
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = TracerProvider(resource=Resource.create(
        {"service.name": SERVICE, "deployment.environment": ENVIRONMENT}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=otlp_endpoint, insecure=True)))
    tracer = provider.get_tracer("search-front-test")
    ids = {}
    start = time.time_ns() - 120 * 10**9
    for i, (name, steps) in enumerate(WINDOWS.items()):
        t0 = start + i * 2 * WINDOW_MS * MS
        root = tracer.start_span("timeline", start_time=t0, attributes={"timeline.steps": len(steps)})
        parent = trace.set_span_in_context(root)
        at = t0 + MS
        for mode, bs, ms in steps:
            label = f"step[{mode} bs={bs}]"
            step = tracer.start_span(label, context=parent, start_time=at, attributes={
                "forward.mode": mode, "forward.batch_size": bs, "forward.label": label})
            step.end(end_time=at + ms * MS)
            at += ms * MS + MS
        assert at < t0 + WINDOW_MS * MS
        root.end(end_time=t0 + WINDOW_MS * MS)
        ids[name] = format(root.get_span_context().trace_id, "032x")
    assert provider.force_flush(30_000)
    provider.shutdown()
    return ids


def _get(url: str, headers: dict | None = None) -> tuple[int, dict, bytes]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


def _search_url(base: str, **params: str) -> str:
    """The UI's search request: service, time range, lookback and limit, plus the conditions."""
    now_us = time.time_ns() // 1000
    query = {"service": SERVICE, "start": str(now_us - 3600 * 10**6), "end": str(now_us + 60 * 10**6),
             "lookback": "1h", "limit": "20", **params}
    return f"{base}/api/traces?{urllib.parse.urlencode(query, doseq=True)}"  # tag=… may repeat


def _search(base: str, **params: str) -> dict:
    status, _, body = _get(_search_url(base, **params))
    assert status == 200, body[:500]
    return json.loads(body)


def _names(answer: dict, ids: dict[str, str]) -> set[str]:
    by_id = {v: k for k, v in ids.items()}
    return {by_id.get(t["traceID"], t["traceID"]) for t in answer["data"]}


def _sorted_spans(trace_doc: dict) -> dict:
    """A trace with its spans in spanID order: Jaeger's own order differs from one answer to
    the next (two identical requests of Jaeger directly differ too)."""
    return {**trace_doc, "spans": sorted(trace_doc["spans"], key=lambda span: span["spanID"])}


DECODE = json.dumps({"forward.mode": "decode"})


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """The backends with the front (LocalBackends), and the windows stored in Jaeger."""
    workdir = tmp_path_factory.mktemp("search_front")
    with backends.LocalBackends(workdir) as stack:
        ids = _plant(stack.otlp_grpc_endpoint)
        deadline = time.monotonic() + 90
        expected = {ids[name]: len(steps) + 1 for name, steps in WINDOWS.items()}
        while True:  # wait until Jaeger holds every span of every window
            stored = {}
            for trace_id in expected:
                status, _, body = _get(f"{stack.jaeger_direct_url}/api/traces/{trace_id}")
                stored[trace_id] = len(json.loads(body)["data"][0]["spans"]) if status == 200 else 0
            if stored == expected or time.monotonic() > deadline:
                break
            time.sleep(1)
        assert stored == expected
        yield {"stack": stack, "ids": ids, "front": stack.jaeger_url, "direct": stack.jaeger_direct_url,
               "workdir": workdir}


def test_slow_decode_search_is_exact_through_the_front_and_not_in_jaeger_alone(planted):
    ids = planted["ids"]
    through = _search(planted["front"], tags=DECODE, minDuration="150ms")
    assert _names(through, ids) == {"one_slow_decode", "very_slow_decode"}
    assert set(through) == {"data", "total", "limit", "offset", "errors"}
    assert through["total"] == 2 and through["errors"] is None
    # Jaeger alone: decode somewhere, 150 ms somewhere (the root), so every window matches.
    direct = _search(planted["direct"], tags=DECODE, minDuration="150ms")
    assert {"slow_prefill", "none"} <= _names(direct, ids)
    # the traces come back whole, as Jaeger wrote them
    whole = {t["traceID"]: _sorted_spans(t) for t in direct["data"]}
    assert all(_sorted_spans(t) == whole[t["traceID"]] for t in through["data"])


def test_max_duration_bounds_the_same_span(planted):
    ids = planted["ids"]
    answer = _search(planted["front"], tags=DECODE, minDuration="150ms", maxDuration="400ms")
    assert _names(answer, ids) == {"one_slow_decode"}  # the 600 ms decode is above
    assert _names(_search(planted["front"], tags=DECODE, maxDuration="4ms"), ids) == set()


def test_operation_and_duration_hold_on_one_span(planted):
    ids = planted["ids"]
    operation = "step[decode bs=8]"
    answer = _search(planted["front"], operation=operation, minDuration="150ms")
    assert _names(answer, ids) == {"very_slow_decode"}
    # Jaeger alone: a fast bs=8 decode and the slow root are enough
    assert "one_slow_decode" in _names(_search(planted["direct"], operation=operation, minDuration="150ms"), ids)


def test_repeated_tag_parameters_and_process_tags(planted):
    ids = planted["ids"]
    now_us = time.time_ns() // 1000
    query = urllib.parse.urlencode([
        ("service", SERVICE), ("start", now_us - 3600 * 10**6), ("end", now_us + 60 * 10**6),
        ("limit", 20), ("minDuration", "150ms"), ("tag", "forward.mode:decode"),
        ("tag", "forward.batch_size:4"), ("tag", f"deployment.environment:{ENVIRONMENT}")])
    status, _, body = _get(f"{planted['front']}/api/traces?{query}")
    assert status == 200
    assert _names(json.loads(body), ids) == {"one_slow_decode"}  # its slow decode has bs=4
    # two tags on two spans of one window: Jaeger alone matches the window, the front does not
    split = {"tag": ["forward.mode:prefill", "forward.batch_size:8"]}
    assert "slow_prefill" in _names(_search(planted["direct"], **split), ids)
    assert _search(planted["front"], **split)["data"] == []
    other_env = _search(planted["front"], minDuration="150ms",
                        tags=json.dumps({"forward.mode": "decode", "deployment.environment": "elsewhere"}))
    assert other_env["data"] == []


def test_limit_and_the_notice_when_jaeger_returned_a_full_page(planted, tmp_path):
    ids = planted["ids"]
    one = _search(planted["front"], tags=DECODE, minDuration="150ms", limit="1")
    assert len(one["data"]) == 1 and _names(one, ids) <= {"one_slow_decode", "very_slow_decode"}
    assert one["errors"] is None  # the page holds `limit` matches: nothing to say
    # A front asking Jaeger for limit x 1 candidates: 2 come back (a full page), 1 matches.
    port = backends.free_port()
    front = backends.start_search_front(port, planted["direct"], tmp_path / "front.log", factor=1)
    try:
        answer = _search(f"http://127.0.0.1:{port}", operation="step[decode bs=8]", minDuration="150ms",
                         limit="2")
    finally:
        backends.stop(front)
    assert _names(answer, ids) <= {"very_slow_decode"}
    assert len(answer["errors"]) == 1
    assert "full page" in answer["errors"][0]["msg"] and "Narrow the search" in answer["errors"][0]["msg"]
    log = (tmp_path / "front.log").read_text()
    assert "asked=2 candidates=2" in log and "full=true" in log


def test_gzip_is_decoded_and_answered(planted):
    ids = planted["ids"]
    status, headers, body = _get(_search_url(planted["front"], tags=DECODE, minDuration="150ms"),
                                 {"Accept-Encoding": "gzip, deflate, br"})
    assert status == 200 and headers.get("Content-Encoding") == "gzip"
    assert _names(json.loads(gzip.decompress(body)), ids) == {"one_slow_decode", "very_slow_decode"}


def test_everything_else_passes_through_unchanged(planted):
    front, direct, ids = planted["front"], planted["direct"], planted["ids"]
    for path in ("/api/v3/services", "/api/services", f"/api/v3/traces/{ids['none']}"):
        got, want = _get(front + path), _get(direct + path)
        assert got[0] == want[0] == 200, path
        assert got[2] == want[2], path  # byte for byte
    # /api/traces/{id}: Jaeger orders the spans differently on each answer; the rest is equal
    got, want = _get(f"{front}/api/traces/{ids['none']}"), _get(f"{direct}/api/traces/{ids['none']}")
    assert got[0] == want[0] == 200 and len(got[2]) == len(want[2])
    got_doc, want_doc = json.loads(got[2]), json.loads(want[2])
    assert [_sorted_spans(t) for t in got_doc["data"]] == [_sorted_spans(t) for t in want_doc["data"]]
    assert {**got_doc, "data": None} == {**want_doc, "data": None}
    # a search with no condition on a span is Jaeger's own
    plain = _search(front)
    assert _names(plain, ids) == _names(_search(direct), ids) >= set(WINDOWS)


def test_jaeger_errors_pass_through(planted):
    # The front reads the conditions; Jaeger refuses the start time: its answer comes back as is.
    url = _search_url(planted["front"], tags=DECODE, minDuration="150ms", start="yesterday")
    got = _get(url)
    want = _get(url.replace(planted["front"], planted["direct"]))
    assert got[0] == want[0] == 400
    assert got[2] == want[2] and b"start" in got[2]
    # ...and one the front cannot parse goes to Jaeger untouched
    bad = _get(_search_url(planted["front"], tags="{not json", minDuration="150ms"))
    assert bad[0] == 400 and b"tags" in bad[2]


def test_one_log_line_per_filtered_search(planted):
    _search(planted["front"], tags=DECODE, minDuration="151ms")
    log = (planted["workdir"] / "search_front.log").read_text()
    line = [line for line in log.splitlines() if "minDuration=151ms" in line][-1]
    assert "asked=100" in line and "kept=2" in line and " ms=" in line
