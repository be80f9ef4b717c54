"""Cost of the step span per forward, side by side with the baselines of issue 5.

Usage::

    .venv/bin/python benchmarks/bench_overhead.py            # full run (~1-2 min on 2 cores)
    .venv/bin/python benchmarks/bench_overhead.py --quick    # a short run

Each scenario runs in a fresh interpreter of its own (a process sets its tracer provider once):

* ``off``      no profiler, no OpenTelemetry: the bare call, the PR's inline pattern, sglang
               0.5.23's pattern, and the project's wrapper / decorator / context manager;
               plus the wrapper on MIXED batches of bs 1, 64, 1024.
* ``otel``     an SDK provider (counting sampler, BatchSpanProcessor into an exporter that drops
               spans), every step inside a parent span: the engine thread's CPU per step against
               a plain SDK span; then the whole process's CPU per exported span; then checks that
               every step became one exported span, through the sampler, under the parent.
* ``profiler`` short ``torch.profiler.profile(activities=[CPU])`` sessions: the project's paths
               against a bare ``record_function`` with the label formatted inline.

Within a scenario the variants are interleaved (rotating order, many rounds) and the table shows
the median of per-batch means, the minimum and the 10th-90th percentile spread. Engine-thread
costs use the thread's CPU clock (``time.thread_time_ns``), which the machine's other processes
cannot inflate by preempting us; the wall-clock median is shown beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from typing import Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common as C

SCALING_BS = (1, 64, 1024)


# -- scenario: everything off ------------------------------------------------------------------


def scenario_off(quick: bool) -> dict:
    from opentelemetry import trace

    from otel_stepspan import runtime

    runtime.refresh_settings()
    assert trace._TRACER_PROVIDER is None and runtime.sinks_off(), "a sink is on in the off scenario"
    runners = C.make_off_runners()
    steps, rounds = (5000, 15) if quick else (20000, 60)
    batch = C.decode_batch(64)
    variants = {name: (C.loop_of(runner, batch), steps) for name, runner in runners.items()}
    for name in ("bare", "pr_pattern", "instrumentor", "decorator"):
        variants[f"{name} (kw call)"] = (C.loop_of(runners[name], batch, keyword=True), steps)
    for bs in SCALING_BS:
        variants[f"instrumentor mixed bs={bs}"] = (C.loop_of(runners["instrumentor"], C.mixed_batch(bs)), steps)
    samples = C.interleaved(variants, rounds)
    assert runtime.sinks_off(), "a sink turned on during the off scenario"
    return {"results": C.summarize(samples), "samples": samples, "steps": steps, "rounds": rounds}


# -- scenario: OpenTelemetry on ----------------------------------------------------------------


def _otel_setup():
    from opentelemetry import context, trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
    from opentelemetry.sdk.trace.sampling import ALWAYS_ON, ParentBased, Sampler

    class CountingSampler(Sampler):
        """ParentBased(ALWAYS_ON), counting how often the SDK asked it."""

        def __init__(self) -> None:
            self.inner = ParentBased(ALWAYS_ON)
            self.calls = 0

        def should_sample(self, *args, **kwargs):
            self.calls += 1
            return self.inner.should_sample(*args, **kwargs)

        def get_description(self) -> str:
            return "Counting(" + self.inner.get_description() + ")"

    class DroppingExporter(SpanExporter):
        """Drops every span after counting it by scope and checking its parent."""

        def __init__(self) -> None:
            self.by_scope: dict[str, int] = {}
            self.parent_id = None
            self.wrong_parent = 0
            self.sample_names: list[str] = []

        def export(self, spans):
            by_scope, pid = self.by_scope, self.parent_id
            for span in spans:
                scope = span.instrumentation_scope.name
                by_scope[scope] = by_scope.get(scope, 0) + 1
                if span.name == "bench.parent":
                    continue
                if span.parent is None or span.parent.span_id != pid:
                    self.wrong_parent += 1
                if scope == "otel_stepspan" and len(self.sample_names) < 3:
                    self.sample_names.append(span.name)
            return SpanExportResult.SUCCESS

        def shutdown(self) -> None:
            return None

    sampler = CountingSampler()
    exporter = DroppingExporter()
    provider = TracerProvider(sampler=sampler)
    provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    parent = provider.get_tracer("bench.parent").start_span("bench.parent")
    exporter.parent_id = parent.get_span_context().span_id
    token = context.attach(trace.set_span_in_context(parent))
    return provider, sampler, exporter, parent, token


def _thread_clocks() -> dict[str, int]:
    clocks = {"process": time.process_time_ns()}
    for thread in threading.enumerate():
        try:
            clocks[thread.name] = time.clock_gettime_ns(time.pthread_getcpuclockid(thread.ident))
        except (OSError, AttributeError, TypeError):
            pass
    return clocks


def scenario_otel(quick: bool) -> dict:
    import otel_stepspan
    from otel_stepspan import runtime

    runtime.refresh_settings()
    provider, sampler, exporter, parent, token = _otel_setup()
    baseline = provider.get_tracer("bench.baseline")
    span_args = C.inline_span_args

    class SdkSpanRunner:
        """A plain SDK span inline in forward, label and attributes formatted from the batch."""

        forward_pass_id = 0

        def forward(self, forward_batch, pp_proxy_tensors=None):
            label, attributes = span_args(forward_batch)
            with baseline.start_as_current_span(label, attributes=attributes):
                return forward_batch

    runners = C.make_off_runners()
    sdk = SdkSpanRunner()
    steps_ours, steps_sdk = (1000, 300) if quick else (2000, 600)
    rounds = 8 if quick else 30
    tally = {"ours": 0, "sdk": 0}

    def counted(loop, kind):
        def run(n):
            tally[kind] += n
            loop(n)

        return run

    def flush_all():
        otel_stepspan.flush(30.0)
        provider.force_flush()

    batch = C.decode_batch(64)
    variants = {
        "bare": (C.loop_of(runners["bare"], batch), steps_ours),
        "sdk_span": (counted(C.loop_of(sdk, batch), "sdk"), steps_sdk),
    }
    for name in ("instrumentor", "decorator", "step_span"):
        variants[name] = (counted(C.loop_of(runners[name], batch), "ours"), steps_ours)
    for bs in SCALING_BS:
        variants[f"instrumentor mixed bs={bs}"] = (
            counted(C.loop_of(runners["instrumentor"], C.mixed_batch(bs)), "ours"),
            steps_ours,
        )
    for bs in SCALING_BS:
        variants[f"sdk_span mixed bs={bs}"] = (counted(C.loop_of(sdk, C.mixed_batch(bs)), "sdk"), steps_sdk)
    engine_samples = C.interleaved(variants, rounds, between=flush_all)
    engine = C.summarize(engine_samples)

    # Whole-process CPU per exported span: steps, then flush (span creation on the sink's thread,
    # the batch processor's export), all on the clock.
    cpu_steps = 1000 if quick else 2000
    cpu_rounds = 12 if quick else 40
    cpu_variants = {
        "sdk_span": counted(C.loop_of(sdk, batch), "sdk"),
        "instrumentor": counted(C.loop_of(runners["instrumentor"], batch), "ours"),
    }
    per_thread: dict[str, dict[str, list[float]]] = {name: {} for name in cpu_variants}
    names = list(cpu_variants)
    C.freeze_heap()
    for r in range(cpu_rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            flush_all()
            before = _thread_clocks()
            cpu_variants[name](cpu_steps)
            flush_all()
            after = _thread_clocks()
            for key, value in after.items():
                if key in before:
                    per_thread[name].setdefault(key, []).append((value - before[key]) / cpu_steps)
    cpu = {
        name: {key: C.summary(values) for key, values in clocks.items()} for name, clocks in per_thread.items()
    }

    flush_all()
    stats = otel_stepspan.stats()
    from opentelemetry import context

    context.detach(token)
    parent.end()
    provider.force_flush()
    checks = {
        "steps_ours": tally["ours"],
        "steps_sdk": tally["sdk"],
        "exported_ours": exporter.by_scope.get("otel_stepspan", 0),
        "exported_sdk": exporter.by_scope.get("bench.baseline", 0),
        "sampler_calls": sampler.calls - 1,  # the parent span's own decision
        "wrong_parent": exporter.wrong_parent,
        "stats": stats,
        "sample_names": exporter.sample_names,
    }
    return {
        "engine": engine,
        "engine_samples": engine_samples,
        "cpu": cpu,
        "cpu_samples": {name: clocks["process"] for name, clocks in per_thread.items()},
        "checks": checks,
        "rounds": rounds,
        "cpu_rounds": cpu_rounds,
        "cpu_steps": cpu_steps,
    }


# -- scenario: torch profiler on ---------------------------------------------------------------


def scenario_profiler(quick: bool) -> dict:
    import torch

    from otel_stepspan import runtime

    runtime.refresh_settings()
    record_function = torch.profiler.record_function
    label_of = C.inline_label

    class RecordFunctionRunner:
        forward_pass_id = 0

        def forward(self, forward_batch, pp_proxy_tensors=None):
            with record_function(label_of(forward_batch)):
                return forward_batch

    runners = C.make_off_runners()
    runners["record_function"] = RecordFunctionRunner()
    batch = C.decode_batch(64)
    steps = 300
    sessions, rounds = (4, 3) if quick else (14, 3)
    names = ["bare", "record_function", "pr_pattern", "sglang_0523", "instrumentor", "decorator", "step_span"]
    variants = {name: (C.loop_of(runners[name], batch), steps) for name in names}
    merged: dict[str, dict[str, list[float]]] = {name: {"cpu": [], "wall": []} for name in names}
    activities = [torch.profiler.ProfilerActivity.CPU]
    for _ in range(sessions):
        with torch.profiler.profile(activities=activities):
            samples = C.interleaved(variants, rounds)
        for name, s in samples.items():
            merged[name]["cpu"] += s["cpu"]
            merged[name]["wall"] += s["wall"]
    # The labels really reach the trace.
    with torch.profiler.profile(activities=activities) as prof:
        runners["instrumentor"].forward(batch)
        runners["instrumentor"].forward(C.mixed_batch(64))
    seen = sorted({e.name for e in prof.events() if e.name.startswith("step[")})
    return {"results": C.summarize(merged), "samples": merged, "labels_in_trace": seen, "sessions": sessions}


# -- the report --------------------------------------------------------------------------------


def _rows(results: dict, names: list[str], bare: str = "bare", key: str = "cpu") -> list[list[str]]:
    rows = []
    b = results[bare][key]["median"] if bare else 0.0
    for name in names:
        r = results[name]
        s = r[key]
        rows.append(
            [
                name,
                C.fmt_ns(s["median"]),
                C.fmt_ns(s["min"]),
                f"{C.fmt_ns(s['p10'])} – {C.fmt_ns(s['p90'])}",
                C.fmt_ns(r["wall"]["median"]),
                C.fmt_ns(s["median"] - b) if bare else "",
            ]
        )
    return rows


HEAD = ["variant", "median/step", "min", "p10 – p90", "wall median", "over bare"]


def paired(samples: dict, num: str, den: str, bare: Optional[str] = None, key: str = "cpu") -> dict:
    """Per-round ratios ``(num - bare) / (den - bare)`` of batches run back to back, summarized:
    robust to the machine's speed drifting between rounds (others' jobs, frequency changes)."""
    a, b = samples[num][key], samples[den][key]
    z = samples[bare][key] if bare else [0.0] * len(a)
    ratios = [(x - z0) / (y - z0) for x, y, z0 in zip(a, b, z) if y - z0 > 0]
    return C.summary(ratios)


def _spread(p: dict) -> str:
    return f"p10–p90 {p['p10']:.3f}–{p['p90']:.3f}"


def report(off: dict, otel: dict, prof: dict) -> tuple[str, bool]:
    out: list[str] = []
    goals: list[list[str]] = []
    all_ok = True

    def goal(name: str, p: dict, target: float, detail: str = "", below: bool = True) -> None:
        nonlocal all_ok
        ok = p["median"] <= target if below else p["median"] >= target
        all_ok = all_ok and ok
        goals.append([name, f"{p['median']:.3f}", f"≤ {target:.3f}", f"{_spread(p)}; {detail}".strip("; "), C.verdict(ok)])

    def info(name: str, p: dict, detail: str = "") -> None:
        goals.append([name, f"{p['median']:.3f}", "(info)", f"{_spread(p)}; {detail}".strip("; "), ""])

    def medians_ratio(res: dict, num: str, den: str, bare: Optional[str], stat: str) -> float:
        z = res[bare]["cpu"][stat] if bare else 0.0
        return (res[num]["cpu"][stat] - z) / (res[den]["cpu"][stat] - z)

    def detail(res: dict, num: str, den: str, bare: Optional[str]) -> str:
        return (f"ratio of medians {medians_ratio(res, num, den, bare, 'median'):.3f}, "
                f"of mins {medians_ratio(res, num, den, bare, 'min'):.3f}")

    # off
    r, rs = off["results"], off["samples"]
    out.append(f"### Off (no profiler, no OTel): {off['rounds']} rounds x {off['steps']} steps, decode bs=64\n")
    names = ["bare", "pr_pattern", "sglang_0523", "instrumentor", "decorator", "step_span"]
    out.append(C.table(HEAD, _rows(r, names)))
    out.append("")
    out.append("sglang's own call shape, `forward(forward_batch, pp_proxy_tensors=...)`:\n")
    kw = ["bare (kw call)", "pr_pattern (kw call)", "instrumentor (kw call)", "decorator (kw call)"]
    out.append(C.table(HEAD, _rows(r, kw, bare="bare (kw call)")))
    out.append("")
    for name in ("instrumentor", "decorator"):
        goal(f"off: {name} overhead / PR-pattern overhead", paired(rs, name, "pr_pattern", "bare"), 0.5,
             detail(r, name, "pr_pattern", "bare"))
    for name in ("instrumentor", "decorator"):
        goal(f"off, kw call: {name} overhead / PR-pattern overhead",
             paired(rs, f"{name} (kw call)", "pr_pattern (kw call)", "bare (kw call)"), 0.5,
             detail(r, f"{name} (kw call)", "pr_pattern (kw call)", "bare (kw call)"))
    info("off: step_span overhead / PR-pattern overhead", paired(rs, "step_span", "pr_pattern", "bare"))
    info("off: sglang 0.5.23 overhead / PR-pattern overhead", paired(rs, "sglang_0523", "pr_pattern", "bare"))
    big, small = f"instrumentor mixed bs={SCALING_BS[-1]}", f"instrumentor mixed bs={SCALING_BS[0]}"
    goal(f"off scaling: cost at mixed bs={SCALING_BS[-1]} / bs={SCALING_BS[0]}", paired(rs, big, small), 1.25,
         " / ".join(C.fmt_ns(r[f"instrumentor mixed bs={bs}"]["cpu"]["median"]) for bs in SCALING_BS))

    # otel engine thread
    e, es = otel["engine"], otel["engine_samples"]
    out.append(f"### OTel on, engine thread (thread CPU clock): {otel['rounds']} rounds, decode bs=64 unless named\n")
    names = ["bare", "sdk_span", "instrumentor", "decorator", "step_span"]
    names += [f"instrumentor mixed bs={bs}" for bs in SCALING_BS] + [f"sdk_span mixed bs={bs}" for bs in SCALING_BS]
    out.append(C.table(HEAD, _rows(e, names)))
    out.append("")
    goal("otel: instrumentor engine-thread cost / plain SDK span", paired(es, "instrumentor", "sdk_span", "bare"),
         0.125, detail(e, "instrumentor", "sdk_span", "bare") +
         f"; wall {paired(es, 'instrumentor', 'sdk_span', 'bare', key='wall')['median']:.3f}")
    for name in ("decorator", "step_span"):
        info(f"otel: {name} engine-thread cost / plain SDK span", paired(es, name, "sdk_span", "bare"),
             "describes the batch on the engine thread")
    goal(f"otel scaling: engine cost at mixed bs={SCALING_BS[-1]} / bs={SCALING_BS[0]}", paired(es, big, small), 1.25,
         " / ".join(C.fmt_ns(e[f"instrumentor mixed bs={bs}"]["cpu"]["median"]) for bs in SCALING_BS))

    # cpu per span
    cpu = otel["cpu"]
    out.append(f"### OTel on, whole-process CPU per exported span: {otel['cpu_rounds']} rounds x "
               f"{otel['cpu_steps']} steps, decode bs=64\n")
    threads = sorted({t for v in cpu.values() for t in v} - {"process"})
    head = ["variant", "process median", "process min", "p10 – p90"] + [f"{t} (median)" for t in threads]
    rows = []
    for name, clocks in cpu.items():
        p = clocks["process"]
        rows.append(
            [name, C.fmt_ns(p["median"]), C.fmt_ns(p["min"]), f"{C.fmt_ns(p['p10'])} – {C.fmt_ns(p['p90'])}"]
            + [C.fmt_ns(clocks[t]["median"]) if t in clocks else "" for t in threads]
        )
    out.append(C.table(head, rows))
    out.append("")
    cs = {name: {"cpu": values} for name, values in otel["cpu_samples"].items()}
    goal("otel: total CPU per span, instrumentor / plain SDK span", paired(cs, "instrumentor", "sdk_span"), 1.0,
         f"ratio of medians {cpu['instrumentor']['process']['median'] / cpu['sdk_span']['process']['median']:.3f}, "
         f"of mins {cpu['instrumentor']['process']['min'] / cpu['sdk_span']['process']['min']:.3f}")

    ch = otel["checks"]
    stats = ch["stats"]
    total_steps = ch["steps_ours"] + ch["steps_sdk"]
    counts_ok = (
        ch["exported_ours"] == ch["steps_ours"]
        and ch["exported_sdk"] == ch["steps_sdk"]
        and ch["sampler_calls"] == total_steps
        and ch["wrong_parent"] == 0
        and stats.get("dropped", 0) == 0
        and stats.get("failed", 0) == 0
    )
    out.append(
        f"Checks: project steps {ch['steps_ours']}, exported {ch['exported_ours']} (stats() {stats}); "
        f"SDK steps {ch['steps_sdk']}, exported {ch['exported_sdk']}; sampler calls {ch['sampler_calls']} for "
        f"{total_steps} steps; spans with a wrong parent {ch['wrong_parent']}; names e.g. {ch['sample_names'][:2]}\n"
    )
    goals.append(["otel: exported == steps, sampler calls == steps, parent kept", "", "all equal", "",
                  C.verdict(counts_ok)])
    all_ok = all_ok and counts_ok

    # profiler
    p, ps = prof["results"], prof["samples"]
    out.append(f"### Torch profiler on (CPU activities): {prof['sessions']} short sessions, decode bs=64\n")
    names = ["bare", "record_function", "pr_pattern", "sglang_0523", "instrumentor", "decorator", "step_span"]
    out.append(C.table(HEAD, _rows(p, names)))
    out.append(f"\nLabels found in the profiler's events: {prof['labels_in_trace']}\n")
    goal("profiler: instrumentor / bare record_function", paired(ps, "instrumentor", "record_function"), 1.2,
         detail(p, "instrumentor", "record_function", None))
    for name in ("decorator", "step_span"):
        info(f"profiler: {name} / bare record_function", paired(ps, name, "record_function"),
             detail(p, name, "record_function", None))
    labels_ok = "step[decode bs=64]" in prof["labels_in_trace"]
    goals.append(["profiler: label reaches the trace", "", "present", "", C.verdict(labels_ok)])
    all_ok = all_ok and labels_ok

    out.append("### Goals\n")
    out.append("measured = median over rounds of the ratio between batches run back to back\n")
    out.append(C.table(["goal", "measured", "target", "spread / detail", "result"], goals))
    return "\n".join(out), all_ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a short run (fewer rounds)")
    parser.add_argument("--scenario", choices=["off", "otel", "profiler"], help="run one scenario here, print JSON")
    parser.add_argument("--json", metavar="PATH", help="also write the raw results to PATH")
    args = parser.parse_args()
    if args.scenario:
        run = {"off": scenario_off, "otel": scenario_otel, "profiler": scenario_profiler}[args.scenario]
        print(json.dumps(run(args.quick)))
        return 0
    quick = ["--quick"] if args.quick else []
    started = time.monotonic()
    print(f"bench_overhead{' --quick' if args.quick else ''}: {C.machine_line()}\n", flush=True)
    env = C.clean_env()
    results = {}
    for name in ("off", "otel", "profiler"):
        results[name] = C.run_child("bench_overhead.py", ["--scenario", name, *quick], env)
    text, ok = report(results["off"], results["otel"], results["profiler"])
    print(text)
    print(f"\n{'all goals PASS' if ok else 'some goals FAIL'} ({time.monotonic() - started:.0f} s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
