"""The compiled step call (otel_stepspan/_stepcall.c): sglang's traced forward as one C call for
the usual step, giving the same spans as the Python wrapper for every step, and handing every
step it does not take to that wrapper."""

from __future__ import annotations

import gc
import inspect
import shutil
import weakref

import pytest
from opentelemetry import trace
from opentelemetry.trace import StatusCode

import sglang_fakes as fakes
from otel_stepspan import runtime
from otel_stepspan.integrations import sglang


def _compiled_module():
    """The compiled step call; where a C compiler is at hand the install must have built it."""
    if runtime._stepcall is None:
        if shutil.which("cc") or shutil.which("gcc"):
            pytest.fail("a C compiler is here, but otel_stepspan/_stepcall.c was not built by the install")
        pytest.skip("no C compiler here: the compiled step call was not built")
    return runtime._stepcall


def _runner_class(compiled: bool) -> type:
    """A stand-in sglang ModelRunner whose forward is sglang's traced forward, as the compiled
    step call or as the Python wrapper alone (built from the same capture)."""
    capture, attributes, plan = sglang._capture_for("sglang")
    forward = runtime.wrap_method(
        fakes.ModelRunner.forward, capture, sglang.finish, attributes, sglang.label_of,
        compiled=plan if compiled else None,
    )
    if compiled:
        assert type(forward) is _compiled_module().StepCall
    return type("ModelRunner", (fakes.ModelRunner,), {"forward": forward})


def _with_requests(batch):
    rows: list = [(f"r{i}", 0x1234 + i, 0x99 + i, 1) for i in range(batch.batch_size)]
    sglang.mark_requests(batch, rows, queued_requests=3, kv_tokens=640)
    return batch


def _steps():
    """(batch, the compiled call takes it) for one of each shape the plan covers or declines."""
    return [
        (fakes.decode_batch(4), False),  # DECODE's first step: the Python capture names the member
        (fakes.decode_batch(6), True),
        (fakes.extend_batch([300, 212]), False),
        (fakes.extend_batch([5]), True),
        (fakes.mixed_batch([200, 56], running_bs=6), False),
        (fakes.mixed_batch([7], running_bs=2), True),
        (fakes.ForwardBatch(fakes.ForwardMode.IDLE, batch_size=0), False),
        (fakes.ForwardBatch(fakes.ForwardMode.IDLE, batch_size=0), True),
        (_with_requests(fakes.decode_batch(3)), True),
        (fakes.verify_batch(bs=3, draft_token_num=4), False),  # spec_info: the Python capture
        (fakes.verify_batch(bs=2, draft_token_num=4), False),
    ]


def _seen(span) -> tuple:
    return (
        span.name,
        dict(span.attributes),
        [(link.context.trace_id, link.context.span_id, dict(link.attributes or {})) for link in span.links],
        span.status.status_code,
    )


def test_the_compiled_call_traces_each_step_as_the_python_wrapper_does(memory_spans):
    _compiled_module()
    seen = {}
    for compiled in (False, True):
        sglang._mode_by_member.clear()
        runner = _runner_class(compiled)(tp_rank=1)
        for batch, _ in _steps():
            assert runner.forward(batch, pp_proxy_tensors="pp", split_forward_count=2)[0] == "output"
            assert runner.seen[-1] == (batch, None, "pp", 2)
        seen[compiled] = [_seen(span) for span in memory_spans.spans()[len(seen.get(False, [])):]]
        if compiled:
            forward = type(runner).__dict__["forward"]
            assert forward.fast_steps == sum(fast for _, fast in _steps())
    assert len(seen[True]) == len(_steps())
    assert seen[True] == seen[False]
    names = [name for name, *_ in seen[True]]
    assert names[:3] == ["step[decode bs=4]", "step[decode bs=6]", "step[prefill bs=2 toks=512]"]
    assert names[4] == "step[mixed bs=8 ext=256 dec=6]"
    assert seen[True][8][1]["forward.request_ids"] == ("r0", "r1", "r2")
    assert seen[True][8][1]["scheduler.queued_requests"] == 3


def test_a_draft_runner_goes_through_the_python_capture(memory_spans):
    forward_class = _runner_class(True)
    runner = forward_class(is_draft_worker=True)
    for _ in range(3):
        runner.forward(fakes.decode_batch(5))
    assert [s.name for s in memory_spans.spans()] == ["step[draft bs=5]"] * 3
    assert forward_class.__dict__["forward"].fast_steps == 0


def test_an_exception_from_the_forward_is_submitted_and_raised_as_it_was(memory_spans):
    runner_class = _runner_class(True)
    runner = runner_class()
    runner.forward(fakes.decode_batch(2))  # names DECODE
    batch = fakes.decode_batch(2)
    boom = RuntimeError("CUDA out of memory")
    batch.explode = boom
    with pytest.raises(RuntimeError) as raised:
        runner.forward(batch)
    assert raised.value is boom and boom.__traceback__ is not None
    assert runner_class.__dict__["forward"].fast_steps == 1
    span = memory_spans.spans()[-1]
    assert span.status.status_code == StatusCode.ERROR
    (event,) = span.events
    assert event.attributes["exception.message"] == "CUDA out of memory"
    assert "raise forward_batch.explode" in event.attributes["exception.stacktrace"]


def test_a_step_under_a_current_span_is_its_child_through_the_compiled_call(memory_spans):
    runner_class = _runner_class(True)
    runner = runner_class()
    runner.forward(fakes.decode_batch(2))  # names DECODE
    tracer = memory_spans.provider.get_tracer("test")
    with tracer.start_as_current_span("request") as request:
        runner.forward(fakes.decode_batch(2))
    step = memory_spans.spans()[-1]
    assert [s.name for s in memory_spans.spans()] == ["step[decode bs=2]"] * 2
    assert step.parent is not None and step.parent.span_id == request.get_span_context().span_id
    assert step.context.trace_id == request.get_span_context().trace_id
    assert runner_class.__dict__["forward"].fast_steps == 1


@pytest.mark.parametrize("plain_key", [False, True])
def test_under_suppressed_instrumentation_no_step_is_traced(memory_spans, plain_key):
    from opentelemetry import context

    runner_class = _runner_class(True)
    runner = runner_class()
    runner.forward(fakes.decode_batch(2))  # names DECODE
    tracer = memory_spans.provider.get_tracer("test")
    key = runtime._SUPPRESS_KEY_PLAIN if plain_key else runtime._SUPPRESS_KEY
    with tracer.start_as_current_span("request"):
        token = context.attach(context.set_value(key, True))
        try:
            assert runner.forward(fakes.decode_batch(3))[0] == "output"
        finally:
            context.detach(token)
    assert [s.name for s in memory_spans.spans()] == ["step[decode bs=2]"]  # not the suppressed one
    assert "request" in [s.name for s in memory_spans.all_spans()]
    assert runner_class.__dict__["forward"].fast_steps == 0


def test_with_nothing_on_the_forward_is_called_with_its_arguments_and_nothing_is_traced():
    runner_class = _runner_class(True)
    runner = runner_class()
    batch = fakes.decode_batch(2)
    assert runner.forward(batch, True, pp_proxy_tensors="pp") == ("output", 1)
    assert runner.seen == [(batch, True, "pp", 1)]
    assert runtime._state.decided_for is not None  # never decided: the off test alone ran
    assert runner_class.__dict__["forward"].fast_steps == 0


def test_a_provider_set_after_the_first_steps_is_decided_for_and_then_taken(memory_spans, monkeypatch):
    monkeypatch.setattr(trace, "_TRACER_PROVIDER", None)
    runner_class = _runner_class(True)
    runner = runner_class()
    runner.forward(fakes.decode_batch(2))
    monkeypatch.setattr(trace, "_TRACER_PROVIDER", memory_spans.provider)
    runner.forward(fakes.decode_batch(3))  # decided here, by the Python wrapper
    runner.forward(fakes.decode_batch(4))
    assert [s.name for s in memory_spans.spans()] == ["step[decode bs=3]", "step[decode bs=4]"]
    assert runner_class.__dict__["forward"].fast_steps == 1


def test_it_reads_as_the_engine_method_and_keeps_no_runner_alive(memory_spans):
    runner_class = _runner_class(True)
    forward = runner_class.__dict__["forward"]
    assert forward.__wrapped__ is fakes.ModelRunner.forward and forward.__name__ == "forward"
    assert inspect.signature(runner_class.forward) == inspect.signature(fakes.ModelRunner.forward)
    keeper = runner_class()
    keeper.forward(fakes.decode_batch(2))  # DECODE named by the Python wrapper, which keeps its runner
    runner = runner_class()
    runner.forward(fakes.decode_batch(2))
    assert forward.fast_steps == 1
    gone = weakref.ref(runner)
    del runner
    gc.collect()
    assert gone() is None


def test_a_captured_type_that_is_not_a_tuple_is_refused():
    stepcall = _compiled_module()
    args = (print, print, print, dict, (), (), {}, "n", print, {}, {}, {}, print)
    with pytest.raises(TypeError, match="tuple"):
        stepcall.StepCall(*args)


def test_under_the_torch_profiler_a_step_is_a_range_made_by_the_python_wrapper(memory_spans):
    import torch

    runner_class = _runner_class(True)
    runner = runner_class()
    runner.forward(fakes.decode_batch(2))  # names DECODE
    runner.forward(fakes.decode_batch(2))
    assert runner_class.__dict__["forward"].fast_steps == 1
    with torch.profiler.profile() as profile:
        runner.forward(fakes.decode_batch(3))
    assert "step[decode bs=3]" in {event.name for event in profile.events()}
    assert runner_class.__dict__["forward"].fast_steps == 1
    runner.forward(fakes.decode_batch(4))
    assert runner_class.__dict__["forward"].fast_steps == 2
    assert [s.name for s in memory_spans.spans()][-2:] == ["step[decode bs=3]", "step[decode bs=4]"]


def test_steps_keep_no_reference_to_what_they_read(memory_spans):
    import sys

    runner_class = _runner_class(True)
    runner = runner_class()
    batch = fakes.mixed_batch([7], running_bs=2)
    boom = fakes.decode_batch(2)
    boom.explode = ValueError("boom")
    runner.forward(batch)  # names MIXED
    with pytest.raises(ValueError):
        runner.forward(boom)  # names DECODE
    statics = sglang._facts_by_runner[id(runner)].attributes
    runner.seen.clear()
    boom.explode.__traceback__ = None  # its frames hold the runner
    assert len(memory_spans.spans()) == 2  # flushed: nothing is held for export
    watched = (batch, batch.extend_seq_lens_cpu, statics, runner, boom.explode, runner_class.__dict__["forward"])
    before = [sys.getrefcount(obj) for obj in watched]
    taken = runner_class.__dict__["forward"].fast_steps
    for _ in range(200):
        runner.forward(batch)
        with pytest.raises(ValueError):
            runner.forward(boom)
        runner.seen.clear()
    assert len(memory_spans.spans()) == 402
    boom.explode.__traceback__ = None
    assert [sys.getrefcount(obj) for obj in watched] == before
    assert runner_class.__dict__["forward"].fast_steps - taken == 400


def _sink_with_ring(capacity: int = 1 << 16):
    """An exporter-process sink with its ring and the compiled producer, read here: no exporter
    process is started."""
    from otel_stepspan.exporter.ring import Ring
    from otel_stepspan.sinks.otel_process import ExporterProcessSink

    sink = ExporterProcessSink()
    ring = Ring.create(capacity)
    sink._started = True
    sink._attach_ring(ring)
    assert ring.producer is not None and type(sink.submit).__name__ == "Submitter"
    return sink


def _ring_sink(monkeypatch, capacity: int = 1 << 16):
    """The runtime's state as the variables set it up (export wanted, no provider), decided for
    an exporter-process sink whose ring is read here."""
    monkeypatch.setattr(trace, "_TRACER_PROVIDER", None)
    state = runtime._State()
    sink = _sink_with_ring(capacity)
    state.wanted, state.decided_for, state.sink, state.fast_sink = True, None, sink, sink
    monkeypatch.setattr(runtime, "_state", state)
    return state, sink


def _ring_records(compiled: bool, monkeypatch) -> tuple[list, type]:
    """Every record the steps of :func:`_steps` (and an erring one) put into an exporter-process
    sink's ring, as the exporter loads them, and the runner class that made them."""
    import marshal
    import os

    from otel_stepspan.exporter.ring import Ring

    _, sink = _ring_sink(monkeypatch)
    reader = Ring.attach(os.dup(sink._ring.fd))
    try:
        sglang._mode_by_member.clear()
        runner_class = _runner_class(compiled)
        runner = runner_class(tp_rank=1)
        for batch, _ in _steps():
            assert runner.forward(batch, pp_proxy_tensors="pp")[0] == "output"
        boom = fakes.decode_batch(5)
        boom.explode = RuntimeError("CUDA out of memory")
        with pytest.raises(RuntimeError):
            runner.forward(boom)
        records = [marshal.loads(record) for record in reader.take()]
        assert sink.emitted_total == len(_steps()) + 1 and sink.failed_total == sink.dropped_total == 0
        return records, runner_class
    finally:
        reader.close()
        sink._ring.close()


def _comparable(record: tuple) -> tuple:
    """A ring record without what differs from run to run: the clock, and the stacktrace's frames
    (the Python wrapper's own are in it)."""
    from otel_stepspan.exporter import wire

    if record[0] != wire.CAPTURED:
        return record
    exception = dict(record[6]) if record[6] else record[6]
    if exception:
        assert "raise forward_batch.explode" in exception.pop("exception.stacktrace")
    return (record[0], record[3], record[4], record[5], exception, record[7], record[8])


def test_a_staged_step_puts_the_record_the_python_wrapper_puts(monkeypatch):
    """With the exporter process's sink, the compiled call writes the usual step's fields before
    the forward and puts them after it (exporter/_ringput.h): the ring then holds, record for
    record, what the Python wrapper puts for the same steps, an erring step included."""
    _compiled_module()
    python, _ = _ring_records(False, monkeypatch)
    compiled, runner_class = _ring_records(True, monkeypatch)
    forward = runner_class.__dict__["forward"]
    fast = sum(fast for _, fast in _steps()) + 1
    # The first fast step is staged already: the Python path defined the finisher and statics.
    assert forward.fast_steps == forward.staged_steps == fast
    assert [_comparable(r) for r in compiled] == [_comparable(r) for r in python]
    steps = [r for r in compiled if r[0] == 4]
    assert len(steps) == len(_steps()) + 1 and all(r[1] <= r[2] for r in steps)
    assert steps[-1][6]["exception.message"] == "CUDA out of memory"
    assert steps[8][8][11] == ([("r0", 0x1234, 0x99, 1), ("r1", 0x1235, 0x9A, 1), ("r2", 0x1236, 0x9B, 1)], 3, 640)


def test_a_staged_step_the_ring_has_no_room_for_is_counted(monkeypatch):
    import os

    _compiled_module()
    _, sink = _ring_sink(monkeypatch, 1 << 12)
    read_fd, write_fd = os.pipe()  # an exporter that is alive but behind: the step is dropped
    sink._status_fd = read_fd
    try:
        runner_class = _runner_class(True)
        runner = runner_class()
        runner.forward(fakes.decode_batch(2))
        runner.forward(fakes.decode_batch(2))
        while sink._ring.put(b"x" * 200):
            pass
        runner.forward(fakes.decode_batch(3))
        assert runner_class.__dict__["forward"].staged_steps == 2
        assert sink.dropped_total == 1 and sink.emitted_total == 2 and sink.failed_total == 0
    finally:
        sink._status_fd = None
        os.close(read_fd)
        os.close(write_fd)
        sink._ring.close()


def test_once_the_runtime_decides_again_the_step_call_reads_its_state_again(monkeypatch):
    """The compiled call keeps what it read of the runtime's state (a paced step pays for every
    attribute it reads) until otel_sink() says it decided again."""
    _compiled_module()
    state, first = _ring_sink(monkeypatch)
    second = _sink_with_ring()
    try:
        runner_class = _runner_class(True)
        runner = runner_class()
        for _ in range(3):
            runner.forward(fakes.decode_batch(2))
        state.sink = state.fast_sink = second  # as otel_sink() sets it, and then says so:
        runtime._stepcall.changed()
        for _ in range(2):
            runner.forward(fakes.decode_batch(2))
        assert (first.emitted_total, second.emitted_total) == (3, 2)
        assert runner_class.__dict__["forward"].staged_steps == 3  # the second's first step defines
    finally:
        first._ring.close()
        second._ring.close()


def test_staged_steps_keep_no_reference_to_what_they_read(monkeypatch):
    import sys

    _compiled_module()
    _, sink = _ring_sink(monkeypatch, 1 << 22)
    try:
        runner_class = _runner_class(True)
        runner = runner_class()
        batches = [fakes.mixed_batch([7], running_bs=2), _with_requests(fakes.decode_batch(3))]
        for batch in batches:
            runner.forward(batch)  # names the modes; the first defines the finisher and statics
        runner.seen.clear()
        statics = sglang._facts_by_runner[id(runner)].attributes
        watched = (*batches, batches[0].extend_seq_lens_cpu, batches[1]._otel_stepspan_requests, statics, runner)
        before = [sys.getrefcount(obj) for obj in watched]
        forward = runner_class.__dict__["forward"]
        staged = forward.staged_steps
        for _ in range(200):
            for batch in batches:
                runner.forward(batch)
            runner.seen.clear()
        assert [sys.getrefcount(obj) for obj in watched] == before
        assert forward.staged_steps - staged == 400 and sink.emitted_total == 402
    finally:
        sink._ring.close()


def test_steps_go_into_the_ring_the_sink_has_now(monkeypatch):
    """A fork's child closes the sink's ring and makes its own on its first step: the compiled
    call, which keeps the sink's submitter, takes the new one."""
    from otel_stepspan.exporter.ring import Ring

    _compiled_module()
    _, sink = _ring_sink(monkeypatch)
    try:
        runner = _runner_class(True)()
        for _ in range(3):
            runner.forward(fakes.decode_batch(2))
        old = sink._ring
        old.close()
        sink._reset()  # what the child does after a fork (its exporter starts on the next step)
        sink._started = True
        sink._attach_ring(Ring.create(1 << 16))
        for _ in range(2):
            runner.forward(fakes.decode_batch(2))
        assert sink.emitted_total == 2 and sink.failed_total == 0 and sink._ring.put_total == 4  # and the definitions
    finally:
        sink._ring.close()
