"""Does exporting step spans stall the engine's own Python? Export on vs off, in the engine's shape.

Usage::

    .venv/bin/python benchmarks/bench_engine_stall.py            # full run (~12 min on 2 cores)
    .venv/bin/python benchmarks/bench_engine_stall.py --quick    # a short run (~1.5 min)

An LLM engine's scheduler loop is Python: per step it does some scheduling work holding the GIL,
then calls ``ModelRunner.forward``, which waits for the GPU with the GIL released, and must take
the GIL back the moment the GPU is done. Whoever holds the GIL then delays the next step. Here
each step does ``--work-ms`` of GIL-holding Python, then the sglang-instrumented stand-in
``forward`` waits (``time.sleep``, GIL released) for the rest of its slot; the loop is paced at
several step rates. Measured per step, in the engine process:

* **wake delay**: from the end of the GPU wait to the engine thread running Python again (GIL
  taken back) -- p50 / p99 / p99.9 / max;
* **work**: wall time of the GIL-holding scheduler work (others holding the GIL stretch it);
* **late**: how far each step started behind its schedule.

The engine thread runs alone on CPU 0; the receiver and the exporter process on the other CPUs
(both variants alike): a serving host has cores to spare, and what is measured here is the
engine's GIL, not this machine's two cores taken in turns. Variants, each in processes of its
own, blocks interleaved (off, on, off, on, ...):

* ``off``: no export configured (the wrapper's off path);
* ``off again``: the same a second time, in its own blocks: the A/A control. Its ratios to
  ``off`` (printed as ``info`` lines) show how far two identical variants stray apart on this
  machine, the resolution against which the goals are judged;
* ``on``: export configured only by ``OTEL_EXPORTER_OTLP_ENDPOINT`` (gRPC) into a real OTLP
  receiver in another process: the exporter process path;
* ``provider`` (at 200 steps/s): an SDK provider set by the "engine" as sglang's
  ``--enable-trace`` sets it (BatchSpanProcessor, 500 ms delay, batches of 64, OTLP gRPC): the
  exporter process stands in for it, and the same goals apply;
* ``instrument`` (at 200 steps/s): the worker under ``opentelemetry-instrument``, whose SDK set-up
  makes the provider from the variables: the same again;
* ``in-process`` (at 200 steps/s only, for reference): the ``provider`` variant with
  ``OTEL_STEPSPAN_EXPORT=provider``, so step spans are made and exported inside the engine
  process, by the provider's batch thread.

Then the CPU per exported span, all processes included (engine + exporter process; the receiver
is not counted), steps back to back: the project's exporter path against a plain SDK span
(``start_as_current_span`` with the label and attributes, BatchSpanProcessor, OTLP gRPC exporter),
each over the same loop with export off, and the same with the sglang-like provider in the
process. Every exported span is counted at the receiver.
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

#: The A/A control: export off run a second time, compared with the first like export on is.
CONTROL = "off again"
#: The variants held to the goals: export by the variables, and with a provider in the process.
JUDGED = ("on", "provider", "instrument")
#: (steps/s, GIL-holding work ms, GPU wait ms, seconds per variant in a full run): the wait fills
#: most of the slot, as a decode does, leaving slack to catch up after a hiccup of the machine;
#: the seconds give every rate thousands of steps, so that p99.9 is not one step's noise.
RATES = ((50, 0.55, 12.0, 60), (200, 0.55, 3.0, 40), (1000, 0.2, 0.5, 20), (2000, 0.1, 0.25, 20))
GPU = False


# -- the engine process ------------------------------------------------------------------------


def _busy(seconds: float) -> None:
    """Scheduler work: pure Python, holding the GIL, for ``seconds``."""
    deadline = time.perf_counter() + seconds
    x = 0
    while time.perf_counter() < deadline:
        x += 1


def _pin_away_from_the_engine(engine_pid: int) -> None:
    """The engine thread gets CPU 0 to itself; its exporter process (and the receiver, see
    Receiver) the others. An LLM serving host has cores to spare: what is measured is the GIL,
    not two processes taking turns on this machine's two cores. Both variants are pinned alike."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if len(cpus) < 2:
        return
    os.sched_setaffinity(0, {cpus[0]})  # this (the engine) thread
    from otel_stepspan.testing.processes import exporter_pids

    for pid in exporter_pids(engine_pid):
        # Every thread: gRPC's threads, started before this, keep the affinity they were born with.
        for task in os.listdir(f"/proc/{pid}/task"):
            try:
                os.sched_setaffinity(int(task), set(cpus[1:]))
            except OSError:  # a thread that has just ended
                pass


def set_up_sglang_provider(endpoint: str) -> None:
    """The tracer provider sglang 0.5.23's ``--enable-trace`` sets in its scheduler process."""
    from opentelemetry import trace
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = TracerProvider()
    exporter = OTLPSpanExporter(endpoint=endpoint, insecure=True)
    provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=500, max_export_batch_size=64))
    trace.set_tracer_provider(provider)


def worker_paced(args: argparse.Namespace) -> dict:
    import _common as C

    from otel_stepspan.integrations import sglang

    wait_s, work_s = args.wait_ms / 1e3, args.work_ms / 1e3
    wakes: list[float] = []
    perf = time.perf_counter

    if args.gpu:
        import torch

        # A kernel that spins for the wait, then a synchronize that releases the GIL while the
        # GPU runs it: the engine's real shape. Cycles calibrated once against the wall clock.
        torch.cuda._sleep(1_000_000)
        torch.cuda.synchronize()
        started = perf()
        torch.cuda._sleep(10_000_000)
        torch.cuda.synchronize()
        cycles = int(10_000_000 * wait_s / (perf() - started))

        def gpu_wait() -> None:
            torch.cuda._sleep(cycles)
            torch.cuda.synchronize()
    else:

        def gpu_wait() -> None:
            time.sleep(wait_s)

    class Runner:
        forward_pass_id = 0

        def forward(self, forward_batch, pp_proxy_tensors=None):
            started = perf()
            gpu_wait()  # the GPU: GIL released
            wakes.append(perf() - started - wait_s)
            return forward_batch

    if args.variant != "off":
        Runner.forward = sglang.traced_forward(Runner.forward)
    if args.variant in ("provider", "in-process"):
        set_up_sglang_provider(args.endpoint)
    runner = Runner()
    batches = C.batch_cycle()
    period = 1.0 / args.rate
    for batch in batches * 5:  # warm up: the first step starts the exporter, caches fill
        _busy(work_s)
        runner.forward(batch)
    wakes.clear()
    _pin_away_from_the_engine(os.getpid())
    C.freeze_heap()
    works, lates = [], []
    steps = int(args.seconds * args.rate)
    next_at = perf()
    for i in range(steps):
        now = perf()
        if next_at > now:
            time.sleep(next_at - now)
        started = perf()
        lates.append(started - next_at)
        _busy(work_s)
        works.append(perf() - started)
        runner.forward(batches[i % len(batches)])
        next_at += period
    from otel_stepspan import flush, stats

    flush(30)
    counters = stats()
    return {"wake": wakes, "work": works, "late": lates, "steps": steps, "stats": counters}


def worker_cpu(args: argparse.Namespace) -> dict:
    """Steps back to back; CPU of this process and of its exporter process over the steps and
    the flush that exports them."""
    import _common as C

    from otel_stepspan.integrations import sglang

    batches = C.batch_cycle()

    class Runner:
        forward_pass_id = 0

        def forward(self, forward_batch, pp_proxy_tensors=None):
            return forward_batch

    if args.variant in ("on", "provider"):
        if args.variant == "provider":
            set_up_sglang_provider(args.endpoint)
        Runner.forward = sglang.traced_forward(Runner.forward)
        runner = Runner()

        def step(batch: Any, i: int) -> None:
            runner.forward(batch)

    elif args.variant == "sdk":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        provider = TracerProvider()
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=args.endpoint, insecure=True)))
        tracer = provider.get_tracer("baseline")
        runner = Runner()

        def step(batch: Any, i: int) -> None:
            name, attributes = C.inline_span_args(batch, i)
            with tracer.start_as_current_span(name, attributes=attributes):
                runner.forward(batch)

    else:
        runner = Runner()

        def step(batch: Any, i: int) -> None:
            runner.forward(batch)

    def flush() -> None:
        if args.variant in ("on", "provider"):
            from otel_stepspan import flush as stepspan_flush

            assert stepspan_flush(60), "the exporter did not export everything"
        elif args.variant == "sdk":
            provider.force_flush(60_000)

    def exporter_cpu() -> int:
        if args.variant not in ("on", "provider"):
            return 0
        from otel_stepspan import stats

        return stats()["exporter_cpu_ns"]

    n = len(batches)
    for i in range(2000):  # warm up; the exporter process starts here
        step(batches[i % n], i)
    flush()
    C.freeze_heap()
    # Pace the whole run in slices so the background threads' batches are part of it.
    exporter_before, before = exporter_cpu(), time.process_time_ns()
    thread_ns = 0
    for start in range(0, args.steps, 512):
        thread_before = time.thread_time_ns()
        for i in range(start, min(start + 512, args.steps)):
            step(batches[i % n], i)
        thread_ns += time.thread_time_ns() - thread_before
        time.sleep(0.001)
    flush()
    engine_ns = time.process_time_ns() - before
    exporter_ns = exporter_cpu() - exporter_before
    return {"engine_ns": engine_ns, "exporter_ns": exporter_ns, "thread_ns": thread_ns, "steps": args.steps}


# -- the driver --------------------------------------------------------------------------------


def _env(kind: str, variant: str, endpoint: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    if variant in ("on", "instrument"):
        env["OTEL_EXPORTER_OTLP_ENDPOINT"] = endpoint
    if variant == "instrument":
        env.update(OTEL_TRACES_EXPORTER="otlp", OTEL_METRICS_EXPORTER="none", OTEL_LOGS_EXPORTER="none")
    if variant == "in-process":
        env["OTEL_STEPSPAN_EXPORT"] = "provider"
    if kind == "cpu":
        # Steps back to back outrun any exporter for a while: queues deep enough to keep every
        # span, for both the project's exporter process and the SDK's batch processor.
        env["OTEL_BSP_MAX_QUEUE_SIZE"] = "200000"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (HERE, env.get("PYTHONPATH", "")) if p)
    return env


def run_worker(kind: str, variant: str, endpoint: str, **params: Any) -> dict:
    argv = [sys.executable, os.path.abspath(__file__), "--worker", kind, "--variant", variant, "--endpoint", endpoint]
    if variant == "instrument":
        argv.insert(0, os.path.join(os.path.dirname(sys.executable), "opentelemetry-instrument"))
    if GPU and kind == "paced":
        argv.append("--gpu")
    for key, value in params.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    result = subprocess.run(argv, env=_env(kind, variant, endpoint), capture_output=True, text=True, timeout=900)
    if result.returncode != 0:
        raise RuntimeError(f"worker {kind}/{variant} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


class Receiver:
    """The project's OTLP receiver in a process of its own (benchmarks/receiver_proc.py)."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, os.path.join(HERE, "receiver_proc.py")],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            env={k: v for k, v in os.environ.items() if not k.startswith("OTEL_")},
        )
        self.endpoint = json.loads(self.proc.stdout.readline())["endpoint"]
        cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
        if len(cpus) >= 2:
            os.sched_setaffinity(self.proc.pid, set(cpus[1:]))  # away from the engine's CPU

    def ask(self, command: str) -> dict:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def close(self) -> None:
        self.ask("count")
        self.proc.stdin.write("quit\n")
        self.proc.stdin.close()
        self.proc.wait(30)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def paced(receiver: Receiver, quick: bool, rates: tuple = RATES) -> tuple[list[list[str]], list[str], bool]:
    blocks = 2 if quick else 4
    rows, checks, ok = [], [], True
    for rate, work_ms, wait_ms, full_seconds in rates:
        seconds = 4.0 if quick else full_seconds
        # "off again": export off a second time, the A/A control. How far it strays from "off"
        # is how finely this machine can tell two identical variants apart.
        variants = ["off", "on", CONTROL] + (["provider", "instrument", "in-process"] if rate == 200 else [])
        pooled: dict[str, dict[str, list[float]]] = {v: {"wake": [], "work": [], "late": []} for v in variants}
        steps = {v: 0 for v in variants}
        for block in range(blocks):
            for variant in variants if block % 2 == 0 else reversed(variants):
                before = receiver.ask("count")["spans"]
                out = run_worker(
                    "paced", "off" if variant == CONTROL else variant, receiver.endpoint, rate=rate, seconds=seconds / blocks,
                    work_ms=work_ms, wait_ms=wait_ms,
                )
                for key in ("wake", "work", "late"):
                    pooled[variant][key] += out[key]
                steps[variant] += out["steps"]
                if variant not in ("off", CONTROL):  # every step, warm-up included, must arrive
                    got = receiver.ask(f"wait {before + out['stats']['emitted']} 30")["spans"] - before
                    if got != out["stats"]["emitted"] or out["stats"]["dropped"]:
                        ok = False
                        checks.append(f"FAIL {rate}/s {variant}: received {got}, emitted {out['stats']['emitted']}")
        base = pooled["off"]
        for variant in variants:
            data = pooled[variant]
            wake = [w * 1e6 for w in data["wake"]]
            row = [
                f"{rate}", variant, f"{steps[variant]}",
                f"{pct(wake, 0.5):.0f}", f"{pct(wake, 0.99):.0f}", f"{pct(wake, 0.999):.0f}", f"{max(wake):.0f}",
                f"{statistics.mean(data['work']) * 1e3:.3f}",
                f"{pct(data['late'], 0.99) * 1e3:.2f}",
            ]
            rows.append(row)
            if variant in JUDGED + (CONTROL,):
                off_wake = [w * 1e6 for w in base["wake"]]
                ratios = {
                    "p99": pct(wake, 0.99) / pct(off_wake, 0.99),
                    "p99.9": pct(wake, 0.999) / pct(off_wake, 0.999),
                    "max": max(wake) / max(off_wake),
                    "work": statistics.mean(data["work"]) / statistics.mean(base["work"]),
                }
                if variant == CONTROL:
                    checks.append(
                        f"info {rate}/s control, export off again / off: wake p99 {ratios['p99']:.2f}, "
                        f"p99.9 {ratios['p99.9']:.2f}, max {ratios['max']:.2f}, work {ratios['work']:.3f}"
                    )
                    continue
                for name, target in (("p99", 1.1), ("p99.9", 1.1), ("max", 2.0), ("work", 1.02)):
                    verdict = "PASS" if ratios[name] <= target else "FAIL"
                    checks.append(f"{verdict} {rate}/s {variant}: wake {name} / off = {ratios[name]:.2f} (goal <= {target})"
                                  if name != "work" else
                                  f"{verdict} {rate}/s {variant}: scheduler work mean / off = {ratios[name]:.3f} (goal <= {target})")
    return rows, checks, ok


def cpu_per_span(receiver: Receiver, quick: bool) -> tuple[list[list[str]], list[str]]:
    steps = 20000 if quick else 60000
    rounds = 2 if quick else 4
    variants = ["off", "on", "provider", "sdk"]
    per: dict[str, list[float]] = {v: [] for v in variants}
    thread: dict[str, list[float]] = {v: [] for v in variants}
    exporter_share: list[float] = []
    for r in range(rounds):
        order = variants if r % 2 == 0 else variants[::-1]
        for variant in order:
            before = receiver.ask("count")["spans"]
            out = run_worker("cpu", variant, receiver.endpoint, steps=steps)
            if variant != "off":
                got = receiver.ask(f"wait {before + steps + 2000} 60")["spans"] - before
                assert got == steps + 2000, f"{variant}: received {got} of {steps + 2000}"
            total = out["engine_ns"] + out["exporter_ns"]
            per[variant].append(total / steps)
            thread[variant].append(out["thread_ns"] / steps)
            if variant == "on":
                exporter_share.append(out["exporter_ns"] / steps)
    off = statistics.median(per["off"])
    on, sdk = statistics.median(per["on"]) - off, statistics.median(per["sdk"]) - off
    provider = statistics.median(per["provider"]) - off
    thread_off = statistics.median(thread["off"])
    thread_on = statistics.median(thread["on"]) - thread_off
    thread_provider = statistics.median(thread["provider"]) - thread_off
    thread_sdk = statistics.median(thread["sdk"]) - thread_off
    rows = [
        ["plain SDK span + BatchSpanProcessor + OTLP gRPC exporter", f"{sdk / 1e3:.1f}", "1.00",
         f"{thread_sdk / 1e3:.2f}", "1.00"],
        ["otel_stepspan, engine + exporter process", f"{on / 1e3:.1f}", f"{on / sdk:.2f}",
         f"{thread_on / 1e3:.2f}", f"{thread_on / thread_sdk:.3f}"],
        ["  of which the exporter process", f"{statistics.median(exporter_share) / 1e3:.1f}", "", "", ""],
        ["otel_stepspan with an sglang-like OTLP provider in the process", f"{provider / 1e3:.1f}",
         f"{provider / sdk:.2f}", f"{thread_provider / 1e3:.2f}", f"{thread_provider / thread_sdk:.3f}"],
    ]
    checks = []
    for name, ratio, target in (
        ("CPU per exported span, all processes", on / sdk, 0.5),
        ("engine-thread CPU per step", thread_on / thread_sdk, 0.125),
        ("with a provider: CPU per exported span, all processes", provider / sdk, 0.5),
        ("with a provider: engine-thread CPU per step", thread_provider / thread_sdk, 0.125),
    ):
        checks.append(f"{'PASS' if ratio <= target else 'FAIL'} {name}: {ratio:.3f}x the plain SDK span (goal <= {target})")
    return rows, checks


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a short run")
    parser.add_argument("--only", choices=["paced", "cpu"], help="run one part only")
    parser.add_argument("--rates", default="", metavar="R,R",
                        help=f"paced step rates to run (default: all of {', '.join(str(r[0]) for r in RATES)})")
    parser.add_argument("--gpu", action="store_true",
                        help="the GPU wait is a CUDA kernel and torch.cuda.synchronize() (needs a GPU)")
    parser.add_argument("--worker", choices=["paced", "cpu"], help=argparse.SUPPRESS)
    parser.add_argument("--variant", default="off", help=argparse.SUPPRESS)
    parser.add_argument("--endpoint", default="", help=argparse.SUPPRESS)
    parser.add_argument("--rate", type=float, default=200, help=argparse.SUPPRESS)
    parser.add_argument("--seconds", type=float, default=5, help=argparse.SUPPRESS)
    parser.add_argument("--work-ms", type=float, default=0.55, help=argparse.SUPPRESS)
    parser.add_argument("--wait-ms", type=float, default=3.0, help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=20000, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        out = worker_paced(args) if args.worker == "paced" else worker_cpu(args)
        print(json.dumps(out))
        return 0
    global GPU
    GPU = args.gpu
    import otel_stepspan

    print(f"# bench_engine_stall ({'quick' if args.quick else 'full'}{', GPU wait' if args.gpu else ''}): otel_stepspan from "
          f"{os.path.dirname(otel_stepspan.__file__)}, {os.cpu_count()} CPUs\n", flush=True)
    receiver = Receiver()
    try:
        checks, ok = [], True
        if args.only != "cpu":
            wanted = {int(r) for r in args.rates.split(",") if r.strip()}
            rows, checks, ok = paced(receiver, args.quick, tuple(r for r in RATES if not wanted or r[0] in wanted))
            print(table(["steps/s", "variant", "steps", "wake p50 us", "p99 us", "p99.9 us", "max us",
                         "work mean ms", "late p99 ms"], rows))
            print(flush=True)
        if args.only != "paced":
            cpu_rows, cpu_checks = cpu_per_span(receiver, args.quick)
            print(table(["per exported span (over export off)", "all processes CPU us", "ratio",
                         "engine thread CPU us", "ratio"], cpu_rows))
            print()
            checks += cpu_checks
    finally:
        receiver.close()
    for line in checks:
        print(line)
    failed = [c for c in checks if c.startswith("FAIL")]
    return 1 if failed or not ok else 0


if __name__ == "__main__":
    sys.exit(main())
