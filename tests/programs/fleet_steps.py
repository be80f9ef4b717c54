"""An engine stand-in for the fleet test (tests/test_fleet_gateways.py): paced steps of every
mode, with special steps planted where a plan says. Configured only by the OTEL_* variables,
like an engine.

    python fleet_steps.py PLAN.json

PLAN.json: {"steps": N, "rate": steps per second, "plant": {"<pass id>": {"mode": M,
"sleep_ms": S, "error": true, "links": K, "request": NAME, "work": W}}}. Unplanted steps cycle
prefill, decode, decode, decode, mixed, idle (pass ids 1, 2, ...) and do nothing inside the
step; a planted step runs in mode M, sleeps S ms inside the step (a slow forward), raises inside
it (a forward that failed: the span is ERROR and the exception is caught here, outside the
step), links K traced requests (new ones, with sampled trace contexts of their own, decoding),
and/or links the traced request NAME doing work W (``prefill`` or ``decode``): the same request
at every step that names it, so that steps can prefill it, decode it and, after a preemption,
prefill it again.

Prints 'ready' once the first step ran, and at the end one JSON line: the steps sent per mode
and the requests linked ({request id: trace id as 32 hex digits}).
"""

import json
import os
import random
import sys
import time
from collections import Counter

from otel_stepspan import RequestLink, StepInfo, step_span

CYCLE = ("idle", "prefill", "decode", "decode", "decode", "mixed")  # pass_id % 6


def step(pass_id: int, mode: str, links: tuple = ()) -> StepInfo:
    counts = {  # (batch size, extend tokens, decode seqs, prefill seqs, tokens)
        "idle": (0, 0, 0, 0, 0),
        "prefill": (1, 128, 0, 1, 128),
        "mixed": (4, 64, 3, 1, 67),
    }.get(mode, (max(len(links), 4), 0, max(len(links), 4), 0, max(len(links), 4)))
    return StepInfo(mode, *counts, pass_id=pass_id, links=links or None)


def main() -> None:
    with open(sys.argv[1]) as fh:
        plan = json.load(fh)
    plant = {int(k): v for k, v in plan["plant"].items()}
    interval = 1.0 / plan["rate"]
    sent: Counter = Counter()
    requests: dict[str, str] = {}
    rng = random.Random()
    service = os.environ.get("OTEL_SERVICE_NAME", "engine")
    named: dict[str, tuple[str, int, int]] = {}  # plan's name -> (request id, trace id, span id)

    def new_request(request_id: str) -> tuple[str, int, int]:
        trace_id = rng.getrandbits(128) or 1
        requests[request_id] = f"{trace_id:032x}"
        return request_id, trace_id, rng.getrandbits(64) or 1
    next_at = time.monotonic()
    for pass_id in range(1, plan["steps"] + 1):
        spec = plant.get(pass_id, {})
        links = []
        for _ in range(spec.get("links", 0)):
            request_id, trace_id, span_id = new_request(f"{service}-req-{pass_id}-{len(requests)}")
            links.append(RequestLink(request_id, trace_id, span_id, 1, "decode", 1))
        if "request" in spec:
            name = spec["request"]
            if name not in named:
                named[name] = new_request(f"{service}-{name}")
            request_id, trace_id, span_id = named[name]
            work = spec["work"]
            links.append(RequestLink(request_id, trace_id, span_id, 1, work, 64 if work == "prefill" else 1))
        info = step(pass_id, spec.get("mode", CYCLE[pass_id % 6]), tuple(links))
        try:
            with step_span(info):
                if spec.get("sleep_ms"):
                    time.sleep(spec["sleep_ms"] / 1000.0)
                if spec.get("error"):
                    raise RuntimeError(f"planted failure at pass {pass_id}")
        except RuntimeError:
            pass
        sent[info.mode] += 1
        if pass_id == 1:
            print("ready", flush=True)
        next_at += interval
        delay = next_at - time.monotonic()
        if delay > 0:
            time.sleep(delay)
    print(json.dumps({"steps": plan["steps"], "sent": dict(sent), "requests": requests}), flush=True)


if __name__ == "__main__":
    main()
