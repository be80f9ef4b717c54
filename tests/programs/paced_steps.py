"""Steps at a steady pace, each labelled by its index (bs=i), for outage and signal tests.

    python paced_steps.py SECONDS RATE [--forever] [--stop-after N] [--report-every K]

``--stop-after N`` runs N steps, prints ``done N``, then idles until killed; ``--report-every K``
prints ``steps I`` after every K-th step (a test that kills the program knows what ran when).
Prints 'ready' once the first step ran, and at the end one JSON line with the step count and
every counter of ``otel_stepspan.stats()``, so a test can check that received + reported lost
(+ still pending in the exporter) == steps.
"""

import json
import sys
import time

from otel_stepspan import StepInfo, stats, step_span


def _option(name: str) -> int:
    return int(sys.argv[sys.argv.index(name) + 1]) if name in sys.argv else 0


def main() -> None:
    seconds, rate = float(sys.argv[1]), float(sys.argv[2])
    forever = "--forever" in sys.argv
    stop_after, report_every = _option("--stop-after"), _option("--report-every")
    interval = 1.0 / rate
    started = time.monotonic()
    steps = 0
    next_at = started
    while forever or time.monotonic() - started < seconds:
        steps += 1
        with step_span(StepInfo("decode", steps, 0, steps, 0, steps, pass_id=steps)):
            pass
        if steps == 1:
            print("ready", flush=True)
        if report_every and steps % report_every == 0:
            print(f"steps {steps}", flush=True)
        if steps == stop_after:
            print(f"done {steps}", flush=True)
            while True:
                time.sleep(3600)
        next_at += interval
        delay = next_at - time.monotonic()
        if delay > 0:
            time.sleep(delay)
    import otel_stepspan

    otel_stepspan.flush(20)
    print(json.dumps({"steps": steps, **stats()}), flush=True)


if __name__ == "__main__":
    main()
