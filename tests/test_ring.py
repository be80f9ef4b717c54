"""The shared-memory ring between the engine and its exporter process (otel_stepspan/exporter/ring.py)."""

from __future__ import annotations

import os
import struct

import pytest

from otel_stepspan.exporter.ring import HEADER, PREFIX, Ring


@pytest.fixture
def pair():
    """The engine's end of a 4 KiB ring and the exporter's, closed after the test."""
    engine = Ring.create(1 << 12)
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
