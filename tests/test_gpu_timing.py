"""GPU step timing: the completer's logic through events with CUDA semantics on the CPU, the
runtime wired to it, and (on a CUDA machine only) real CUDA events."""

from __future__ import annotations

import time

import pytest
import torch

from otel_stepspan import StepInfo, runtime, step_span, traced_forward
from otel_stepspan.sinks.gpu_timing import GpuStepTimer

BASE_NS = 1_700_000_000_000_000_000


class FakeGpu:
    """A device clock and per-stream queues: work enqueued on a stream runs after what is there."""

    def __init__(self) -> None:
        self.now_ms = 0.0
        self.busy_until: dict[object, float] = {}

    def enqueue(self, work_ms: float, stream: object = "default") -> None:
        self.busy_until[stream] = max(self.busy_until.get(stream, 0.0), self.now_ms) + work_ms

    def wall_ns(self) -> int:
        return BASE_NS + int(self.now_ms * 1e6)


class FakeEvent:
    """cudaEvent semantics: recorded at the tail of its stream, complete once the device gets
    there, elapsed_time only between completed events."""

    def __init__(self, gpu: FakeGpu) -> None:
        self.gpu = gpu
        self.at_ms: float | None = None

    def record(self, stream: object = None) -> None:
        stream = stream or "default"
        self.at_ms = max(self.gpu.busy_until.get(stream, 0.0), self.gpu.now_ms)

    def query(self) -> bool:
        return self.at_ms is not None and self.gpu.now_ms >= self.at_ms

    def elapsed_time(self, end: "FakeEvent") -> float:
        if not (self.query() and end.query()):
            raise RuntimeError("cudaErrorNotReady")
        # The timer must never rely on a negative interval (recorded end before start).
        assert end.at_ms >= self.at_ms, "elapsed_time asked for a negative interval"
        return end.at_ms - self.at_ms

    def synchronize(self) -> None:
        self.gpu.now_ms = max(self.gpu.now_ms, self.at_ms)


def make_timer(gpu: FakeGpu, emitted: list, **kwargs) -> GpuStepTimer:
    timer = GpuStepTimer(
        lambda: FakeEvent(gpu),
        lambda payload, start, end, extra: emitted.append((payload, start, end, extra)),
        side_stream="side",
        clock=gpu.wall_ns,
        **kwargs,
    )
    timer._start_thread = lambda: None  # the tests poll by hand
    return timer


def launch(timer: GpuStepTimer, gpu: FakeGpu, name: str, work_ms: float, stream: object = "default"):
    """What the runtime does around a forward whose kernels take work_ms on the device."""
    events = timer.start()
    if events is None:
        return None
    events[0].record(stream)
    gpu.enqueue(work_ms, stream)
    cpu_start = gpu.wall_ns()
    events[1].record(stream)
    timer._pending.append((events[0], events[1], events[2], name, cpu_start, cpu_start + 50_000))
    return events


def test_spans_get_the_gpu_window_not_the_launch_time():
    gpu, emitted = FakeGpu(), []
    timer = make_timer(gpu, emitted)
    launch(timer, gpu, "step1", 5.0)  # both launched at t=0: the CPU runs ahead
    launch(timer, gpu, "step2", 3.0)
    assert timer.poll() == 0  # nothing has run yet
    gpu.now_ms = 10.0
    assert timer.poll() == 2
    (p1, s1, e1, x1), (p2, s2, e2, x2) = emitted
    assert (p1, s1, e1) == ("step1", BASE_NS, BASE_NS + 5_000_000)
    assert (p2, s2, e2) == ("step2", BASE_NS + 5_000_000, BASE_NS + 8_000_000)
    assert x1 == {"forward.gpu_time_ms": 5.0, "forward.cpu_time_ms": 0.05}
    assert x2["forward.gpu_time_ms"] == 3.0


def test_steps_keep_the_calibration_current_when_they_started():
    gpu, emitted = FakeGpu(), []
    timer = make_timer(gpu, emitted)
    gpu.now_ms = 40.0
    launch(timer, gpu, "before", 2.0)  # takes the calibration made at t=0
    timer._calibrated_at -= 3600  # due: the next poll recalibrates, at t=41
    gpu.now_ms = 41.0
    timer.poll()
    assert emitted == []  # "before" is still running (with the new calibration, its start
    gpu.now_ms = 100.0  # would be 1 ms before it: a negative interval)...
    launch(timer, gpu, "after", 3.0)  # ...and this one takes the t=41 calibration
    gpu.now_ms = 200.0
    assert timer.poll() == 2
    placed = {payload: (start, end) for payload, start, end, _ in emitted}
    assert placed["before"] == (BASE_NS + 40_000_000, BASE_NS + 42_000_000)
    assert placed["after"] == (BASE_NS + 100_000_000, BASE_NS + 103_000_000)


def test_out_of_order_completion_emits_each_when_done():
    gpu, emitted = FakeGpu(), []
    timer = make_timer(gpu, emitted)
    launch(timer, gpu, "slow", 10.0, stream="s1")
    launch(timer, gpu, "fast", 1.0, stream="s2")
    gpu.now_ms = 2.0
    assert timer.poll() == 1
    assert [e[0] for e in emitted] == ["fast"]
    gpu.now_ms = 11.0
    assert timer.poll() == 1
    assert [e[0] for e in emitted] == ["fast", "slow"]
    assert emitted[1][2] - emitted[1][1] == 10_000_000


def test_backlog_overflow_falls_back_to_cpu_timing_and_counts():
    gpu, emitted = FakeGpu(), []
    timer = make_timer(gpu, emitted, max_in_flight=2)
    assert launch(timer, gpu, "a", 1.0) is not None
    assert launch(timer, gpu, "b", 1.0) is not None
    assert timer.start() is None
    assert timer.fallbacks == 1
    gpu.now_ms = 5.0
    timer.poll()
    assert launch(timer, gpu, "c", 1.0) is not None  # room again once steps completed
    assert len(timer._free) == 2  # completed events are reused, not recreated


def test_shutdown_with_events_pending_emits_cpu_times():
    gpu, emitted = FakeGpu(), []
    timer = make_timer(gpu, emitted)
    launch(timer, gpu, "done", 1.0)
    launch(timer, gpu, "stuck", 1000.0)
    gpu.now_ms = 2.0
    assert timer.drain(timeout_s=0.05) is False
    assert [e[0] for e in emitted] == ["done", "stuck"]
    _, start, end, extra = emitted[1]
    assert extra == {"forward.cpu_time_ms": 0.05}
    assert end - start == 50_000
    assert timer.timed_out == 1


def test_runtime_times_spans_on_the_gpu_when_asked(memory_spans, monkeypatch):
    monkeypatch.setenv("OTEL_STEPSPAN_GPU_TIMING", "1")
    runtime.refresh_settings()
    gpu = FakeGpu()
    made = []

    def fake_cuda_timer(emit, max_in_flight=1024):
        timer = GpuStepTimer(lambda: FakeEvent(gpu), emit, side_stream="side", clock=gpu.wall_ns)
        made.append(timer)
        return timer

    monkeypatch.setattr(runtime, "cuda_timer", fake_cuda_timer)

    @traced_forward(lambda bs: StepInfo("decode", bs, 0, bs, 0, bs))
    def forward(self, bs):
        gpu.enqueue(4.0)  # the kernels this step launches
        return bs

    assert forward(None, 2) == 2
    assert forward(None, 3) == 3
    gpu.now_ms = 100.0
    spans = memory_spans.spans()
    assert [s.name for s in spans] == ["step[decode bs=2]", "step[decode bs=3]"]
    for span in spans:
        assert span.attributes["forward.gpu_time_ms"] == 4.0
        assert span.attributes["forward.cpu_time_ms"] >= 0
        assert span.end_time - span.start_time == 4_000_000
    assert spans[1].start_time - spans[0].start_time == 4_000_000
    assert made and made[0].completed == 2


def test_gpu_timing_without_cuda_keeps_cpu_times(memory_spans, monkeypatch, caplog):
    monkeypatch.setenv("OTEL_STEPSPAN_GPU_TIMING", "1")
    runtime.refresh_settings()
    monkeypatch.setattr(runtime, "cuda_timer", lambda emit, max_in_flight=1024: None)
    with caplog.at_level("WARNING", logger="otel_stepspan"):
        with step_span(StepInfo("decode", 1)):
            pass
    (span,) = memory_spans.spans()
    assert "forward.gpu_time_ms" not in span.attributes
    assert any("CUDA is not available" in r.getMessage() for r in caplog.records)


def test_nvtx_sink_pushes_and_pops_the_label(monkeypatch):
    from otel_stepspan.sinks import nvtx

    calls = []
    monkeypatch.setattr(nvtx, "_resolved", True)
    monkeypatch.setattr(nvtx, "_push", lambda label: calls.append(("push", label)))
    monkeypatch.setattr(nvtx, "_pop", lambda: calls.append(("pop",)))
    monkeypatch.setenv("OTEL_STEPSPAN_NVTX", "1")
    runtime.refresh_settings()

    @traced_forward(lambda bs: StepInfo("decode", bs))
    def forward(self, bs):
        if bs == 2:
            raise ValueError("boom")
        return bs

    forward(None, 1)
    with pytest.raises(ValueError):
        forward(None, 2)
    assert calls == [("push", "step[decode bs=1]"), ("pop",), ("push", "step[decode bs=2]"), ("pop",)]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_real_cuda_events_measure_the_gpu_window(memory_spans, monkeypatch):
    monkeypatch.setenv("OTEL_STEPSPAN_GPU_TIMING", "1")
    runtime.refresh_settings()
    cycles = int(torch.cuda.get_device_properties(0).clock_rate * 1000 * 0.05)  # ~50 ms of spinning

    @traced_forward(lambda bs: StepInfo("decode", bs))
    def forward(self, bs):
        torch.cuda._sleep(cycles)
        return bs

    forward(None, 1)  # warm up
    launched = time.perf_counter_ns()
    forward(None, 1)
    launch_ns = time.perf_counter_ns() - launched  # the engine thread did not wait for the GPU
    spans = memory_spans.spans()
    span = spans[-1]
    gpu_ms = span.attributes["forward.gpu_time_ms"]
    assert gpu_ms > 20
    assert abs((span.end_time - span.start_time) / 1e6 - gpu_ms) < 0.01
    assert span.attributes["forward.cpu_time_ms"] < gpu_ms
    assert launch_ns / 1e6 < gpu_ms
