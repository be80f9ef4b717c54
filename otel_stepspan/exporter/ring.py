"""A byte ring in shared memory: how step records reach the exporter process without a system call.

A pipe write costs the engine thread a system call and, when the exporter sleeps on the pipe,
the wake-up of a process on another CPU: 6-14 us per paced step on the machines measured
(``benchmarks/bench_paced.py``), several times the rest of the step's own cost. Here the engine
copies each record into a ``memfd`` mapped by both processes and moves a counter; the exporter
polls the counter every 50 ms (as Perfetto's producers and LTTng's ring buffers leave
their consumer to read on its own schedule), so nothing the engine does wakes anybody.

Layout: a 4 KiB header, then ``capacity`` bytes (a power of two) used as a circle. A record is
the payload's length (8 bytes, little-endian: the length, and its bitwise complement as a check)
and the payload, split across the end of the circle when it must be. Four counters, each on its own cache line so that the two processes do not write the same
line:

- ``written`` (offset 0): bytes ever written; only the engine moves it, after the record's bytes;
- ``read`` (offset 64): bytes ever read; only the exporter moves it, after it copied them out;
- ``dropped`` (offset 128): records the engine could not put because the ring was full;
- ``taken`` (offset 192): records the exporter has taken, so the engine can tell how many wait.

The counters only grow (64 bits do not wrap), so "empty" is ``written == read`` and the room is
``capacity - (written - read)``. One producer: :class:`~otel_stepspan.sinks.otel_process.ExporterProcessSink`
holds a lock around :meth:`Ring.put`.

The reader must see a record's bytes before the counter that covers them. On x86 stores reach
other CPUs in program order, so nothing is needed. Elsewhere (ARM) :meth:`Ring.put` releases and
takes back a lock of its own between the bytes and the counter: a store-release then a
load-acquire, which orders every store before it ahead of every store after it. (A checksum of
each record would do too, but zlib's CRC-32 costs several microseconds when its tables are cold,
as they are at every paced step.) The reader still checks each length against its complement and
the counter, and reads a record that does not add up again on its next poll (:meth:`Ring.take`).
"""

from __future__ import annotations

import mmap
import os
import platform
import struct
import threading

HEADER = 4096
# The counters' indexes among the header's 64-bit words (byte offsets 0, 64, 128, 192). They are
# native-endian: both ends run on the same machine.
_WRITTEN, _READ, _DROPPED, _TAKEN = 0, 8, 16, 24
_prefix = struct.Struct("<II")  # length, and its complement
PREFIX = _prefix.size
_MASK = 0xFFFFFFFF
#: CPUs whose stores other CPUs see in program order (total store order).
_ORDERED_STORES = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686", "x86")
#: 16 MiB: tens of thousands of steps, seconds of the largest batches' links, while the exporter
#: reads every 50 ms. Pages are only used once written.
DEFAULT_CAPACITY = 16 << 20


class Ring:
    """One end of the ring: the engine's (:meth:`create`) or the exporter's (:meth:`attach`)."""

    def __init__(self, fd: int, capacity: int) -> None:
        if capacity <= 0 or capacity & (capacity - 1):
            raise ValueError(f"the ring's capacity must be a power of two, not {capacity}")
        self.fd = fd
        self.capacity = capacity
        self.map = mmap.mmap(fd, HEADER + capacity)
        self._data = memoryview(self.map)[HEADER:]
        self._counters = memoryview(self.map)[:HEADER].cast("Q")
        self._written = self._counters[_WRITTEN]
        self._read = self._counters[_READ]
        self._room = capacity - (self._written - self._read)
        self.unsettled = 0
        self._puts = 0  # records this end's Ring.put has put
        self._fence = None if _ORDERED_STORES else threading.Lock()
        if self._fence is not None:
            self._fence.acquire()  # held but while put() passes the bytes before the counter
        #: The compiled producer (``_ringput.c``) where it was built: see :meth:`use_compiled`.
        self.producer = None

    @classmethod
    def create(cls, capacity: int = DEFAULT_CAPACITY) -> "Ring":
        """A new ring in a ``memfd`` (zeroed), for the engine; its fd is passed to the exporter."""
        fd = os.memfd_create("otel_stepspan-steps", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, HEADER + capacity)
            return cls(fd, capacity)
        except BaseException:
            os.close(fd)
            raise

    @classmethod
    def attach(cls, fd: int) -> "Ring":
        """The exporter's end of the ring the engine created: its size says the capacity."""
        return cls(fd, os.fstat(fd).st_size - HEADER)

    def use_compiled(self, captured_tag: int) -> bool:
        """Put records with the compiled producer (``_ringput.c``) from now on, when it was
        built; False when it was not (this class's :meth:`put` goes on). The engine's end only.

        A paced step runs with cold caches, where each Python-level operation costs about a
        microsecond (``benchmarks/bench_paced.py``); the compiled put is one call, and
        ``producer.submitter`` (the sink's ``submit`` for the usual step) packs a step's
        ``wire.CAPTURED`` message in the same call.
        Its puts never interleave (each holds the GIL throughout), so they need no lock, and it
        orders the counter after the bytes on every CPU."""
        try:
            from . import _ringput
        except ImportError:
            return False
        self.producer = _ringput.Producer(self.map, self.capacity, captured_tag)
        self.put = self.producer.put  # type: ignore[method-assign]
        return True

    @property
    def put_total(self) -> int:
        """Records this end has put."""
        return self.producer.put_total if self.producer is not None else self._puts

    def close(self) -> None:
        """Unmap and close this process's end; the other end keeps the memory."""
        try:
            if self.producer is not None:
                self.producer.release()
            self._data.release()
            self._counters.release()
            self.map.close()
        finally:
            os.close(self.fd)

    # -- the engine's end ----------------------------------------------------------------------

    def put(self, payload: bytes) -> bool:
        """Copy one record in; False (and counted in ``dropped``) when there is no room for it.
        The caller holds the only producer's lock."""
        size = len(payload)
        need = size + PREFIX
        if need > self._room:
            self._room = self.capacity - (self._written - self._counters[_READ])
            if need > self._room:
                self._counters[_DROPPED] += 1
                return False
        written = self._written
        capacity = self.capacity
        data = self._data
        at = written & (capacity - 1)
        if at + need <= capacity:
            _prefix.pack_into(data, at, size, size ^ _MASK)
            data[at + PREFIX : at + need] = payload
        else:
            self._copy_in(at, _prefix.pack(size, size ^ _MASK) + payload)
        fence = self._fence
        if fence is not None:  # see the module's docstring: a store-release, then a load-acquire
            fence.release()
            fence.acquire()
        self._written = written + need
        self._room -= need
        self._puts += 1
        self._counters[_WRITTEN] = written + need
        return True

    def _copy_in(self, at: int, record: bytes) -> None:
        first = self.capacity - at
        self._data[at:] = record[:first]
        self._data[: len(record) - first] = record[first:]

    # -- the exporter's end --------------------------------------------------------------------

    def take(self) -> list[bytes]:
        """Every whole record written since the last call, oldest first; the room they held is
        given back to the engine. A record whose length does not match its check or does not fit
        under the counter stays for the next call; :attr:`unsettled` counts the calls it has
        waited, so that a reader can tell a stream that will never add up."""
        written = self._counters[_WRITTEN]
        read = self._read
        records: list[bytes] = []
        while written - read >= PREFIX:
            size, check = _prefix.unpack(self._copy_out(read, PREFIX))
            if check != size ^ _MASK or size + PREFIX > written - read:
                self.unsettled += 1
                break
            self.unsettled = 0
            records.append(self._copy_out(read + PREFIX, size))
            read += size + PREFIX
        if read != self._read:
            self._read = read
            self._counters[_TAKEN] += len(records)
            self._counters[_READ] = read
        return records

    def _copy_out(self, position: int, size: int) -> bytes:
        at = position & (self.capacity - 1)
        end = at + size
        if end <= self.capacity:
            return bytes(self._data[at:end])
        return bytes(self._data[at:]) + bytes(self._data[: end - self.capacity])

    def dropped(self) -> int:
        """Records the engine could not put, so far."""
        return self._counters[_DROPPED]

    def waiting(self) -> int:
        """Records this end put that the exporter has not taken yet (the engine's end)."""
        return self.put_total - self._counters[_TAKEN]
