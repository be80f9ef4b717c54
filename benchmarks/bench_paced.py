"""What a traced step adds to the engine thread when steps are paced as an engine paces them.

Usage::

    .venv/bin/python benchmarks/bench_paced.py            # full run (~4 min on 2 cores)
    .venv/bin/python benchmarks/bench_paced.py --quick    # a short run (~1 min)

Back to back (``bench_overhead.py``) a step's code stays in the CPU's caches and writes
coalesce. An engine's steps are paced instead: per step the scheduler's Python runs, holding the
GIL and walking its own data (requests, the KV cache's free lists, the batch it builds), then
``ModelRunner.forward`` waits for the GPU with the GIL released, for milliseconds. By the next
step the wrapper's code and data are cold, and whatever it wakes (a pipe reader, a thread) costs
a system call every time. Here each step:

* does ``--work-ms`` of scheduler work holding the GIL: ``light``, a loop over a few objects
  that stay in the caches (the scheduler work of ``bench_engine_stall.py``), or ``heavy``, a walk
  through 30 MB of request-like objects, more than the CPU's own caches hold, so that the
  wrapper's code and data come from the shared cache or memory (``--scheduler``);
* calls the sglang-instrumented stand-in ``forward``, which waits ``wait`` ms with the GIL
  released (``time.sleep``; with ``--gpu`` a CUDA kernel and a synchronize). With ``--spin``
  it busy-waits instead, as CUDA's default synchronize spins while the host has a core per
  context: a Python loop on the clock, holding the GIL (no other thread of the worker wants it),
  so that the CPU never idles between steps.

Measured per step on the engine thread: **added wall**, the wall time of ``forward`` minus the
time spent inside the engine's own ``forward`` (so: the wrapper, before and after), split into
**before** (up to the call of the engine's ``forward``: the batch read, after the scheduler's
work) and **after** (from its return: the submit, after the GPU wait), and the thread's CPU
time over the call. Each figure is set against export off in the same run (the
stand-in forward unwrapped), with ``off again`` as the A/A control. Variants, in processes of
their own, blocks interleaved:

* ``off`` / ``off again``: no export;
* ``on``: export by ``OTEL_EXPORTER_OTLP_ENDPOINT`` (gRPC) into a real OTLP receiver in another
  process (the exporter process path);
* ``provider``: a provider set up as sglang's ``--enable-trace`` does (the exporter process
  stands in for it);
* ``floor``: the least any Python wrapper can do, as information: one Python frame around the
  engine's ``forward`` that reads the clock before and after and appends the two times to a
  bounded deque; no batch read, no export. What it adds is what this machine charges for a
  wrapper at all after that wait; the project's wrapper pays it too.

GPU waits of 1, 3 and 10 ms, and a hot loop (no wait, steps back to back) for reference. The
engine thread runs on CPU 0; the exporter process and the receiver on the others. Goal: **at
most 10 us of added wall per step** (median) at every paced wait, for ``on`` and ``provider``,
with ``light`` scheduler work; the ``heavy`` figures are printed beside them, as information:
with caches emptied by the scheduler, every Python call and C function the wrapper touches
costs about a microsecond, and the wrapper cannot touch fewer than a few dozen.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

VARIANTS = ("off", "on", "off again", "provider", "floor")
JUDGED = ("on", "provider")
#: GPU waits in ms; 0 is the hot loop (steps back to back, for reference).
WAITS = (1.0, 3.0, 10.0, 0.0)
GOAL_US = 10.0


# -- the engine process ------------------------------------------------------------------------


class _Request:
    __slots__ = ("rid", "tokens", "state")

    def __init__(self, i: int) -> None:
        self.rid, self.tokens, self.state = i, [i, i + 1, i + 2], {"n": i}


SCHEDULERS = {"light": 64, "heavy": 150_000}


def _scheduler(work_s: float, objects: int) -> Any:
    """Scheduler work: Python holding the GIL, reading through ``objects`` request-like objects
    where the last step stopped (150,000 of them: ~30 MB, more than the CPU's caches hold)."""
    pool = [_Request(i) for i in range(objects)]
    where = [0]
    perf = time.perf_counter

    def work() -> None:
        deadline = perf() + work_s
        i = where[0]
        total = 0
        while perf() < deadline:
            for _ in range(64):
                request = pool[i]
                total += request.tokens[0] + request.state["n"]
                i = i + 1 if i + 1 < objects else 0
        where[0] = i

    return work


def _floor_wrapper(method: Any) -> Any:
    """The ``floor`` variant: a wrapper that does the least a step span needs (two clock reads
    and a record of them), in the fewest Python operations."""
    from collections import deque

    clock = time.time_ns
    record = deque(maxlen=4096).append

    def forward(self, forward_batch, pp_proxy_tensors=None):
        start_ns = clock()
        result = method(self, forward_batch)
        record((start_ns, clock()))
        return result

    return forward


def worker(args: argparse.Namespace) -> dict:
    import _common as C

    from otel_stepspan.integrations import sglang

    wait_s = args.wait_ms / 1e3
    perf_ns = time.perf_counter_ns
    inner: list[int] = [0, 0]  # the engine's own forward: its time, and when it was entered

    if args.gpu and wait_s:
        import torch

        torch.cuda._sleep(1_000_000)
        torch.cuda.synchronize()
        started = time.perf_counter()
        torch.cuda._sleep(10_000_000)
        torch.cuda.synchronize()
        cycles = int(10_000_000 * wait_s / (time.perf_counter() - started))

        def gpu_wait() -> None:
            torch.cuda._sleep(cycles)
            torch.cuda.synchronize()
    elif args.spin and wait_s:
        clock = time.perf_counter

        def gpu_wait() -> None:  # the CPU never idles; no other thread here wants the GIL
            deadline = clock() + wait_s
            while clock() < deadline:
                pass
    elif wait_s:

        def gpu_wait() -> None:
            time.sleep(wait_s)
    else:

        def gpu_wait() -> None:
            pass

    class Runner:
        forward_pass_id = 0

        def forward(self, forward_batch, pp_proxy_tensors=None):
            entered = perf_ns()
            gpu_wait()
            inner[0] = perf_ns() - entered
            inner[1] = entered
            return forward_batch

    if args.variant == "floor":
        Runner.forward = _floor_wrapper(Runner.forward)
    elif args.variant != "off":
        Runner.forward = sglang.traced_forward(Runner.forward)
    if args.variant == "provider":
        from bench_engine_stall import set_up_sglang_provider

        set_up_sglang_provider(args.endpoint)
    runner = Runner()
    batches = C.batch_cycle()
    work = _scheduler(args.work_ms / 1e3, SCHEDULERS[args.scheduler]) if wait_s else (lambda: None)
    for batch in batches * 20:  # warm up: the first step starts the exporter
        runner.forward(batch)
    time.sleep(0.5)
    from bench_engine_stall import _pin_away_from_the_engine

    _pin_away_from_the_engine(os.getpid())
    C.freeze_heap()
    added, cpu, before = [], [], []
    thread_ns = time.thread_time_ns
    forward = runner.forward
    n = len(batches)
    for i in range(args.steps):
        work()
        batch = batches[i % n]
        c0 = thread_ns()
        t0 = perf_ns()
        forward(batch)
        t1 = perf_ns()
        c1 = thread_ns()
        added.append(t1 - t0 - inner[0])
        before.append(inner[1] - t0)
        cpu.append(c1 - c0)
    from otel_stepspan import flush, stats

    flush(30)
    return {"added": added, "before": before, "cpu": cpu, "stats": stats()}


# -- the driver --------------------------------------------------------------------------------


def run_worker(variant: str, endpoint: str, wait_ms: float, steps: int, work_ms: float, gpu: bool, scheduler: str,
               spin: bool = False) -> dict:
    from bench_engine_stall import _env

    argv = [
        sys.executable, os.path.abspath(__file__), "--worker", "--variant", "off" if variant == "off again" else variant,
        "--endpoint", endpoint, "--wait-ms", str(wait_ms), "--steps", str(steps), "--work-ms", str(work_ms),
        "--scheduler", scheduler,
    ]
    if gpu:
        argv.append("--gpu")
    if spin:
        argv.append("--spin")
    # Back to back, steps outrun any exporter for a while: an export queue deep enough for all.
    env = _env("paced" if wait_ms else "cpu", "off" if variant in ("off again", "floor") else variant, endpoint)
    result = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=900)
    if result.returncode != 0:
        raise RuntimeError(f"worker {variant} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def _split_medians(samples: dict[str, list[int]]) -> tuple[float, float]:
    """The medians, in us, of the added wall before the engine's own forward and after it."""
    before = statistics.median(samples["before"]) / 1e3
    after = statistics.median(a - b for a, b in zip(samples["added"], samples["before"])) / 1e3
    return before, after


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer, shorter blocks")
    parser.add_argument("--waits", default=",".join(str(w) for w in WAITS), help="GPU waits in ms (0: hot loop)")
    parser.add_argument("--work-ms", type=float, default=0.5, help="scheduler work per step, in ms")
    parser.add_argument("--gpu", action="store_true", help="wait on a CUDA kernel instead of sleeping")
    parser.add_argument("--spin", action="store_true",
                        help="busy-wait instead of sleeping (the CPU never idles)")
    parser.add_argument("--scheduler", choices=("light", "heavy", "both"), default="both",
                        help="scheduler work that keeps the caches (light, judged) or empties them (heavy, information)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--variant", default="off", help=argparse.SUPPRESS)
    parser.add_argument("--endpoint", default="", help=argparse.SUPPRESS)
    parser.add_argument("--wait-ms", type=float, default=3.0, help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=1000, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return 0

    import _common as C
    from bench_engine_stall import Receiver

    print(C.machine_line())
    receiver = Receiver()
    blocks = 2 if args.quick else 4
    rows, checks, ok = [], [], True
    schedulers = ("light", "heavy") if args.scheduler == "both" else (args.scheduler,)
    cases = [(w, sch) for sch in schedulers for w in (float(w) for w in args.waits.split(",")) if w or sch == schedulers[0]]
    try:
        for wait_ms, scheduler in cases:
            if wait_ms == 0:
                steps = 5_000 if args.quick else 20_000
            else:
                steps = int((6000 if args.quick else 20000) / (wait_ms + args.work_ms))
            pooled: dict[str, dict[str, list[int]]] = {v: {"added": [], "before": [], "cpu": []} for v in VARIANTS}
            for block in range(blocks):
                for variant in VARIANTS if block % 2 == 0 else reversed(VARIANTS):
                    before = receiver.ask("count")["spans"]
                    out = run_worker(variant, receiver.endpoint, wait_ms, steps // blocks, args.work_ms, args.gpu, scheduler,
                                     args.spin)
                    pooled[variant]["added"] += out["added"]
                    pooled[variant]["before"] += out["before"]
                    pooled[variant]["cpu"] += out["cpu"]
                    if variant in JUDGED:  # every step, warm-up included, must arrive
                        emitted = out["stats"]["emitted"]
                        got = receiver.ask(f"wait {before + emitted} 30")["spans"] - before
                        if got != emitted or out["stats"]["dropped"]:
                            ok = False
                            checks.append(f"FAIL wait {wait_ms:g} ms {variant}: received {got} of {emitted}")
            case = "hot" if wait_ms == 0 else f"{wait_ms:g} ms {scheduler}"
            base_wall = statistics.median(pooled["off"]["added"]) / 1e3
            base_cpu = statistics.median(pooled["off"]["cpu"]) / 1e3
            base_before, base_after = _split_medians(pooled["off"])
            for variant in VARIANTS:
                wall = sorted(x / 1e3 for x in pooled[variant]["added"])
                cpu = sorted(x / 1e3 for x in pooled[variant]["cpu"])
                med_wall, med_cpu = statistics.median(wall), statistics.median(cpu)
                med_before, med_after = _split_medians(pooled[variant])
                rows.append([
                    case, variant, str(len(wall)),
                    f"{med_wall:.1f}", f"{wall[int(0.9 * (len(wall) - 1))]:.1f}", f"{statistics.mean(wall):.1f}",
                    f"{med_wall - base_wall:+.1f}", f"{med_before - base_before:+.1f}", f"{med_after - base_after:+.1f}",
                    f"{med_cpu:.1f}", f"{med_cpu - base_cpu:+.1f}",
                ])
                extra = med_wall - base_wall
                if variant == "off again":
                    checks.append(f"info {case} control: off again - off = {extra:+.1f} us wall")
                elif variant in JUDGED and wait_ms and scheduler == "light":
                    good = extra <= GOAL_US
                    ok = ok and good
                    checks.append(f"{'PASS' if good else 'FAIL'} {case} {variant}: +{extra:.1f} us added wall per step (goal <= {GOAL_US:g})")
                elif variant != "off":
                    checks.append(f"info {case} {variant}: +{extra:.1f} us added wall per step")
    finally:
        receiver.close()
    print(C.table(
        ["wait, scheduler", "variant", "steps", "wall p50 us", "p90", "mean", "vs off", "before", "after",
         "thread cpu p50 us", "vs off"], rows,
    ))
    print("before, after: the added wall's median (vs off) split at the call of the engine's own forward: the"
          " wrapper's work after the scheduler's (capture) and after the GPU wait (submit)")
    print("\n".join(checks))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
