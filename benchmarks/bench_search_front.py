"""What the search front costs: the UI's search for slow decode steps, asked of Jaeger directly
and through the front, on timeline windows stored in the real Jaeger (Badger).

    .venv/bin/python benchmarks/bench_search_front.py [--windows 300] [--steps 500] [--repeat 5]

Plants WINDOWS timeline windows of STEPS steps each (decodes of 1-9 ms, a prefill every 50 steps,
and in one window out of 20 a decode of 200 ms) through the Collector, waits until Jaeger holds
them, then times `GET /api/traces?service=S&tags={"forward.mode":"decode"}&minDuration=150ms
&limit=20`, direct and through the front, alternately, and prints the median ms, how many
windows came back and how many of those hold a decode of 150 ms or more.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import backends  # noqa: E402

SERVICE = "bench-search-front"
MS = 1_000_000


def plant(endpoint: str, windows: int, steps: int) -> tuple[list[str], int]:
    """Export the windows; their trace ids, and how many hold a slow decode."""
    from opentelemetry import trace
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = TracerProvider(resource=Resource.create({"service.name": SERVICE}))
    provider.add_span_processor(BatchSpanProcessor(
        OTLPSpanExporter(endpoint=endpoint, insecure=True), max_queue_size=windows * (steps + 1),
        max_export_batch_size=512, schedule_delay_millis=200))
    tracer = provider.get_tracer("bench")
    rng = random.Random(7)
    slow = 0
    ids = []
    at = time.time_ns() - windows * 30 * 10**9 // 10
    for w in range(windows):
        t0 = at
        root = tracer.start_span("timeline", start_time=t0)
        parent = trace.set_span_in_context(root)
        slow_at = rng.randrange(steps) if w % 20 == 0 else -1
        slow += slow_at >= 0
        for i in range(steps):
            mode, ms = ("prefill", rng.uniform(5, 40)) if i % 50 == 0 else ("decode", rng.uniform(1, 9))
            if i == slow_at:
                mode, ms = "decode", 200.0
            bs = rng.randrange(1, 9)
            span = tracer.start_span(f"step[{mode} bs={bs}]", context=parent, start_time=at, attributes={
                "forward.mode": mode, "forward.batch_size": bs})
            at += int(ms * MS)
            span.end(end_time=at)
            at += MS // 5
        root.end(end_time=at)
        ids.append(format(root.get_span_context().trace_id, "032x"))
        at += 50 * MS
    provider.force_flush(600_000)
    provider.shutdown()
    return ids, slow


def search_url(base: str) -> str:
    now_us = time.time_ns() // 1000
    return f"{base}/api/traces?" + urllib.parse.urlencode({
        "service": SERVICE, "tags": json.dumps({"forward.mode": "decode"}), "minDuration": "150ms",
        "limit": "20", "lookback": "6h", "start": now_us - 6 * 3600 * 10**6, "end": now_us + 60 * 10**6})


def timed(url: str) -> tuple[float, dict]:
    t0 = time.perf_counter()
    with urllib.request.urlopen(url, timeout=600) as response:
        body = json.loads(response.read())
    return (time.perf_counter() - t0) * 1000, body


def slow_decode(trace_doc: dict) -> bool:
    for span in trace_doc["spans"]:
        tags = {t["key"]: t["value"] for t in span["tags"]}
        if tags.get("forward.mode") == "decode" and span["duration"] >= 150_000:
            return True
    return False


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--windows", type=int, default=300)
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-search-front-") as tmp, \
            backends.LocalBackends(tmp) as stack:
        t0 = time.monotonic()
        ids, slow = plant(stack.otlp_grpc_endpoint, args.windows, args.steps)
        pending = list(reversed(ids))  # the last exported first: once it is in, most are
        while pending:  # until Jaeger holds every span of every window
            try:
                _, body = timed(f"{stack.jaeger_direct_url}/api/traces/{pending[0]}")
                if len(body["data"][0]["spans"]) == args.steps + 1:
                    pending.pop(0)
                    continue
            except urllib.error.HTTPError:
                pass
            time.sleep(2)
        print(f"{args.windows} windows of {args.steps} steps ({slow} with a 200 ms decode) stored in "
              f"{time.monotonic() - t0:.0f} s")
        runs: dict[str, list[float]] = {"direct": [], "front": []}
        answers = {}
        for _ in range(args.repeat):
            for name, base in (("direct", stack.jaeger_direct_url), ("front", stack.jaeger_url)):
                ms, answers[name] = timed(search_url(base))
                runs[name].append(ms)
        print(f"{'':8} {'median ms':>10} {'min ms':>8} {'windows':>8} {'with a slow decode':>19}")
        for name, times in runs.items():
            data = answers[name]["data"]
            print(f"{name:8} {statistics.median(times):10.0f} {min(times):8.0f} {len(data):8d} "
                  f"{sum(map(slow_decode, data)):19d}")
        print("front's notice:", answers["front"].get("errors"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
