"""What a step's request links cost where the spans are made: the request arrays and reports.

Usage::

    .venv/bin/python benchmarks/bench_request_links.py            # full run (~1 min on 2 cores)
    .venv/bin/python benchmarks/bench_request_links.py --quick    # a short run

With request tracing, a step span carries one link per request it computed and the same
request ids, work and tokens again as arrays (``forward.request_ids`` …, the form Jaeger keeps),
and each request's report (``request.steps``) is counted from the steps. None of that runs on
the engine thread: the engine hands the links over as it did before (its cost is
``bench_vllm_step.py``'s and ``bench_engine_stall.py``'s), and the exporter process builds the
spans. This script measures that process's side, on this thread's CPU clock: building and
encoding one step (``SpanBuilder.build``) with 1 to 256 links, the same steps with request
reports off (``OTEL_STEPSPAN_REQUEST_SPANS=off``), and without links at all, interleaved; the
report spans themselves are made once per request and counted in.

Goal: at 16 links or more, with the reports, a link costs at most 5 µs here (the release before the request arrays and
reports encoded every link anew on every step: 4-7 µs a link on this machine).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from collections.abc import Callable

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common as C

from otel_stepspan.exporter import wire
from otel_stepspan.exporter.spans import SpanBuilder

LINKS = (1, 16, 64, 256)
GOAL_NS_PER_LINK = 5_000
DECODES_PER_REQUEST = 100  # a request's report is made once per this many of its steps


def records(links: int, steps: int) -> list[tuple]:
    """Decode steps of ``links`` requests each, as continuous batching runs them: each request
    decodes DECODES_PER_REQUEST steps, then a new one takes its place, the places staggered so
    that every step some requests are new (and reports are made at a real run's rate)."""
    made = []
    for i in range(steps):
        linked = []
        for slot in range(links):
            generation = (i + slot * DECODES_PER_REQUEST // max(links, 1)) // DECODES_PER_REQUEST
            linked.append((f"req-{slot}-{generation}", (generation << 20) + slot + 1, slot + 1, 1, "decode", 1))
        made.append((wire.STEP, i * 1_000_000, i * 1_000_000 + 500_000, "decode", links, 0, links, 0, links, i, 0,
                     None, None, None, linked if links else None, 3, 4096))
    return made


def loops(links: int) -> dict[str, tuple[Callable[[int], None], int]]:
    steps = max(200, 20_000 // max(links, 1))
    linked, bare = records(links, steps), records(0, steps)

    def build(environ: dict[str, str], batch: list[tuple]) -> Callable[[int], None]:
        def run(n: int) -> None:
            builder = SpanBuilder(environ, engine_pid=1)
            for index in range(n):
                builder.build(batch[index % len(batch)])
            builder.close_all()

        return run

    return {
        "reports on": (build({}, linked), steps),
        "reports off": (build({"OTEL_STEPSPAN_REQUEST_SPANS": "off"}, linked), steps),
        "no links": (build({}, bare), steps),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a short run (fewer rounds)")
    args = parser.parse_args()
    rounds = 6 if args.quick else 25
    print(f"# Request links where the spans are made (the exporter process)\n\n{C.machine_line()}\n")
    rows, ok = [], True
    for links in LINKS:
        samples = C.interleaved(loops(links), rounds)
        on, off, bare = (statistics.median(samples[k]["cpu"]) for k in ("reports on", "reports off", "no links"))
        ratio = statistics.median(a / b for a, b in zip(samples["reports on"]["cpu"], samples["reports off"]["cpu"]))
        per_link = (on - bare) / links
        passed = per_link <= GOAL_NS_PER_LINK
        judged = links >= 16  # at one link the step's own attributes are most of the difference
        ok = ok and (passed or not judged)
        rows.append([str(links), C.fmt_ns(bare), C.fmt_ns(off), C.fmt_ns(on), C.fmt_ns(per_link),
                     f"{ratio:.2f}×", C.verdict(passed) if judged else "-"])
    print(C.table(["links", "no links", "reports off", "reports on", "per link", "on / off",
                   f"goal ≤ {C.fmt_ns(GOAL_NS_PER_LINK)} a link"], rows))
    print("\nCPU per step on the building thread (median of per-batch means), the report spans counted in; per link:"
          " (reports on - no links) / links; on / off: median over rounds of the ratio, batches back to back")
    print("\nall goals PASS" if ok else "\nsome goals FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
