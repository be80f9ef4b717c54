"""What describing one vLLM step costs the engine thread, by batch size and kind of step.

Usage::

    .venv/bin/python benchmarks/bench_vllm_step.py            # full run (~1 min on 2 cores)
    .venv/bin/python benchmarks/bench_vllm_step.py --quick    # a short run

With export configured by the ``OTEL_*`` variables, vLLM's step is classified on the engine
thread as it ends (everything after it runs in the exporter process), so the classification is
the part of a traced vLLM step that grows with the batch. Steps without draft tokens are counted
with C-level builtins over the batch; steps with draft tokens, old layouts and malformed values
request by request in Python. This script measures both on the same ``SchedulerOutput``-shaped
objects (vLLM 0.12+ field names), interleaved, on this thread's CPU clock:

* ``describe``: what the adapter does (``capture`` at the start of the step, ``finish`` at its end);
* ``each``: ``capture`` plus the request-by-request count, the baseline the bulk count replaces
  (called directly). At a few requests the bulk count's checks cost about what they save (a
  fraction of a microsecond either way); it is used on every well-formed step all the same, so
  that the real-engine tests, whose batches are small, hold it to vLLM's own scheduler.

Kinds: ``decode`` (every request one token), ``mixed`` (half prompt chunks of 100 tokens, half
decodes), ``verify`` (decodes with 3 draft tokens each: request by request in both), each without
and with request tracing (a trace context per request: one span link each).

Goal: at 64 requests or more, a step without draft tokens costs at most half the request-by-request
count (median over rounds of the ratio between batches run back to back).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import types
from collections.abc import Callable
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common as C

from otel_stepspan.integrations import vllm

BATCH_SIZES = (2, 8, 16, 64, 256, 1024)
KINDS = ("decode", "mixed", "verify")
GOAL = 0.5


def scheduler_output(bs: int, kind: str, traced: bool) -> Any:
    """A ``SchedulerOutput``-shaped object: every request cached (already seen by the worker)."""
    ids = [f"cmpl-{i:08x}-0-{i * 2654435761 % 2 ** 32:08x}" for i in range(bs)]
    prompts = set(ids[: bs // 2]) if kind == "mixed" else set()
    tokens = {r: 100 if r in prompts else 4 if kind == "verify" else 1 for r in ids}
    output = types.SimpleNamespace(
        num_scheduled_tokens=tokens,
        total_num_scheduled_tokens=sum(tokens.values()),
        scheduled_spec_decode_tokens={r: [11, 12, 13] for r in ids} if kind == "verify" else {},
        scheduled_new_reqs=[],
        scheduled_cached_reqs=types.SimpleNamespace(
            req_ids=ids, num_output_tokens=[0 if r in prompts else 17 for r in ids],
            num_computed_tokens=[300] * bs),
        finished_req_ids=set(),
    )
    if traced:
        contexts = {r: (n + 1, n + 2, 1) for n, r in enumerate(ids)}
        setattr(output, vllm.CONTEXT_ATTRIBUTE, (vllm.CONTEXT_VERSION, 3, 1000, contexts))
    return output


def loops(output: Any) -> dict[str, tuple[Callable[[int], None], int]]:
    capture, finish, each = vllm.capture, vllm.finish, vllm._classify_each

    def describe(n: int) -> None:
        for _ in range(n):
            finish(capture(output))

    def request_by_request(n: int) -> None:
        for _ in range(n):
            c = capture(output)
            each(c, list(c.num_scheduled_tokens.items()), c.total_num_scheduled_tokens,
                 c.scheduled_spec_decode_tokens)

    steps = max(20, 20_000 // max(1, len(output.num_scheduled_tokens)))
    return {"describe": (describe, steps), "each": (request_by_request, steps)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a short run (fewer rounds)")
    args = parser.parse_args()
    rounds = 8 if args.quick else 30
    print(f"# vLLM step classification on the engine thread\n\n{C.machine_line()}\n")
    rows, ok = [], True
    for traced in (False, True):
        for kind in KINDS:
            for bs in BATCH_SIZES:
                output = scheduler_output(bs, kind, traced)
                vllm._request_contexts = {}
                info = vllm.describe(output)
                expected = vllm._classify_each(vllm.capture(output), list(output.num_scheduled_tokens.items()),
                                               output.total_num_scheduled_tokens, output.scheduled_spec_decode_tokens)
                if info != expected:
                    raise SystemExit(f"the two counts disagree at bs={bs} {kind}: {info.label} vs {expected.label}")
                samples = C.interleaved(loops(output), rounds)
                ratio = statistics.median(a / b for a, b in zip(samples["describe"]["cpu"], samples["each"]["cpu"]))
                goal = kind != "verify" and bs >= 64 and not traced
                passed = ratio <= GOAL
                ok = ok and (passed or not goal)
                rows.append([
                    kind, "on" if traced else "off", str(bs), info.label if len(info.label) < 40 else info.label[:37] + "...",
                    C.fmt_ns(statistics.median(samples["describe"]["cpu"])),
                    C.fmt_ns(statistics.median(samples["each"]["cpu"])),
                    f"{ratio:.2f}×", C.verdict(passed) if goal else "-",
                ])
    print(C.table(["kind", "links", "bs", "label", "describe", "request by request", "ratio", f"goal ≤ {GOAL}×"], rows))
    print("\ndescribe, request by request: engine-thread CPU per step (median of per-batch means); ratio: median"
          " over rounds of describe / request by request, batches run back to back")
    print("\nall goals PASS" if ok else "\nsome goals FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
