"""The exporter process: step records in through shared memory, OTLP spans out, outside the engine's GIL.

An engine's scheduler loop is Python, and every microsecond another thread of the engine process
holds the GIL is a microsecond the loop may wait once the GPU is done. So the engine process only
copies a record per step into a ring in shared memory (:mod:`otel_stepspan.exporter.ring`); this
process, one per engine process, reads the ring every 50 ms, turns the records into
spans, encodes them and exports them. Nothing the engine does wakes it, except a flush.

It is detached from the engine's process tree (see :mod:`otel_stepspan.exporter.__main__`), so an
engine that SIGKILLs its whole tree at shutdown (sglang's ``kill_process_tree``) does not take
the exporter with it: what reached the ring is delivered. It exits once its engine is gone (end
of the pipe, or the engine's pid no longer running) and everything is delivered, or after
``OTEL_STEPSPAN_EXPORTER_LINGER`` seconds (default 30) of trying.

Batching honours the batch span processor's variables: ``OTEL_BSP_SCHEDULE_DELAY`` (ms),
``OTEL_BSP_MAX_EXPORT_BATCH_SIZE``, ``OTEL_BSP_MAX_QUEUE_SIZE``. A failed export that may work
later (Collector down, busy, restarting) is kept and retried with back-off; only when the queue is
full are new spans refused. An export the Collector refuses (wrong token, bad request) is dropped.
Every loss is counted and reported in one line per interval on the engine's stderr.
"""

from __future__ import annotations

import importlib
import os
import random
import select
import signal
import sys
import threading
import time
from collections import deque
from typing import Any, Mapping, Optional

from . import encode, wire
from .ring import Ring
from .spans import RequestSpan, RootSpan, SpanBuilder
from ..settings import ExportConfigError
from ..step import unknown_step
from .transport import Sent, sender_from_environment

_REPORT_INTERVAL_S = 10.0
_MAX_BACKOFF_S = 5.0
#: The spans of one export request at most, in bytes: under the 4 MiB a Collector's OTLP gRPC
#: receiver takes by default (``max_recv_msg_size_mib``), with room for the resource and framing.
MAX_REQUEST_BYTES = 3 << 20
_PID_CHECK_S = 1.0
#: How often the ring is read while steps come: what a step waits in shared memory (delivery is
#: not hurried: a flush wakes this process at once), and 20 wake-ups a second of this process,
#: none of the engine's. Each wake-up here costs the engine too, on a machine whose CPUs share
#: caches: polling every 5 ms added 8-15 us to each paced 1 ms step on the benchmark's machine
#: against 50 ms (benchmarks/bench_paced.py), and the ring holds seconds of steps.
_POLL_S = 0.05
#: ... and after a second without any: an idle engine's exporter wakes 4 times a second.
_IDLE_POLL_S = 0.25
#: Polls a record may stay unsettled (its length not matching its check) before the ring is
#: taken for corrupt: stores seen out of order settle within the next poll.
_MAX_UNSETTLED = 500


def _int_env(environ: Mapping[str, str], key: str, default: int) -> int:
    raw = environ.get(key, "").strip()
    try:
        value = int(raw) if raw else default
    except ValueError:
        _say(f"{key}={raw!r} is not an integer; using {default}")
        return default
    return value if value > 0 else default


def _say(message: str) -> None:
    try:
        sys.stderr.write(f"otel_stepspan: {message}\n")
        sys.stderr.flush()
    except Exception:
        pass


def engine_alive(pid: int) -> bool:
    """False once ``pid`` has exited (a zombie waiting for its parent counts as exited)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            state = handle.read().rsplit(b")", 1)[1].split()[0]
        return state not in (b"Z", b"X")
    except FileNotFoundError:
        return False
    except (OSError, IndexError):
        try:
            os.kill(pid, 0)
            return True
        except ProcessLookupError:
            return False
        except OSError:
            return True


def finisher(where: str) -> Any:
    """The function ``module:name`` of this package that describes an integration's captured
    fields (wire.FINISHER); one that cannot be found describes every step as unknown, said once."""
    module_name, _, name = where.partition(":")
    try:
        if not module_name.startswith("otel_stepspan."):
            raise ImportError("not a module of otel_stepspan")
        return getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as exc:
        _say(f"cannot describe steps with {where} ({exc}); they are labelled unknown")
        return lambda fields: unknown_step()


def take_batch(queue: deque, max_spans: int, max_bytes: int = MAX_REQUEST_BYTES) -> list:
    """Up to ``max_spans`` encoded spans from the head of ``queue``, and at most ``max_bytes``
    of them (a lone larger span goes alone). Step spans that link whole batches weigh tens of
    KB each: 512 of them in one request would pass the Collector's 4 MiB limit on a gRPC
    message and be refused whole."""
    batch: list = []
    size = 0
    while queue and len(batch) < max_spans:
        weight = len(queue[0])
        if batch and size + weight > max_bytes:
            break
        batch.append(queue.popleft())
        size += weight
    return batch


class Exporter:
    """Reads the step ring on one thread, exports on another (the main one)."""

    def __init__(
        self, steps_fd: int, status_fd: int, engine_pid: int, environ: Mapping[str, str], ring: Optional[Ring] = None
    ) -> None:
        self.steps_fd = steps_fd
        self.ring = ring
        self.status_fd = status_fd
        self.engine_pid = engine_pid
        self.sender = sender_from_environment(environ)
        self.builder = SpanBuilder(environ, engine_pid)
        self.batch_size = _int_env(environ, "OTEL_BSP_MAX_EXPORT_BATCH_SIZE", 512)
        self.max_queue = max(_int_env(environ, "OTEL_BSP_MAX_QUEUE_SIZE", 2048), self.batch_size)
        self.delay_s = _int_env(environ, "OTEL_BSP_SCHEDULE_DELAY", 5000) / 1000.0
        self.linger_s = float(_int_env(environ, "OTEL_STEPSPAN_EXPORTER_LINGER", 30))
        self.queue: deque = deque()
        self.cond = threading.Condition()
        self.input_done = False
        self.flush_requests: list[tuple[int, int]] = []  # (seq, spans failed when asked)
        # What became of the step spans (timeline roots are counted apart).
        self.exported = 0
        self.failed = 0
        self.queue_full = 0
        self.engine_dropped = 0
        self.timelines_exported = 0
        self.requests_exported = 0
        self._reported = (0, 0, 0)
        self._finishers: dict[int, Any] = {}
        self._finish_failed_said = False
        self._last_report = time.monotonic()
        self._refusal_said = False

    # -- the reading thread --------------------------------------------------------------------

    def read_forever(self) -> None:
        try:
            self._read()
        except Exception as exc:  # a corrupt stream: stop reading, deliver what we have
            _say(f"exporter stopped reading step records: {type(exc).__name__}: {exc}")
        with self.cond:
            self.input_done = True
            self.cond.notify_all()

    def _read(self) -> None:
        """Read the ring every ``_POLL_S`` (``_IDLE_POLL_S`` once the engine is idle), at once
        when the engine writes to the pipe (a flush), and a last time when it is gone."""
        fd = self.steps_fd
        last_step = last_pid_check = time.monotonic()
        while True:
            timeout = _POLL_S if time.monotonic() - last_step < 1.0 else _IDLE_POLL_S
            ready, _, _ = select.select([fd], [], [], timeout)
            gone = False
            if ready:
                try:
                    gone = not os.read(fd, 1 << 12)
                except BlockingIOError:
                    pass
            now = time.monotonic()
            if not gone and now - last_pid_check >= _PID_CHECK_S:
                last_pid_check = now
                gone = not engine_alive(self.engine_pid)
            if self._take():
                last_step = now
            if gone:
                self._take()  # what the engine put right before it went
                return

    def _take(self) -> bool:
        """Handle every record the ring holds; False when it held none."""
        ring = self.ring
        if ring is None:
            return False
        records = ring.take()
        self.engine_dropped = max(self.engine_dropped, ring.dropped())
        if ring.unsettled > _MAX_UNSETTLED:
            raise ValueError("a record in the step ring never matched its length check: the ring is corrupt")
        if not records:
            return False
        unframe = wire.unframe
        self._handle([unframe(record) for record in records])
        return True

    def _handle(self, messages: list) -> None:
        built = []
        builder = self.builder
        for message in messages:
            kind = message[0]
            if kind == wire.STEP:
                built += builder.build(message)
            elif kind == wire.CAPTURED:
                built += builder.build(self._described(message))
            elif kind == wire.FINISHER:
                self._finishers[message[1]] = finisher(message[2])
            elif kind == wire.STATIC:
                builder.add_static(message[1], message[2])
            elif kind == wire.DROPPED:
                self.engine_dropped = max(self.engine_dropped, message[1])
            elif kind == wire.REQUEST:
                self._request(message[1], message[2], built)
        self._enqueue(built)

    def _described(self, message: tuple) -> tuple:
        """The ``STEP`` message of a ``CAPTURED`` one: its fields described by the integration's
        finisher, as the engine thread would have (a step it cannot describe is labelled
        unknown, never lost)."""
        _, start_ns, end_ns, finisher_id, static_id, parent, exception, extra, fields = message
        try:
            info = self._finishers[finisher_id](fields)
        except Exception as exc:
            if not self._finish_failed_said:
                self._finish_failed_said = True
                _say(f"could not describe a step ({type(exc).__name__}: {exc}); it is labelled unknown")
            info = unknown_step()
        return wire.step_message(info, start_ns, end_ns, static_id, parent, exception, extra)

    def _enqueue(self, spans: list) -> None:
        """Queue encoded spans for export. Step spans beyond OTEL_BSP_MAX_QUEUE_SIZE are refused
        and counted; a timeline root (one per window) or a request's report is always taken, so
        that no window's steps are left without it and no request without its report."""
        if not spans:
            return
        with self.cond:
            room = self.max_queue - len(self.queue)
            for span in spans:
                if isinstance(span, RootSpan):
                    self.queue.append(span)
                elif room > 0:
                    self.queue.append(span)
                    room -= 1
                else:
                    self.queue_full += 1
            if len(self.queue) >= self.batch_size:
                self.cond.notify_all()

    def _request(self, seq: int, what: str, built_so_far: list) -> None:
        self._enqueue(built_so_far)
        built_so_far.clear()
        if what == "end_timelines":
            self._enqueue(self.builder.close_all())
        if what in ("flush", "end_timelines"):
            with self.cond:
                self.flush_requests.append((seq, self.failed))
                self.cond.notify_all()
        else:
            self._answer(seq, True)

    def _answer(self, seq: int, flushed: bool) -> None:
        counters = {
            "seq": seq,
            "flushed": flushed,
            "exported": self.exported,
            "export_failed": self.failed,
            "export_queue_full": self.queue_full,
            "exporter_pending": sum(1 for span in self.queue if not isinstance(span, RootSpan)),
            "not_sampled": self.builder.not_sampled,
            "timelines_exported": self.timelines_exported,
            "requests_exported": self.requests_exported,
            "exporter_cpu_ns": time.process_time_ns(),
        }
        try:
            os.write(self.status_fd, wire.frame(counters))
        except (BlockingIOError, BrokenPipeError, OSError):
            pass  # nobody reads, or the engine is gone: an answer is never worth blocking for

    # -- the exporting thread ------------------------------------------------------------------

    def export_until_done(self) -> None:
        last_export = time.monotonic()
        attempt = 0
        linger_until: Optional[float] = None
        while True:
            with self.cond:
                while True:
                    now = time.monotonic()
                    due = (
                        len(self.queue) >= self.batch_size
                        or (self.queue and now - last_export >= self.delay_s)
                        or self.flush_requests
                        or self.input_done
                    )
                    if due:
                        break
                    self.cond.wait(max(0.01, self.delay_s - (now - last_export)) if self.queue else 1.0)
                closing = self.input_done and linger_until is None
                if closing:
                    linger_until = time.monotonic() + self.linger_s
            # Timeline windows whose time is up, or every open one once the engine is gone.
            self._enqueue(self.builder.close_all() if closing else self.builder.close_due(time.time_ns()))
            with self.cond:
                batch = take_batch(self.queue, self.batch_size)
            self._report_if_due()
            if not batch:
                self._answer_flushes()
                if self.input_done:
                    return
                last_export = time.monotonic()
                continue
            sent = self.sender.send(encode.export_request(self.builder.resource, self.builder.scope, batch))
            last_export = time.monotonic()
            roots = sum(1 for span in batch if type(span) is RootSpan)
            reports = sum(1 for span in batch if type(span) is RequestSpan)
            if sent.ok:
                attempt = 0
                self.exported += len(batch) - roots - reports - sent.rejected
                self.timelines_exported += roots
                self.requests_exported += reports
                self.failed += sent.rejected
                if not self.queue:
                    self._answer_flushes()
                continue
            if not sent.retryable:
                self.failed += len(batch) - roots
                self._say_refusal(sent)
                if not self.queue:
                    self._answer_flushes()
                continue
            # The Collector may come back: keep the batch at the head and wait a while.
            with self.cond:
                self.queue.extendleft(reversed(batch))
            if linger_until is not None and time.monotonic() >= linger_until:
                self._give_up(sent)
                return
            self._answer_flushes(cannot_now=True)
            if sent.retry_after_s is not None:
                delay = min(sent.retry_after_s, _MAX_BACKOFF_S)
            else:
                delay = min(_MAX_BACKOFF_S, 0.1 * 2 ** min(attempt, 16)) * random.uniform(0.8, 1.2)
            attempt += 1
            self._back_off(delay)

    def _back_off(self, delay_s: float) -> None:
        """Wait ``delay_s`` before trying the Collector again. New spans arriving do not cut it
        short (they would make a busy loop of retries); the engine going away does, and a flush
        asked for meanwhile is answered at once: the Collector cannot take anything now."""
        deadline = time.monotonic() + delay_s
        # Once the engine is gone, the lingering retries wait their whole back-off too.
        gone_already = self.input_done
        with self.cond:
            while gone_already or not self.input_done:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self.cond.wait(remaining)
                if self.flush_requests:
                    requests, self.flush_requests = self.flush_requests, []
                    for seq, _ in requests:
                        self._answer(seq, False)

    def _answer_flushes(self, cannot_now: bool = False) -> None:
        """Answer the flush requests: once every span received before them has been tried (the
        queue is empty), flushed if none of them failed; or, when the Collector cannot be reached
        now (``cannot_now``), not flushed: the engine's flush() is waiting, and the spans stay
        queued here."""
        with self.cond:
            requests, self.flush_requests = self.flush_requests, []
        for seq, failed_before in requests:
            self._answer(seq, not cannot_now and self.failed == failed_before)

    def _say_refusal(self, sent: Sent) -> None:
        if not self._refusal_said:
            self._refusal_said = True
            _say(
                f"the collector at {self.sender.endpoint} refused step spans ({sent.reason}); "
                "further refusals are counted and reported with the losses"
            )

    def _give_up(self, sent: Sent) -> None:
        with self.cond:
            left = sum(1 for span in self.queue if not isinstance(span, RootSpan))
            self.queue.clear()
        self.failed += left
        _say(
            f"the engine has exited and {left} step spans could not be delivered to "
            f"{self.sender.endpoint} within {self.linger_s:.0f} s ({sent.reason})"
        )

    def _report_if_due(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_report < _REPORT_INTERVAL_S:
            return
        self._last_report = now
        totals = (self.engine_dropped, self.queue_full, self.failed)
        dropped, queue_full, failed = (t - r for t, r in zip(totals, self._reported))
        lost = dropped + queue_full + failed
        if not lost:
            return
        self._reported = totals
        _say(
            f"lost {lost} step spans since the last report: {dropped} dropped before export (the engine's "
            f"step buffer was full), {queue_full} dropped by the full export queue "
            f"(OTEL_BSP_MAX_QUEUE_SIZE={self.max_queue}), {failed} failed to export (is the collector at "
            f"{self.sender.endpoint} up?); totals {totals[0]} / {totals[1]} / {totals[2]}"
        )

    def run(self) -> int:
        reader = threading.Thread(target=self.read_forever, name="otel_stepspan-exporter-read", daemon=True)
        reader.start()
        try:
            self.export_until_done()
        finally:
            self._report_if_due(force=True)
            try:
                self.sender.close()
            except Exception:
                pass
        return 0


def _stop_on_sigterm(exporter: Exporter) -> None:
    """SIGTERM (a supervisor stopping everything): stop reading, and deliver what we have within
    a few seconds. The handler only sets flags: the exporting loop wakes at least once a second."""

    def on_sigterm(signum: int, frame: Any) -> None:
        exporter.linger_s = min(exporter.linger_s, 5.0)
        exporter.input_done = True

    signal.signal(signal.SIGTERM, on_sigterm)


def main(
    steps_fd: int, status_fd: int, ring_fd: int, engine_pid: int, environ: Optional[Mapping[str, str]] = None
) -> int:
    env = os.environ if environ is None else environ
    os.set_blocking(status_fd, False)
    try:
        exporter = Exporter(steps_fd, status_fd, engine_pid, env, Ring.attach(ring_fd))
    except ExportConfigError as exc:
        _say(f"OpenTelemetry export is off: {exc}")
        return 2
    for problem in exporter.builder.problems:
        _say(problem)
    _stop_on_sigterm(exporter)
    return exporter.run()
