"""GPU-accurate step times from CUDA events, without ever synchronising the engine thread.

On a GPU, ``forward`` returns once its kernels are queued (or a CUDA graph replayed); with an
overlap scheduler the CPU runs a step or more ahead. A span timed on the CPU then measures launch
time. Here the engine thread records a start and an end event on the current stream around the
forward (microseconds, no waiting) and hands them over; a completer thread polls the end events,
and once one has completed, places the step on the wall clock and passes it on to the OTel sink.

Placing a GPU interval on the wall clock: a *calibration* event is recorded on a side stream of
our own (idle, so it runs at once) and the wall-clock time noted, when the timer is made and
again every 30 s by the completer; a step's start is then ``calibration wall time +
elapsed_time(calibration, start event)``, with the calibration that was current when the step
started, so the offset is never negative. Both events live on the same device clock, so launch
queues and overlap do not skew it.

Everything here talks to events through a tiny interface (``record``, ``query``,
``elapsed_time``, ``synchronize``), so the logic is tested on the CPU with events that follow
CUDA's semantics.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from typing import Any, Callable, Optional, Protocol

logger = logging.getLogger("otel_stepspan")

_POLL_S = 0.001
_RECALIBRATE_S = 30.0
_SCAN_PAST_RUNNING = 8


class Event(Protocol):
    def record(self, stream: Any = None) -> None: ...

    def query(self) -> bool: ...

    def elapsed_time(self, end_event: "Event") -> float: ...

    def synchronize(self) -> None: ...


#: Called with (payload, start_ns, end_ns, extra attributes) once a step's time is known.
Emit = Callable[[Any, int, int, dict], None]


class GpuStepTimer:
    """Start/stop on the engine thread; completion, placement and emission on a background one."""

    def __init__(
        self,
        new_event: Callable[[], Event],
        emit: Emit,
        *,
        max_in_flight: int = 1024,
        side_stream: Any = None,
        clock: Callable[[], int] = time.time_ns,
    ) -> None:
        self._new_event = new_event
        self._emit = emit
        self.max_in_flight = max_in_flight
        self._side_stream = side_stream
        self._clock = clock
        self._free: deque = deque()
        self._pending: deque = deque()
        # Written by one thread each, so no lock is needed on the engine's side.
        self._started = 0  # engine thread
        self._cancelled = 0  # engine thread
        self._finished = 0  # completer (under the lock)
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._calibration: tuple[Event, int] = self._calibrate()
        self._calibrated_at = time.monotonic()
        self.fallbacks = 0  # steps timed on the CPU because too many were in flight
        self.timed_out = 0  # steps whose events had not completed by a flush deadline
        self.completed = 0

    # -- engine thread -------------------------------------------------------------------------

    def start(self) -> Optional[tuple[Event, Event, tuple[Event, int]]]:
        """Record the start event on the current stream, or return None (CPU timing) when the
        backlog is full. Never waits."""
        if self._started - self._cancelled - self._finished >= self.max_in_flight:
            self.fallbacks += 1
            return None
        free = self._free
        start = free.popleft() if free else self._new_event()
        end = free.popleft() if free else self._new_event()
        start.record()
        self._started += 1
        return start, end, self._calibration

    def stop(self, events: tuple, payload: Any, cpu_start_ns: int, cpu_end_ns: int) -> None:
        """Record the end event and queue the step for completion."""
        events[1].record()
        self._pending.append((events[0], events[1], events[2], payload, cpu_start_ns, cpu_end_ns))
        if self._thread is None:
            self._start_thread()

    def cancel(self, events: tuple) -> None:
        """Give back events whose step will not be timed (the forward failed before its end)."""
        self._cancelled += 1
        self._free.extend(events[:2])

    # -- completer thread ----------------------------------------------------------------------

    def _start_thread(self) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="otel_stepspan-gpu-timing", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while True:
            self._wake.wait(_POLL_S)
            self._wake.clear()
            try:
                self.poll()
            except Exception:
                logger.exception("otel_stepspan: GPU step timing failed; steps keep CPU timing")

    def _calibrate(self) -> tuple[Event, int]:
        """A calibration event on the idle side stream and the wall-clock time it ran at."""
        event = self._new_event()
        wall = self._clock()
        event.record(self._side_stream)
        event.synchronize()  # the side stream is idle: this waits microseconds
        return event, wall

    def _recalibrate_if_due(self) -> None:
        # Clocks drift apart slowly; steps already started keep the calibration they took.
        now = time.monotonic()
        if now - self._calibrated_at > _RECALIBRATE_S:
            self._calibration = self._calibrate()
            self._calibrated_at = now

    def poll(self) -> int:
        """Emit the pending steps whose end event has completed, in any order. Returns how many.

        Steps complete mostly in launch order, so the scan stops after a few steps still running:
        with a backlog of a thousand steps (a GPU far behind the CPU), asking every event each
        millisecond would hold the engine's GIL for a millisecond or more of every one. Those
        passed over stay in place, in order."""
        done = 0
        pending = self._pending
        running: list = []
        with self._lock:
            while pending and len(running) < _SCAN_PAST_RUNNING:
                item = pending.popleft()
                start, end, (calibration, calibration_wall), payload, cpu_start, cpu_end = item
                if not end.query():
                    running.append(item)
                    continue
                gpu_ms = start.elapsed_time(end)
                offset_ms = calibration.elapsed_time(start)
                start_ns = calibration_wall + int(offset_ms * 1e6)
                end_ns = start_ns + int(gpu_ms * 1e6)
                extra = {"forward.gpu_time_ms": gpu_ms, "forward.cpu_time_ms": (cpu_end - cpu_start) / 1e6}
                self._finished += 1
                self._free.extend((start, end))
                self.completed += 1
                done += 1
                self._emit(payload, start_ns, end_ns, extra)
            pending.extendleft(reversed(running))  # the engine thread only appends on the right
            self._recalibrate_if_due()
        return done

    def drain(self, timeout_s: float) -> bool:
        """Wait for pending steps; steps still running at the deadline are emitted with their CPU
        times (and counted in ``timed_out``) so that no span is lost at shutdown."""
        deadline = time.monotonic() + timeout_s
        while self._pending and time.monotonic() < deadline:
            self.poll()
            if self._pending:
                time.sleep(_POLL_S)
        with self._lock:
            late = []
            while self._pending:
                late.append(self._pending.popleft())
            for _start, _end, _calibration, payload, cpu_start, cpu_end in late:
                self._finished += 1
                self.timed_out += 1
                self._emit(payload, cpu_start, cpu_end, {"forward.cpu_time_ms": (cpu_end - cpu_start) / 1e6})
        return not late


def cuda_timer(emit: Emit, max_in_flight: int = 1024) -> Optional[GpuStepTimer]:
    """A timer on the current CUDA device, or None when CUDA is not available."""
    import torch

    if not torch.cuda.is_available():
        return None
    side_stream = torch.cuda.Stream()
    return GpuStepTimer(
        lambda: torch.cuda.Event(enable_timing=True), emit, max_in_flight=max_in_flight, side_stream=side_stream
    )
