"""``otel-stepspan request`` and ``search --request``: the steps one request went through.

The spans file is written the way a run writes it: request spans made by an "engine's" own
tracer (each request the root of its own trace), and step spans made by otel_stepspan through the
same provider, linking to the requests they computed. The schedule is decided here, so every
figure the report prints is checked against what the schedule says.
"""

from __future__ import annotations

import json

import pytest
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

from otel_stepspan import StepInfo, flush, runtime
from otel_stepspan.cli.main import main
from otel_stepspan.cli.request import RequestStep, summarise
from otel_stepspan.otlp_json import OtlpJsonFileExporter, StepSpan
from otel_stepspan.step import RequestLink

MS = 1_000_000

# (request, work, tokens) per step; step i runs at t0 + 10 ms * (i + 1) for 2 ms (step 4: 9 ms).
SCHEDULE = [
    [("a", "prefill", 64)],
    [("a", "prefill", 36), ("b", "prefill", 20)],  # a's second chunk, mixed with b's prompt
    [("a", "decode", 1), ("b", "decode", 1)],
    [("a", "decode", 1), ("b", "decode", 1)],
    [("b", "decode", 1)],  # a preempted
    [("a", "prefill", 102), ("b", "decode", 1)],  # a recomputed: its prompt and 2 outputs
    [("a", "decode", 1)],
] + [[("a", "decode", 1)]] * 8


@pytest.fixture
def spans_file(tmp_path, monkeypatch):
    """A spans file from a run of SCHEDULE; returns (path, {request id: trace id hex}, t0)."""
    return write_run(tmp_path, monkeypatch)


def write_run(tmp_path, monkeypatch, engine_ids=None):
    """A run of SCHEDULE written as a spans file; ``engine_ids`` renames the requests as the
    engine names them (the links' ``request.id``)."""
    engine_ids = engine_ids or {"a": "a", "b": "b"}
    path = tmp_path / "spans.jsonl"
    provider = TracerProvider(resource=Resource.create({"service.name": "engine-x"}))
    exporter = OtlpJsonFileExporter(path)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setattr(trace, "_TRACER_PROVIDER", provider)
    runtime.refresh_settings()
    engine = provider.get_tracer("engine")
    t0 = 1_800_000_000_000_000_000
    requests = {
        "a": engine.start_span("request", start_time=t0 + 2 * MS, attributes={"request.id": "a"}),
        "b": engine.start_span("request", start_time=t0 + 15 * MS, attributes={"request.id": "b"}),
    }
    contexts = {rid: span.get_span_context() for rid, span in requests.items()}
    sink = runtime.otel_sink()
    for i, row in enumerate(SCHEDULE):
        links = tuple(
            RequestLink(engine_ids[rid], contexts[rid].trace_id, contexts[rid].span_id, 1, work, tokens)
            for rid, work, tokens in row
        )
        decodes = sum(1 for _, work, _ in row if work == "decode")
        prefills = [tokens for _, work, tokens in row if work == "prefill"]
        info = StepInfo.from_counts(prefill_seqs=len(prefills), extend_tokens=sum(prefills), decode_seqs=decodes)
        info = StepInfo(info.mode, info.batch_size, info.extend_tokens, info.decode_seqs, info.prefill_seqs,
                        info.num_tokens, i + 1, links=links)
        start = t0 + 10 * MS * (i + 1)
        # The step span sink itself, given the step's times (as the engine thread records them).
        sink.submit(lambda x: x, info, {"engine.name": "engine-x"}, Context(), start, start + (9 if i == 3 else 2) * MS,
                    None)
    requests["b"].end(end_time=t0 + 75 * MS)
    requests["a"].end(end_time=t0 + 170 * MS)
    assert flush(10)
    runtime._flush_at_exit()
    provider.shutdown()
    return path, {rid: format(c.trace_id, "032x") for rid, c in contexts.items()}, t0


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_a_request_by_trace_id_lists_its_steps_in_order_and_where_its_time_went(spans_file, capsys):
    path, traces, t0 = spans_file
    code, out, err = _run(capsys, "request", traces["a"], "--file", str(path), "--json")
    assert code == 0, err
    report = json.loads(out)
    mine = [(i, work, tokens) for i, row in enumerate(SCHEDULE, 1) for rid, work, tokens in row if rid == "a"]
    assert [(s["work"], s["tokens"]) for s in report["steps"]] == [(w, t) for _, w, t in mine]
    assert [s["start_unix_nano"] for s in report["steps"]] == [t0 + 10 * MS * i for i, _, _ in mine]
    assert report["request_id"] == "a" and report["trace_id"] == traces["a"]
    assert report["queued_ms"] == pytest.approx(8.0)  # request at t0+2 ms, first step at t0+10 ms
    assert report["wall_ms"] == pytest.approx(168.0)
    assert report["tokens"] == sum(t for _, _, t in mine)
    in_steps = sum(9 if i == 4 else 2 for i, _, _ in mine)
    assert report["in_steps_ms"] == pytest.approx(in_steps)
    assert report["between_steps_ms"] == pytest.approx(168.0 - 8.0 - in_steps)
    phases = {p["work"]: p for p in report["phases"]}
    assert (phases["prefill"]["steps"], phases["prefill"]["tokens"]) == (3, 64 + 36 + 102)
    assert phases["decode"]["steps"] == len(mine) - 3
    assert report["recompute_steps"] == [5]  # a's 5th step: prompt work again after decoding
    assert report["slowest_steps"][0] == 4  # step 4 of the run (9 ms) is a's 4th step


def test_prompt_work_after_verify_steps_is_reported_as_a_recompute():
    """Speculative decoding: the request's tokens come from verify steps; preempted, its prompt
    is computed again (its 4th step)."""
    works = ["prefill", "verify", "verify", "prefill", "verify"]
    steps = [
        RequestStep(StepSpan("ab" * 16, f"{i:016x}", "step", "engine-x", i * MS, i * MS + 1, 1,
                             {"forward.mode": work}), work, 1, "a", "cd" * 16)
        for i, work in enumerate(works, 1)
    ]
    assert summarise("a", steps).recomputes == (4,)


def test_a_request_by_request_id_gives_the_same_steps_and_the_table_says_it_plainly(spans_file, capsys):
    path, traces, _ = spans_file
    code, out, _ = _run(capsys, "request", "b", "--file", str(path), "--all")
    assert code == 0
    rows = [line for line in out.splitlines() if line.split() and line.split()[0].isdigit()]
    assert [line.split()[2] for line in rows] == ["prefill", "decode", "decode", "decode", "decode"]
    assert "step[mixed bs=2 ext=56 dec=0]" not in out  # labels come from the step spans themselves
    assert "step[prefill bs=2 toks=56]" in rows[0]
    assert "where the time went: 60.0 ms = queued 5.0 ms" in out
    assert "preempted" not in out  # b never did prompt work after decoding


def test_the_id_a_client_gave_vllm_finds_the_engine_request(tmp_path, monkeypatch, capsys):
    """vLLM's engine core names a request by the client's id, a dash and 8 hex characters; the id
    the client knows finds it, in ``request`` and in ``search --request``."""
    path, traces, _ = write_run(tmp_path, monkeypatch, {"a": "cmpl-7-1f2e3d4c", "b": "cmpl-8-00aa11bb"})
    code, out, _ = _run(capsys, "request", "cmpl-8", "--file", str(path), "--all")
    assert code == 0
    rows = [line for line in out.splitlines() if line.split() and line.split()[0].isdigit()]
    assert [line.split()[2] for line in rows] == ["prefill", "decode", "decode", "decode", "decode"]
    assert "cmpl-8-00aa11bb" in out
    code, out, _ = _run(capsys, "search", "--file", str(path), "--request", "cmpl-8", "--json", "--limit", "0")
    assert [json.loads(line)["attributes"]["forward.pass_id"] for line in out.splitlines()] == [
        i for i, row in enumerate(SCHEDULE, 1) if any(rid == "b" for rid, _, _ in row)
    ]
    # A prefix that is not the engine's form finds nothing.
    code, out, err = _run(capsys, "request", "cmpl", "--file", str(path))
    assert code == 0 and out == "" and "is the engine tracing requests" in err


def test_a_client_id_naming_two_engine_requests_is_refused_with_both_named(tmp_path, monkeypatch, capsys):
    path, _, _ = write_run(tmp_path, monkeypatch, {"a": "chat-1-aaaaaaaa", "b": "chat-1-bbbbbbbb"})
    code, out, err = _run(capsys, "request", "chat-1", "--file", str(path))
    assert code == 2 and out == ""
    assert "names 2 engine requests (chat-1-aaaaaaaa, chat-1-bbbbbbbb)" in err
    code, out, _ = _run(capsys, "request", "chat-1-bbbbbbbb", "--file", str(path), "--all")
    assert code == 0
    assert len([line for line in out.splitlines() if line.split() and line.split()[0].isdigit()]) == 5


def test_long_decode_runs_fold_unless_every_step_is_asked_for(spans_file, capsys):
    path, traces, _ = spans_file
    _, folded, _ = _run(capsys, "request", traces["a"], "--file", str(path))
    _, every, _ = _run(capsys, "request", traces["a"], "--file", str(path), "--all")
    assert "more decode steps" in folded and "more decode steps" not in every
    assert len(every.splitlines()) > len(folded.splitlines())


def test_search_by_request_lists_only_its_steps(spans_file, capsys):
    path, traces, _ = spans_file
    code, out, _ = _run(capsys, "search", "--file", str(path), "--request", "b", "--json", "--limit", "0")
    assert code == 0
    found = [json.loads(line) for line in out.splitlines()]
    assert [step["attributes"]["forward.pass_id"] for step in found] == [
        i for i, row in enumerate(SCHEDULE, 1) if any(rid == "b" for rid, _, _ in row)
    ]
    code, out, _ = _run(capsys, "search", "--file", str(path), "--request", traces["b"], "--json", "--limit", "0")
    assert [json.loads(line)["span_id"] for line in out.splitlines()] == [step["span_id"] for step in found]


def test_plot_writes_an_image(spans_file, capsys, tmp_path):
    path, traces, _ = spans_file
    image = tmp_path / "request.png"
    code, _, err = _run(capsys, "request", traces["a"], "--file", str(path), "--plot", str(image))
    assert code == 0, err
    assert image.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_an_unknown_request_says_why_nothing_was_found(spans_file, capsys):
    path, _, _ = spans_file
    code, out, err = _run(capsys, "request", "no-such-request", "--file", str(path))
    assert code == 0 and out == ""
    assert "is the engine tracing requests" in err


def test_a_missing_file_is_a_clear_error(capsys, tmp_path):
    code, _, err = _run(capsys, "request", "x", "--file", str(tmp_path / "nope.jsonl"))
    assert code == 2 and "no such spans file" in err
