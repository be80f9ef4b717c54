"""The shared-memory ring between the engine and its exporter process (otel_stepspan/exporter/ring.py)."""

from __future__ import annotations

import marshal
import os
import shutil
import struct
from types import SimpleNamespace

import pytest

from otel_stepspan.exporter import wire
from otel_stepspan.exporter.ring import HEADER, PREFIX, Ring


def _compiled_module():
    """The compiled producer; where a C compiler is at hand the install must have built it."""
    try:
        from otel_stepspan.exporter import _ringput
    except ImportError:
        if shutil.which("cc") or shutil.which("gcc"):
            raise AssertionError("otel_stepspan/exporter/_ringput.c was not built (reinstall: pip install -e .)")
        pytest.skip("no C compiler here: the compiled producer was not built")
    return _ringput


@pytest.fixture(params=["python", "compiled"])
def pair(request):
    """The engine's end of a 4 KiB ring (putting with Ring.put, or with the compiled producer)
    and the exporter's end, closed after the test."""
    engine = Ring.create(1 << 12)
    if request.param == "compiled":
        _compiled_module()
        assert engine.use_compiled(wire.CAPTURED)
    exporter = Ring.attach(os.dup(engine.fd))
    yield engine, exporter
    engine.close()
    exporter.close()


def test_records_come_out_whole_and_in_order_across_the_end_of_the_circle(pair):
    engine, exporter = pair
    taken: list[bytes] = []
    sent: list[bytes] = []
    for i in range(400):  # ~30 laps of a 4 KiB circle, records of every size mod 8
        payload = bytes([i % 251]) * (i % 97 + 1)
        assert engine.put(payload)
        sent.append(payload)
        if i % 7 == 0:
            taken += exporter.take()
    taken += exporter.take()
    assert taken == sent
    assert engine.waiting() == 0 and engine.put_total == 400


def test_a_full_ring_refuses_counts_and_takes_again_once_read(pair):
    engine, exporter = pair
    payload = b"x" * 1000
    assert [engine.put(payload) for _ in range(5)] == [True, True, True, True, False]
    assert exporter.dropped() == 1 and engine.waiting() == 4
    assert exporter.take() == [payload] * 4
    assert engine.put(payload)  # the room came back
    assert not engine.put(b"y" * (1 << 12))  # never fits: refused, counted
    assert exporter.dropped() == 2
    assert exporter.take() == [payload]


def test_a_record_whose_length_does_not_match_its_check_waits_and_is_counted(pair):
    engine, exporter = pair
    assert engine.put(b"first")
    assert engine.put(b"second")
    # The second record's prefix as a reader could see it before its bytes landed.
    at = PREFIX + len(b"first")
    good = bytes(engine.map[HEADER + at : HEADER + at + PREFIX])
    engine.map[HEADER + at : HEADER + at + PREFIX] = struct.pack("<II", 6, 0)
    assert exporter.take() == [b"first"]
    assert exporter.take() == [] and exporter.unsettled == 2
    engine.map[HEADER + at : HEADER + at + PREFIX] = good
    assert exporter.take() == [b"second"] and exporter.unsettled == 0


def test_a_capacity_that_is_not_a_power_of_two_is_refused():
    with pytest.raises(ValueError, match="power of two"):
        Ring.create(3000)


def test_an_exporter_that_is_gone_is_told_from_one_that_is_only_behind():
    """The engine asks only when the ring is full: a hung-up answers pipe means the exporter is
    gone (its steps count as failed), an open one that it is behind (dropped); nothing is read."""
    from otel_stepspan.sinks.otel_process import ExporterProcessSink

    sink = ExporterProcessSink()
    read_fd, write_fd = os.pipe()
    try:
        sink._status_fd = read_fd
        os.write(write_fd, b"an answer")
        assert sink._exporter_alive()
        os.close(write_fd)
        assert not sink._exporter_alive()
        assert os.read(read_fd, 64) == b"an answer"  # left for the reader of answers
    finally:
        sink._status_fd = None
        os.close(read_fd)


def _finish(fields):  # a finisher the submitters below know by number 0
    return fields


def _submitter(ring: Ring, statics: dict, slow=None, not_put=None):
    """The compiled submitter of ``ring``, knowing ``_finish`` as finisher 0 and ``statics`` as
    attributes 1, as ExporterProcessSink installs it; ``slow`` records what it hands on."""
    from otel_stepspan.span_data import exception_event
    from otel_stepspan.step import StepInfo

    return ring.producer.submitter(
        {_finish: 0}, {id(statics): (1,)}, slow or (lambda *args: None), not_put or (lambda: None), StepInfo,
        exception_event,
    )


def test_the_compiled_producer_writes_the_bytes_ring_put_writes():
    """Same records in the same places: the compiled put and Ring.put byte for byte, and the
    submitter's CAPTURED message the one marshal.dumps packs for Ring.put (equal once loaded:
    marshal flags objects that others refer to, so its bytes depend on reference counts)."""

    def loaded(records: list[bytes]) -> list:
        return [record if record[:1] in (b"", b"r") else marshal.loads(record) for record in records]

    _compiled_module()
    rings = [Ring.create(1 << 12), Ring.create(1 << 12)]
    python, compiled = rings
    assert compiled.use_compiled(wire.CAPTURED)
    statics = {"engine.name": "sglang"}
    submit = _submitter(compiled, statics)
    readers = [Ring.attach(os.dup(ring.fd)) for ring in rings]
    try:
        for i in range(120):  # laps of the circle, records split across its end
            fields = ("decode", 4, None, None, 4, None, None, None, [1, 2] * (i % 4), False, i, ((1, 2, 1, False),))
            assert python.put(marshal.dumps((wire.CAPTURED, 10 * i, 10 * i + 5, 0, 1, None, None, None, fields)))
            submit(_finish, fields, statics, None, 10 * i, 10 * i + 5, None)
            assert python.put(b"r" * (i % 13)) and compiled.put(b"r" * (i % 13))
            if i % 5 == 0:
                assert python._counters[0] == compiled._counters[0]  # the same bytes written
                assert loaded(readers[0].take()) == loaded(readers[1].take())
        assert loaded(readers[0].take()) == loaded(readers[1].take())
        assert compiled.put_total == python.put_total == 240 and submit.emitted == 120
        assert readers[1].take() == [] and compiled.waiting() == 0
    finally:
        for ring in readers + rings:
            ring.close()


def test_the_submitter_writes_marshal_for_every_plain_value_it_may_meet():
    """The submitter writes marshal's format by hand for the plain values a step holds (and
    hands the rest to PyMarshal): each edge of its int, str, tuple and list encodings, and
    values past them, read back by marshal.loads as they were."""
    _compiled_module()
    ring = Ring.create(1 << 18)
    assert ring.use_compiled(wire.CAPTURED)
    reader = Ring.attach(os.dup(ring.fd))
    statics = {"engine.name": "sglang"}
    submit = _submitter(ring, statics)
    ints = [0, 1, -1, 2**31 - 1, -(2**31), 2**31, -(2**31) - 1, 2**15, 2**30, 2**63 - 1, -(2**63), 2**63, 2**64 + 7,
            -(2**100) - 3, 2**127 - 1, -(2**127 - 1), 2**127, 2**300, 0x4BF92F3577B34DA6A3CE929D0E0E4736]
    texts = ["", "decode", "x" * 255, "y" * 256, "z" * 70_000, "prefill é", "步"]
    values = [
        tuple(ints), tuple(texts), (None, True, False, 0.5, -1e300, float("inf")), [], (), [1, [2, (3, [4])]],
        tuple(range(300)), list(range(300)), (((((((((((1,),),),),),),),),),),), {"a": 1}, frozenset({1}),
    ]
    try:
        for value in values:
            fields = ("decode", value, 7)
            submit(_finish, fields, statics, None, 1_764_000_000_123_456_789, -5, None)
            (record,) = reader.take()
            assert marshal.loads(record) == (wire.CAPTURED, 1_764_000_000_123_456_789, -5, 0, 1, None, None, None, fields)
        assert submit.emitted == len(values)
    finally:
        reader.close()
        ring.close()


def test_the_compiled_producer_refuses_what_it_cannot_carry_and_puts_nothing():
    _compiled_module()
    engine = Ring.create(1 << 12)
    assert engine.use_compiled(wire.CAPTURED)
    exporter = Ring.attach(os.dup(engine.fd))
    try:
        _refuses(engine, exporter)
    finally:
        engine.close()
        exporter.close()
    with pytest.raises(ValueError, match="closed"):  # released with the ring: nothing is written
        engine.producer.put(b"after close")


def _refuses(engine: Ring, exporter: Ring) -> None:
    statics = {"engine.name": "sglang"}
    handed_on: list = []
    submit = _submitter(engine, statics, slow=lambda *args: handed_on.append(args))
    # marshal cannot carry an object(): the submitter hands the step to the Python path, which
    # describes it on the engine thread; so too a step it does not know the finisher or attributes of.
    odd = ("decode", object())
    submit(_finish, odd, statics, None, 1, 2, None)
    submit(len, ("decode",), statics, None, 3, 4, None)
    submit(_finish, ("decode",), {"other": 1}, None, 5, 6, None)
    assert [args[1] for args in handed_on] == [odd, ("decode",), ("decode",)] and submit.emitted == 0
    with pytest.raises(TypeError, match="bytes"):
        engine.put("a str")
    assert exporter.take() == [] and engine.put_total == 0 and exporter.dropped() == 0
    from otel_stepspan.exporter._ringput import Producer

    with pytest.raises(ValueError, match="power of two"):
        Producer(engine.map, 3000, wire.CAPTURED)
    with pytest.raises(ValueError, match="cannot hold"):
        Producer(engine.map, 1 << 13, wire.CAPTURED)


@pytest.mark.parametrize("compiled", [False, True])
def test_the_sink_puts_the_same_records_with_either_producer(compiled):
    """ExporterProcessSink's compiled submitter (the usual step in one call) and its Python
    submit put the same messages: first steps, later ones, an error, a field marshal cannot
    carry (described on the engine thread), a current span in the context."""
    from otel_stepspan.integrations import sglang
    from otel_stepspan.sinks.otel_process import ExporterProcessSink

    if compiled:
        _compiled_module()

    from opentelemetry import context, trace

    empty = context.Context()  # what the engine thread usually has: no current span
    current = trace.set_span_in_context(
        trace.NonRecordingSpan(trace.SpanContext(0xABC, 0xDEF, is_remote=True, trace_flags=trace.TraceFlags(1)))
    )

    def records(use_compiled: bool) -> list:
        sink = ExporterProcessSink()
        ring = Ring.create(1 << 16)
        sink._started = True  # no exporter process: the ring is read here
        sink._attach_ring(ring, compiled=use_compiled)
        assert (type(sink.submit).__name__ == "Submitter") == use_compiled
        reader = Ring.attach(os.dup(ring.fd))
        static = {"engine.name": "sglang"}
        try:
            for i in range(6):
                batch = SimpleNamespace(batch_size=i + 1, extend_seq_lens_cpu=[3] * (i + 1) if i % 2 else None)
                captured = sglang.capture(batch, False, i)
                parent = current if i == 4 else empty if i == 5 else None
                error = RuntimeError("boom") if i == 3 else None
                sink.submit(sglang.finish, captured, static, parent, 100 * i, 100 * i + 50, error)
            unmarshallable = sglang.capture(SimpleNamespace(batch_size=2, extend_seq_lens_cpu=(object(),)), False, 9)
            sink.submit(sglang.finish, unmarshallable, static, None, 900, 950, None)
            assert sink.emitted_total == 7 and ring.put_total == 9  # and the static and finisher records
            # The first step defines the finisher and the attributes, the error and the
            # unmarshallable field take the Python path (the latter after the submitter tried).
            assert sink._emitted == (4 if use_compiled else 7)
            return [marshal.loads(record) for record in reader.take()]
        finally:
            reader.close()
            ring.close()

    got = records(compiled)
    assert got == records(False)
    kinds = [message[0] for message in got]
    assert kinds.count(wire.CAPTURED) == 6 and kinds.count(wire.STEP) == 1
    assert kinds.index(wire.STATIC) < kinds.index(wire.CAPTURED)
    assert [m[5] for m in got if m[0] == wire.CAPTURED] == [None, None, None, None, (0xABC, 0xDEF, 1, True), None]
