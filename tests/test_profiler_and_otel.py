"""Both sinks at once: a real torch profiler trace and OTel spans carry the same labels."""

from __future__ import annotations

import json

import torch
from opentelemetry import trace
from opentelemetry.trace import StatusCode

import sglang_fakes as fakes
from otel_stepspan import StepInfo, step_span, traced_forward
from otel_stepspan.integrations import sglang


class TinyRunner:
    """A real torch module behind an sglang-shaped forward."""

    def __init__(self) -> None:
        torch.manual_seed(0)
        self.layer = torch.nn.Linear(16, 16)

    def forward(self, forward_batch, skip_attn_backend_init=None):
        rows = max(1, forward_batch.batch_size)
        with torch.no_grad():
            return self.layer(torch.ones(rows, 16))


TinyRunner.forward = sglang.traced_forward(TinyRunner.forward)

BATCHES = [
    fakes.extend_batch([12, 20]),
    fakes.decode_batch(2),
    fakes.mixed_batch([9], running_bs=2),
    fakes.ForwardBatch(fakes.ForwardMode.IDLE, 0),
    fakes.decode_batch(3),
]
LABELS = [
    "step[prefill bs=2 toks=32]",
    "step[decode bs=2]",
    "step[mixed bs=3 ext=9 dec=2]",
    "step[idle]",
    "step[decode bs=3]",
]


def _trace_labels(path) -> list[str]:
    events = json.loads(path.read_text())["traceEvents"]
    ranges = [e for e in events if e.get("ph") == "X" and str(e.get("name", "")).startswith("step[")]
    return [e["name"] for e in sorted(ranges, key=lambda e: e["ts"])]


def test_profiler_trace_and_otel_spans_share_labels(tmp_path, memory_spans):
    runner = TinyRunner()
    runner.forward(fakes.decode_batch(7))  # before the profiler: OTel only
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for batch in BATCHES:
            runner.forward(batch)
    trace_file = tmp_path / "trace.json"
    prof.export_chrome_trace(str(trace_file))

    assert _trace_labels(trace_file) == LABELS
    assert [s.name for s in memory_spans.spans()] == ["step[decode bs=7]"] + LABELS


def test_profiler_alone_labels_steps_without_otel(tmp_path):
    assert trace._TRACER_PROVIDER is None
    runner = TinyRunner()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        runner.forward(fakes.decode_batch(4))
    path = tmp_path / "trace.json"
    prof.export_chrome_trace(str(path))
    assert _trace_labels(path) == ["step[decode bs=4]"]


def test_failing_forward_closes_the_profiler_range(tmp_path, memory_spans):
    class Boom(Exception):
        pass

    @traced_forward(lambda batch: StepInfo("decode", batch))
    def forward(self, batch):
        torch.ones(4) * 2
        raise Boom("step failed")

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for bs in (1, 2):
            try:
                forward(None, bs)
            except Boom:
                pass
        with step_span(StepInfo("decode", 3)):
            torch.ones(2)
    path = tmp_path / "trace.json"
    prof.export_chrome_trace(str(path))
    assert _trace_labels(path) == ["step[decode bs=1]", "step[decode bs=2]", "step[decode bs=3]"]
    events = json.loads(path.read_text())["traceEvents"]
    assert all(e["dur"] >= 0 for e in events if str(e.get("name", "")).startswith("step["))
    spans = memory_spans.spans()
    assert [s.status.status_code for s in spans] == [StatusCode.ERROR, StatusCode.ERROR, StatusCode.UNSET]
