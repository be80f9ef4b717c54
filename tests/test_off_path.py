"""With no profiler and no OpenTelemetry, the step span builds no label, creates no OTel object
and allocates nothing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from opentelemetry import trace

import otel_stepspan
import sglang_fakes as fakes
from otel_stepspan import StepInfo, runtime, step_span, traced_forward
from otel_stepspan.integrations import sglang
from otel_stepspan.sinks import otel as otel_sink

PACKAGE_DIR = str(Path(otel_stepspan.__file__).parent)


class Runner:
    def forward(self, forward_batch, skip_attn_backend_init=None):
        return forward_batch


Runner.forward = sglang.traced_forward(Runner.forward)


def test_off_path_describes_nothing_and_creates_no_otel_object(monkeypatch):
    assert trace._TRACER_PROVIDER is None and not runtime._state.wanted
    calls = []

    def forbidden(*args, **kwargs):
        calls.append(args)
        raise AssertionError("called on the off path")

    monkeypatch.setattr(sglang, "capture", forbidden)
    monkeypatch.setattr(sglang, "finish", forbidden)
    monkeypatch.setattr(StepInfo, "label", property(forbidden))
    monkeypatch.setattr(otel_sink.DeferredSpanSink, "__init__", forbidden)
    monkeypatch.setattr(runtime, "resolve_provider", forbidden)
    monkeypatch.setattr(trace.ProxyTracerProvider, "get_tracer", forbidden)

    describe = lambda batch: forbidden(batch)  # noqa: E731

    @traced_forward(describe)
    def forward(self, batch):
        return batch * 2

    runner = Runner()
    batch = fakes.decode_batch(4)
    for _ in range(100):
        assert runner.forward(batch) is batch
        assert runner.forward(forward_batch=batch, skip_attn_backend_init=True) is batch
        assert forward(None, 21) == 42
        with step_span(describe, batch):
            pass
    assert calls == []
    assert runtime._state.sink is None and runtime._state.sinks_by_provider == {}


ALLOCATION_PROBE = """
import contextlib, itertools, sys, tracemalloc
sys.path.insert(0, sys.argv[1])
import sglang_fakes as fakes
from otel_stepspan import StepInfo, step_span
from otel_stepspan.integrations import sglang

class Runner:
    def forward(self, forward_batch, skip_attn_backend_init=None):
        return forward_batch

Runner.forward = sglang.traced_forward(Runner.forward)
runner, batch, shared = Runner(), fakes.decode_batch(4), contextlib.nullcontext()

def empty_step():
    pass

def wrapper_step():
    runner.forward(batch)

def context_step():
    with step_span(StepInfo, batch):
        pass

def bare_with_step():
    with shared:
        pass

def peak_bytes_of(step, repeats=2000):
    step()  # warm up: the first call binds the profiler check
    tracemalloc.start()
    tracemalloc.reset_peak()
    baseline, _ = tracemalloc.get_traced_memory()
    for _ in itertools.repeat(None, repeats):
        step()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return peak - baseline

print(*(peak_bytes_of(step) for step in (empty_step, wrapper_step, bare_with_step, context_step)))
"""


def test_off_path_allocates_nothing():
    """Peak bytes allocated over 2000 steps, beyond what was live before (so transient
    allocations count). Measured in a fresh process: no other thread may allocate meanwhile."""
    result = subprocess.run(
        [sys.executable, "-c", ALLOCATION_PROBE, str(Path(__file__).parent)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    empty, wrapper, bare_with, context = map(int, result.stdout.split())
    assert wrapper == empty
    # A ``with`` statement itself makes (and frees) a bound ``__exit__`` per block: the step
    # span's block must cost exactly that and nothing of its own.
    assert context == bare_with


def test_a_provider_set_after_the_first_step_is_noticed(memory_spans, monkeypatch):
    runner = Runner()
    monkeypatch.setattr(trace, "_TRACER_PROVIDER", None)
    runner.forward(fakes.decode_batch(1))  # nothing is watching yet
    monkeypatch.setattr(trace, "_TRACER_PROVIDER", memory_spans.provider)
    runner.forward(fakes.decode_batch(2))
    assert [s.name for s in memory_spans.spans()] == ["step[decode bs=2]"]
