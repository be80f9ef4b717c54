"""``otel-stepspan timeline``: the engine's windows of steps, listed and drawn, from a spans file
written by the real in-process path (steps through an SDK provider into the project's OTLP/JSON
file exporter)."""

from __future__ import annotations

import json

import pytest
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

from otel_stepspan import StepInfo, runtime
from otel_stepspan.cli.main import main
from otel_stepspan.otlp_json import OtlpJsonFileExporter

MS = 1_000_000
MODES = ["prefill", "decode", "decode", "mixed", "idle", "decode", "decode"]  # 7 steps: windows of 3, 3, 1


@pytest.fixture
def spans_file(tmp_path, monkeypatch):
    path = tmp_path / "spans.jsonl"
    provider = TracerProvider(resource=Resource.create({"service.name": "engine-t"}))
    provider.add_span_processor(SimpleSpanProcessor(OtlpJsonFileExporter(path)))
    monkeypatch.setattr(trace, "_TRACER_PROVIDER", provider)
    monkeypatch.setenv("OTEL_STEPSPAN_TIMELINE_STEPS", "3")
    runtime.refresh_settings()
    sink = runtime.otel_sink()
    t0 = 1_800_000_000_000_000_000
    for i, mode in enumerate(MODES):
        info = StepInfo(mode, 0 if mode == "idle" else 2, 0, 0, 0, 0, i + 1)
        sink.submit(lambda x: x, info, {}, Context(), t0 + 10 * MS * i, t0 + 10 * MS * i + 4 * MS, None)
    runtime._flush_at_exit()
    provider.shutdown()
    return path, t0


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_windows_are_listed_oldest_first_with_their_counts(spans_file, capsys):
    path, t0 = spans_file
    code, out, _ = _run(capsys, "timeline", "--file", str(path), "--json")
    assert code == 0
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["steps"] for r in rows] == [3, 3, 1]
    assert [r["start_unix_nano"] for r in rows] == [t0, t0 + 30 * MS, t0 + 60 * MS]
    assert rows[0]["by_mode"] == {"decode": 2, "prefill": 1}
    assert rows[1]["by_mode"] == {"mixed": 1, "idle": 1, "decode": 1}
    assert rows[0]["duration_ms"] == pytest.approx(24.0)  # first step's start to third step's end
    assert all(r["service"] == "engine-t" for r in rows)


def test_one_window_is_drawn_step_by_step_in_order(spans_file, capsys, tmp_path):
    path, _ = spans_file
    _, listed, _ = _run(capsys, "timeline", "--file", str(path), "--json")
    second = json.loads(listed.splitlines()[1])["trace_id"]
    image = tmp_path / "window.png"
    code, out, err = _run(capsys, "timeline", second, "--file", str(path), "--plot", str(image))
    assert code == 0, err
    rows = out.splitlines()[2:]
    assert [row.split()[0] for row in rows] == ["+0.0", "+10.0", "+20.0"]
    assert [row.split()[-1] if "idle" in row else row.split("step[", 1)[1].split()[0] for row in rows] == [
        "mixed", "step[idle]", "decode"
    ]
    assert image.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_trace_that_is_no_timeline_and_a_plot_without_a_trace_say_so(spans_file, capsys):
    path, _ = spans_file
    code, out, err = _run(capsys, "timeline", "0" * 31 + "1", "--file", str(path))
    assert code == 0 and out == "" and "not a timeline trace" in err
    code, _, err = _run(capsys, "timeline", "--file", str(path), "--plot", "x.png")
    assert code == 2 and "give its TRACE_ID" in err
