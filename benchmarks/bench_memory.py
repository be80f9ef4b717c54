"""Resident memory over a million traced steps: flat, whatever the number of steps.

Usage::

    .venv/bin/python benchmarks/bench_memory.py            # 1,000,000 steps (~1 min on 2 cores)
    .venv/bin/python benchmarks/bench_memory.py --quick    # 200,000 steps

The process sets an SDK provider whose BatchSpanProcessor exports into an exporter that drops
spans, then runs sglang-shaped steps (decode of varying size, prefill, mixed, idle) through the
instrumentor's wrapper. The engine loop only waits when the step queue holds more than 20,000
records, so every step becomes a real span (nothing is dropped) at the fastest rate the
background thread sustains. RSS is read at 0 (after a 50,000-step warm-up: the allocator's
high-water marks, the batch processor's queue and the timeline windows settle over the first tens
of thousands of steps), every quarter, and at the end, each time after ``otel_stepspan.flush()``.

Then an overload phase runs steps with no waiting at all: the step queue fills up to its bound
(``OTEL_STEPSPAN_MAX_PENDING``, 65,536), further steps are dropped and counted, and RSS stays
bounded.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import os
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common as C

MB = 1024 * 1024
WARM_UP = 50_000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="200,000 steps")
    parser.add_argument("--steps", type=int, default=None, help="steps (default 1,000,000)")
    parser.add_argument("--overload", type=int, default=None, help="steps of the overload phase (default 300,000)")
    parser.add_argument("--tolerance-mb", type=float, default=4.0, help="allowed RSS growth from 0 to the end")
    args = parser.parse_args()
    steps = args.steps or (200_000 if args.quick else 1_000_000)
    overload = args.overload if args.overload is not None else (100_000 if args.quick else 300_000)
    for key in [k for k in os.environ if k.startswith("OTEL_")]:
        del os.environ[key]
    started = time.monotonic()
    print(f"bench_memory{' --quick' if args.quick else ''}: {C.machine_line()}\n", flush=True)

    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

    import otel_stepspan
    from otel_stepspan import runtime

    class DroppingExporter(SpanExporter):
        count = 0

        def export(self, spans):
            # Step spans only: the timeline roots (one per window of steps) are not steps.
            self.count += sum(1 for span in spans if "forward.mode" in span.attributes)
            return SpanExportResult.SUCCESS

        def shutdown(self) -> None:
            return None

    exporter = DroppingExporter()
    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    runtime.refresh_settings()

    runner = C.traced_runner()
    batches = itertools.cycle(C.batch_cycle())
    stats = otel_stepspan.stats

    def run(n: int, wait: bool) -> None:
        forward = runner.forward
        for start in range(0, n, 1000):
            for batch in itertools.islice(batches, min(1000, n - start)):
                forward(batch)
            if wait and stats()["pending"] > 20_000:
                while stats()["pending"] > 5_000:
                    time.sleep(0.002)

    def settle() -> int:
        otel_stepspan.flush(60.0)
        provider.force_flush()
        gc.collect()
        return C.rss_bytes()

    run(WARM_UP, wait=True)
    marks = [(0, settle(), 0.0)]
    quarter = steps // 4
    t0 = time.perf_counter()
    for i in range(1, 5):
        run(quarter if i < 4 else steps - 3 * quarter, wait=True)
        marks.append((min(i * quarter, steps) if i < 4 else steps, settle(), time.perf_counter() - t0))
    main_stats = stats()
    exported_main = exporter.count

    rows = []
    base = marks[0][1]
    for done, rss, elapsed in marks:
        rows.append([f"{done:,}", f"{rss / MB:.1f} MB", f"{(rss - base) / MB:+.1f} MB", f"{elapsed:.0f} s"])
    print(f"### RSS over {steps:,} traced steps (OTel on, dropping exporter)\n")
    print(C.table(["steps", "RSS", "vs 0", "elapsed"], rows))
    growth = (marks[-1][1] - base) / MB
    late_growth = (marks[-1][1] - marks[1][1]) / MB
    rate = steps / marks[-1][2]
    print(
        f"\nstats: {main_stats}; exporter received {exported_main:,} spans "
        f"({WARM_UP:,} warm-up + {steps:,}); {rate:,.0f} steps/s with every step exported; "
        f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.1f} MB\n"
    )

    # Overload: no waiting, the step queue is the only buffer.
    before = settle()
    dropped_before = stats()["dropped"]
    t1 = time.perf_counter()
    run(overload, wait=False)
    burst_s = time.perf_counter() - t1
    during = C.rss_bytes()
    pending = stats()["pending"]
    after = settle()
    over_stats = stats()
    dropped = over_stats["dropped"] - dropped_before
    print(f"### Overload: {overload:,} steps with no waiting ({overload / burst_s:,.0f} steps/s)\n")
    print(
        C.table(
            ["RSS before", "RSS at end of steps", "queue then", "RSS after flush", "dropped (counted)"],
            [[f"{before / MB:.1f} MB", f"{during / MB:.1f} MB", f"{pending:,}", f"{after / MB:.1f} MB", f"{dropped:,}"]],
        )
    )
    max_pending = runtime._state.settings.max_pending
    exported_over = exporter.count - exported_main
    accounted = exported_over + dropped == overload
    print(f"\nexported {exported_over:,} + dropped {dropped:,} = {exported_over + dropped:,} of {overload:,} steps\n")

    ok_flat = growth <= args.tolerance_mb
    ok_all_exported = main_stats["dropped"] == 0 and exported_main == steps + WARM_UP
    ok_bounded = pending <= max_pending and accounted
    goals = [
        [f"RSS flat over {steps:,} steps", f"{growth:+.1f} MB (from the 1st quarter on {late_growth:+.1f} MB)",
         f"≤ {args.tolerance_mb:.0f} MB", C.verdict(ok_flat)],
        ["every step exported while measuring (no batch-processor overflow)", f"{exported_main:,} exported, {main_stats['dropped']} dropped",
         "all", C.verdict(ok_all_exported)],
        ["overload: queue bounded, drops counted", f"queue {pending:,} ≤ {max_pending:,}; exported + dropped = steps",
         "bounded, all accounted", C.verdict(ok_bounded)],
    ]
    print(C.table(["goal", "measured", "target", "result"], goals))
    ok = ok_flat and ok_all_exported and ok_bounded
    print(f"\n{'all goals PASS' if ok else 'some goals FAIL'} ({time.monotonic() - started:.0f} s)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
