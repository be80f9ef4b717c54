"""Paced steps of every mode, each with its own pass id, for the fault tests on the real
Collector and Jaeger. Configured only by the OTEL_* variables, like an engine.

    python paced_modes.py SECONDS RATE

The steps cycle prefill, decode, decode, decode, mixed, idle (pass ids 1, 2, ...). Prints
'ready' once the first step ran, and at the end one JSON line: the steps sent per mode, and
what tracing cost the engine thread: the time of an empty traced step (the `with
step_span(...)` block itself) for the first step (which sets up the export), and the longest and
99th-percentile time of the others, and how late the pacing ran at worst. After the library's
own exit flush, one more JSON line says how long the exit took.
Loss reports, if any, are the library's own lines on stderr.
"""

import atexit
import json
import sys
import time
from collections import Counter

from otel_stepspan import StepInfo, step_span


def step(pass_id: int) -> StepInfo:
    kind = pass_id % 6
    if kind == 1:
        return StepInfo.from_counts(prefill_seqs=1, extend_tokens=128, decode_seqs=0, pass_id=pass_id)
    if kind == 5:
        return StepInfo.from_counts(prefill_seqs=1, extend_tokens=64, decode_seqs=3, pass_id=pass_id)
    if kind == 0:
        return StepInfo.from_counts(prefill_seqs=0, extend_tokens=0, decode_seqs=0, pass_id=pass_id)
    return StepInfo.from_counts(prefill_seqs=0, extend_tokens=0, decode_seqs=4, pass_id=pass_id)


def main() -> None:
    # Registered before the library registers its exit flush (at the first step), so it runs
    # after that flush: atexit runs the last registered first.
    atexit.register(lambda: print(json.dumps({"exit_s": round(time.monotonic() - ended[0], 3)}), flush=True))
    ended = [0.0]
    seconds, rate = float(sys.argv[1]), float(sys.argv[2])
    interval = 1.0 / rate
    sent: Counter = Counter()
    costs = []
    late_max = 0.0
    started = next_at = time.monotonic()
    pass_id = 0
    while time.monotonic() - started < seconds:
        pass_id += 1
        info = step(pass_id)
        t0 = time.perf_counter()
        with step_span(info):
            pass
        costs.append(time.perf_counter() - t0)
        sent[info.mode] += 1
        if pass_id == 1:
            print("ready", flush=True)
        next_at += interval
        delay = next_at - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        else:
            late_max = max(late_max, -delay)
    ended[0] = time.monotonic()
    first = costs[0]
    costs = sorted(costs[1:]) or [0.0]
    print(
        json.dumps(
            {
                "steps": pass_id,
                "sent": dict(sent),
                "seconds": round(time.monotonic() - started, 3),
                "first_step_ms": round(first * 1e3, 3),
                "max_step_ms": round(costs[-1] * 1e3, 3),
                "p99_step_ms": round(costs[int(0.99 * (len(costs) - 1))] * 1e3, 3),
                "max_late_ms": round(late_max * 1e3, 3),
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
