"""Sustained step rate into a real OTLP gRPC receiver, and what a slow receiver does.

Usage::

    .venv/bin/python benchmarks/bench_throughput.py            # 3 x 20 s at 10,000 steps/s
    .venv/bin/python benchmarks/bench_throughput.py --quick    # 3 x 5 s
    .venv/bin/python benchmarks/bench_throughput.py --rate 20000 --seconds 10 --delay 0.5

For each scenario a receiver (``receiver_proc.py``) starts in a process of its own and an engine
process starts with nothing but the standard variables (``OTEL_EXPORTER_OTLP_ENDPOINT``,
``OTEL_SERVICE_NAME``), so the project builds its own provider and gRPC exporter, exactly as a
user's engine would. The engine paces sglang-shaped steps (decode of varying size, prefill,
mixed, idle) through the instrumentor's wrapper at ``--rate`` for ``--seconds``, flushes, and
reports; the receiver reports how many spans crossed the socket.

* ``untraced``: the same pacing with no OTel variables, the control for the pacing jitter.
* ``normal``: the receiver answers at once. Goal: the rate is sustained and every step arrives.
* ``slow``:   every export is held ``--delay`` seconds. Goal: the step rate is not blocked, and
  every step that does not arrive is counted (``otel_stepspan.stats()``) and reported (a log line).
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import subprocess
import sys
import time
from typing import Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common as C

# -- the engine process ------------------------------------------------------------------------


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if not message.startswith(record.name):
            message = f"{record.name}: {message}"
        self.lines.append(message[:400])


def engine(rate: float, seconds: float) -> dict:
    records = _Records()
    logging.getLogger().addHandler(records)
    import otel_stepspan

    runner = C.traced_runner()
    batches = itertools.cycle(C.batch_cycle())
    total = int(rate * seconds)
    per_second: list[int] = []
    perf = time.perf_counter
    cpu0, thread0 = time.process_time(), time.thread_time()
    t0 = perf()
    done = 0
    behind: list[int] = []
    next_report = 1.0
    last_done = 0
    while done < total:
        now = perf() - t0
        due = min(total, int(now * rate) + 1)
        behind.append(due - done)
        while done < due:
            runner.forward(next(batches))
            done += 1
        if now >= next_report:
            per_second.append(done - last_done)
            last_done = done
            next_report += 1.0
        wait = t0 + done / rate - perf()
        if wait > 0:
            time.sleep(wait)
    elapsed = perf() - t0
    engine_cpu = time.thread_time() - thread0
    cpu_steps = time.process_time() - cpu0
    stats_at_end = otel_stepspan.stats()
    flush_started = perf()
    flushed = otel_stepspan.flush(120.0)
    flush_s = perf() - flush_started
    cpu_total = time.process_time() - cpu0
    return {
        "steps": done,
        "elapsed_s": elapsed,
        "rate": done / elapsed,
        "max_behind_ms": 1000 * max(behind) / rate,
        "p99_behind_ms": 1000 * sorted(behind)[int(0.99 * (len(behind) - 1))] / rate,
        "ticks_behind_10ms": sum(1 for b in behind if b > rate / 100),
        "per_second_min": min(per_second) if per_second else done,
        "engine_thread_cpu_us_per_step": 1e6 * engine_cpu / done,
        "process_cpu_us_per_step_while_stepping": 1e6 * cpu_steps / done,
        "process_cpu_us_per_step_total": 1e6 * cpu_total / done,
        "stats_at_end_of_steps": stats_at_end,
        "stats": otel_stepspan.stats(),
        "flushed": flushed,
        "flush_s": flush_s,
        "log_lines": records.lines[:8],
        "log_count": len(records.lines),
    }


# -- the orchestration -------------------------------------------------------------------------


class Receiver:
    def __init__(self, delay: float) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, os.path.join(C.HERE, "receiver_proc.py"), "--delay", str(delay)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=C.clean_env(),
        )
        self.endpoint = json.loads(self.proc.stdout.readline())["endpoint"]

    def ask(self, command: str) -> dict:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def settle(self, expected: int, timeout_s: float) -> dict:
        """Wait for ``expected`` spans, or until the count stops moving."""
        deadline = time.monotonic() + timeout_s
        last = self.ask("count")
        while last["spans"] < expected and time.monotonic() < deadline:
            now = self.ask(f"wait {expected} 2")
            if now["spans"] == last["spans"]:
                return now
            last = now
        return last

    def close(self) -> None:
        try:
            self.proc.stdin.write("quit\n")
            self.proc.stdin.flush()
            self.proc.wait(10)
        except Exception:
            self.proc.kill()


def run_scenario(name: str, rate: float, seconds: float, delay: Optional[float], extra_env: dict) -> dict:
    """One engine process; ``delay=None`` runs it untraced (no OTel variables) as the control."""
    receiver = Receiver(delay) if delay is not None else None
    try:
        env = C.clean_env()
        if receiver is not None:
            start = receiver.ask("count")
            env.update(OTEL_EXPORTER_OTLP_ENDPOINT=receiver.endpoint, OTEL_SERVICE_NAME="bench-throughput")
            env.update(extra_env)
        result = C.run_child(
            "bench_throughput.py", ["--engine", "--rate", str(rate), "--seconds", str(seconds)], env, timeout=600
        )
        if receiver is not None:
            received = receiver.settle(result["steps"], 30.0)
            result["received"] = received["spans"] - start["spans"]
            result["requests"] = received["requests"]
            result["receiver_cpu_s"] = received["cpu_s"] - start["cpu_s"]
    finally:
        if receiver is not None:
            receiver.close()
    result.update(name=name, target_rate=rate, delay_s=delay)
    # Reports made in the engine process, and those its exporter process wrote on its stderr.
    result["log_count"] += len(result.pop("stderr_lost_lines"))
    return result


def counted_losses(stats: dict) -> int:
    """Spans ``otel_stepspan.stats()`` says were lost, whatever the keys it reports them under."""
    if "lost" in stats:
        return int(stats["lost"])
    keys = [k for k in stats if any(w in k for w in ("drop", "fail", "queue_full"))]
    return sum(int(stats[k]) for k in keys)


def report(results: list[dict]) -> tuple[str, bool]:
    rows = []
    goals = []
    ok_all = True
    for r in results:
        traced = r["delay_s"] is not None
        s = r["stats"]
        lost = r["steps"] - r["received"] if traced else 0
        counted = counted_losses(s)
        rows.append(
            [
                r["name"],
                f"{r['target_rate']:.0f}",
                f"{r['rate']:.0f}",
                f"{r['per_second_min']}",
                f"{r['p99_behind_ms']:.1f} / {r['max_behind_ms']:.1f} ms",
                f"{r['steps']}",
                f"{r['received']}" if traced else "-",
                f"{s.get('emitted', '-')}",
                f"{counted}" if traced else "-",
                f"{lost - counted}" if traced else "-",
                f"{r['process_cpu_us_per_step_total']:.1f} µs",
                f"{r['flush_s']:.1f} s" if traced else "-",
            ]
        )
        if not traced:
            continue
        sustained = r["rate"] >= 0.99 * r["target_rate"]
        if r["delay_s"] == 0:
            ok = sustained and lost == 0 and counted == 0
            goals.append([f"{r['name']}: ≥ {r['target_rate']:.0f} steps/s sustained into OTLP gRPC, zero dropped",
                          f"{r['rate']:.0f}/s, received {r['received']}/{r['steps']}", C.verdict(ok)])
        else:
            ok_rate = sustained and r["p99_behind_ms"] <= 10
            ok_counted = lost == counted and (lost == 0 or r["log_count"] > 0)
            goals.append([f"{r['name']}: step rate not blocked ({r['delay_s']} s per export)",
                          f"{r['rate']:.0f}/s, p99 {r['p99_behind_ms']:.1f} ms behind", C.verdict(ok_rate)])
            goals.append([f"{r['name']}: every lost span counted in stats() and reported in the log",
                          f"lost {lost}, in stats() {counted}, log lines {r['log_count']}", C.verdict(ok_counted)])
            ok = ok_rate and ok_counted
        ok_all = ok_all and ok
    head = ["scenario", "target/s", "achieved/s", "worst 1 s", "behind p99 / max", "steps", "received",
            "emitted", "lost per stats()", "lost, uncounted", "process CPU/step", "flush"]
    text = [C.table(head, rows), ""]
    for r in results:
        if r["delay_s"] is not None:
            text.append(f"{r['name']}: stats() {r['stats']}")
        for line in r["log_lines"][:3]:
            text.append(f"{r['name']} log: {line}")
    text += ["", C.table(["goal", "measured", "result"], goals)]
    return "\n".join(text), ok_all


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="5 s per scenario")
    parser.add_argument("--rate", type=float, default=10000.0, help="steps per second (default 10000)")
    parser.add_argument("--seconds", type=float, default=None, help="seconds per scenario (default 20, quick 5)")
    parser.add_argument("--delay", type=float, default=0.25, help="slow receiver: seconds per export (default 0.25)")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                        help="extra variable for the traced engine processes (e.g. OTEL_BSP_MAX_QUEUE_SIZE=8192)")
    parser.add_argument("--only", choices=["untraced", "normal", "slow"], action="append", help="run only these")
    parser.add_argument("--engine", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    seconds = args.seconds or (5.0 if args.quick else 20.0)
    if args.engine:
        print(json.dumps(engine(args.rate, seconds)))
        return 0
    started = time.monotonic()
    print(f"bench_throughput{' --quick' if args.quick else ''}: {C.machine_line()}\n", flush=True)
    extra = dict(item.split("=", 1) for item in args.env)
    if extra:
        print(f"extra environment for the traced engines: {extra}\n")
    scenarios = {"untraced": ("untraced (control)", None), "normal": ("normal", 0.0), "slow": ("slow", args.delay)}
    results = [
        run_scenario(label, args.rate, seconds, delay, extra)
        for key, (label, delay) in scenarios.items()
        if not args.only or key in args.only
    ]
    text, ok = report(results)
    print(text)
    print(f"\n{'all goals PASS' if ok else 'some goals FAIL'} ({time.monotonic() - started:.0f} s)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
