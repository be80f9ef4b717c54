"""Run the six benchmarks and write their tables to ``docs/performance.md``.

Usage::

    .venv/bin/python benchmarks/write_performance_md.py            # full runs (~18 min)
    .venv/bin/python benchmarks/write_performance_md.py --quick    # short runs, to try it out

Each benchmark's output is kept verbatim (its tables and goal verdicts); this only arranges it.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
DOC = os.path.join(os.path.dirname(HERE), "docs", "performance.md")


def run(script: str, quick: bool) -> str:
    args = [sys.executable, os.path.join(HERE, script)] + (["--quick"] if quick else [])
    print("running", " ".join(args[1:]), flush=True)
    proc = subprocess.run(args, capture_output=True, text=True, timeout=900)
    return proc.stdout


def between(text: str, start: str, end: str | None = None) -> str:
    a = text.index(start)
    b = text.index(end, a) if end else len(text)
    return text[a:b]


def body(text: str) -> str:
    """The text without its ``###`` headings and the final PASS/FAIL summary line."""
    keep = [
        line
        for line in text.splitlines()
        if not line.startswith("### ") and not line.startswith(("all goals PASS", "some goals FAIL"))
    ]
    return "\n".join(keep).strip()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    overhead = run("bench_overhead.py", args.quick)
    throughput = run("bench_throughput.py", args.quick)
    memory = run("bench_memory.py", args.quick)
    stall = run("bench_engine_stall.py", args.quick)
    vllm_step = run("bench_vllm_step.py", args.quick)
    paced = run("bench_paced.py", args.quick)
    stall_tables = stall.split("\n", 1)[1]  # without its header line
    paced_tables = paced.split("\n", 1)[1]
    machine = overhead.splitlines()[0].split(":", 1)[1].split("; otel_stepspan")[0].strip()
    flag = " --quick" if args.quick else ""
    out = f"""# Performance

What a traced forward step costs, measured side by side with the baselines it replaces. One run
of each benchmark ({machine}), printed as is; reproduce with:

```bash
.venv/bin/python benchmarks/bench_engine_stall.py{flag}  # ~12 min
.venv/bin/python benchmarks/bench_overhead.py{flag}      # ~1 min
.venv/bin/python benchmarks/bench_throughput.py{flag}    # ~2 min
.venv/bin/python benchmarks/bench_memory.py{flag}        # ~1 min
.venv/bin/python benchmarks/bench_vllm_step.py{flag}     # ~1 min
.venv/bin/python benchmarks/bench_paced.py{flag}         # ~8 min
```

(`--quick` for short runs; `benchmarks/write_performance_md.py` reruns all six and rewrites
this page.) Two export paths are measured: with export configured by the `OTEL_*` variables,
steps go to an exporter process of their own (`bench_engine_stall.py`, `bench_throughput.py`);
when the engine set up its own SDK tracer provider, step spans are made through it, in the
engine process (`bench_overhead.py`'s OpenTelemetry rows, `bench_memory.py`). A goal is judged on the median, over 30-60 interleaved rounds, of the ratio between
batches of the two variants run back to back; the tables give the median, minimum and
10th-90th percentile of the per-batch means. Engine-thread costs are on the thread's CPU clock.
How and why: [`benchmarks/README.md`](../benchmarks/README.md).

## Export on vs off, in the engine's shape

`bench_engine_stall.py`: per step, GIL-holding scheduler work, then the instrumented
`ModelRunner.forward` waiting for "the GPU" with the GIL released (`--gpu`: a real CUDA kernel and
`torch.cuda.synchronize()`), paced at 50 to 2,000 steps/s; export configured only by
`OTEL_EXPORTER_OTLP_ENDPOINT` into a real OTLP receiver in another process, blocks of export off
and on interleaved; the engine thread pinned to CPU 0, the receiver and the exporter process to
the other CPU (both variants alike: a serving host has cores to spare, and the question is the
engine's GIL). *Wake*: from the end of the GPU wait to the engine thread running Python
again; *work*: the scheduler work's wall time; *late*: how far steps started behind schedule.
*off again*: export off a second time, the A/A control; its ratios to *off* (the `info` lines)
show how far two identical variants stray apart on this machine. *in-process* (reference): an
SDK provider with a BatchSpanProcessor and the OTLP exporter set up in the engine process. Then CPU per exported span, steps back to back, every process counted
(the engine and its exporter process; not the receiver).

{body(stall_tables)}

## Paced steps: what a step adds when its caches are cold

`bench_paced.py`: each step, scheduler work holding the GIL (light: a small loop, or heavy: a
walk through 30 MB of objects), then the instrumented `forward` waiting 1, 3 or 10 ms with the
GIL released; added wall is the wall time of `forward` minus the time inside the engine's own
`forward` (the wrapper before and after), median per step. The hot loop (steps back to back) is
there for reference.

What the engine thread does per step, for sglang (and the reference engine): one compiled call
(`otel_stepspan/_stepcall.c`) that checks the same state the Python wrapper checks (keeping
what it read of the runtime's state until the runtime decides again), reads the batch by the
integration's plan and writes its fields in the ring's marshal format into a buffer of its own,
then calls the engine's `forward`; after it, only the clock and a copy into the ring
(`otel_stepspan/exporter/_ringput.c`, `_ringput.h`). After a wait, the caches are cold: each
Python-level operation costs about a microsecond on this machine, and so, less so, does each C
function and each object of the interpreter that the call touches for the first time since
the last step; the fewer the call touches, the less it costs. The exporter process reads the ring every
50 ms: each of its wake-ups costs the engine thread too on a machine whose CPUs share caches
(1 ms steps: +28 us with 5 ms polls, +15 with 50 ms, +12 with none, measured with the Python
wrapper).

{body(paced_tables)}

## Per step: off, OpenTelemetry on, profiler on

`bench_overhead.py`. The stand-in `ModelRunner.forward` returns at once, so each number is the
cost of the step span alone. *pr_pattern*: `record_function(label) if _profiler_enabled() else
nullcontext()` inline, the label formatted only when profiling; *sglang_0523*: sglang 0.5.23's
`profile_range(build_step_span_name(batch))`, which formats the label every step;
*instrumentor*: what `SGLangInstrumentor` installs; *decorator*: `@traced_forward(describe)`;
*step_span*: `with step_span(describe, batch)`; *sdk_span*: `with
tracer.start_as_current_span(label, attributes={{...}})`, label and attributes formatted inline,
through an SDK provider whose BatchSpanProcessor exports into an exporter that drops;
*record_function*: `with record_function(label)`, label formatted inline.

### Nothing on (no profiler, no OpenTelemetry)

{body(between(overhead, "### Off", "### OTel on, engine thread"))}

### OpenTelemetry on: the engine thread

{body(between(overhead, "### OTel on, engine thread", "### OTel on, whole-process"))}

### OpenTelemetry on: CPU per exported span, all threads

{body(between(overhead, "### OTel on, whole-process", "### Torch profiler"))}

### Torch profiler on

{body(between(overhead, "### Torch profiler", "### Goals"))}

### Goals

{body(between(overhead, "### Goals"))}

## Sustained rate into a real OTLP gRPC receiver

`bench_throughput.py`: an engine process configured only by `OTEL_EXPORTER_OTLP_ENDPOINT` paces
sglang-shaped steps through the instrumentor at 10,000/s into the project's `OtlpReceiver`
running in a process of its own; *slow* holds every export 0.25 s; the untraced control shows
the pacing jitter of the machine itself. *Behind* is how far the steps fell behind their
schedule; *lost, uncounted* = steps - received - losses reported by `otel_stepspan.stats()`.

{body(between(throughput, "| scenario"))}

## Memory over a million steps

`bench_memory.py`: OpenTelemetry on, every step exported into an exporter that drops it; RSS
after `otel_stepspan.flush()` at each mark (0 = after a 50,000-step warm-up). Then steps with no
waiting at all: the step queue stays at its bound and every drop is counted.

{body(between(memory, "### RSS").replace("### Overload", "**Overload**"))}

## Classifying a vLLM step, by batch size

`bench_vllm_step.py`: with export configured by the `OTEL_*` variables, a vLLM step is classified
on the engine thread as it ends, the one part of a traced vLLM step that grows with the batch.
*describe*: what the adapter does (a well-formed step of a current layout counted in bulk with
C-level builtins); *request by request*: the same step counted per request in Python, as
malformed steps and old layouts are. *links on*: request tracing, one span link per request.

{body(between(vllm_step, "| kind"))}
"""
    out = out.replace("**Overload**", "\n**Overload**")
    with open(DOC, "w") as f:
        f.write(out)
    print("wrote", DOC)
    return 0


if __name__ == "__main__":
    sys.exit(main())
