"""The OpenTelemetry sink when the variables configure export: spans made by an exporter process.

The engine thread does the least it can under the engine's GIL: it describes the step (a
:class:`~otel_stepspan.step.StepInfo`), appends one tuple of plain values to a deque, and writes
it to a pipe as a ``marshal`` frame at once, unless it wrote less than a millisecond ago: steps
faster than that go in batches. Building span ids and
attributes, encoding OTLP, gRPC's threads, retries: all of that happens in the exporter process
(:mod:`otel_stepspan.exporter`), outside the engine's GIL. A small thread here only writes what an
engine left in the deque, 2 ms after it left it there, and sleeps otherwise.

What reached the pipe survives the engine: the exporter is detached from the engine's process
tree and delivers until the pipe ends, SIGKILL included. What is still in the deque when the
engine is killed (at most the sub-millisecond steps of its last 2 ms) is lost. Nothing here ever blocks the engine: a full
pipe keeps frames in memory up to a bound, past which steps are dropped and counted.
"""

from __future__ import annotations

import fcntl
import logging
import os
import select
import subprocess
import sys
import threading
import time
from collections import deque
from typing import Any, Callable, Mapping, Optional

from opentelemetry import trace

from ..exporter import wire
from ..span_data import exception_event
from ..step import AttributeValue, StepInfo, unknown_step

logger = logging.getLogger("otel_stepspan")

Finish = Callable[[Any], StepInfo]

_WRITE_EVERY = 256  # steps
# A step ending 1 ms or more after the last write is written at once (1,000 writes a second at
# most: about 0.15% of a core); faster steps are left for the next write, or for the idle writer
# _IDLE_FLUSH_S after the first of them.
_WRITE_GAP_NS = 1_000_000
_IDLE_FLUSH_S = 0.002
_PIPE_SIZE = 1 << 20  # Linux lets a process raise a pipe to 1 MiB
_MAX_UNSENT = 32 << 20  # bytes kept while the pipe is full, before steps are dropped
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
_EXPORTER_MODULE = "otel_stepspan.exporter"
_PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_STEP = wire.STEP
_time_ns = time.time_ns


def _parent_ids(context: Any) -> Optional[tuple[int, int, int, bool]]:
    """The current span of ``context`` as plain ints, or None when there is none."""
    span_context = trace.get_current_span(context).get_span_context()
    if not span_context.is_valid:
        return None
    return (span_context.trace_id, span_context.span_id, int(span_context.trace_flags), span_context.is_remote)


def _plain(value: Any) -> Any:
    """An attribute value as the pipe can carry it (OpenTelemetry's attribute types)."""
    if isinstance(value, (str, bool, int, float)):
        return value
    if isinstance(value, (list, tuple)):
        return [v if isinstance(v, (str, bool, int, float)) else str(v) for v in value]
    return str(value)


def exporter_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """The exporter process's environment: the engine's, so it reads the same ``OTEL_*``
    variables, but with no ``sitecustomize`` directory on ``PYTHONPATH`` (``otel-stepspan run``'s
    or ``opentelemetry-instrument``'s would instrument the exporter's own gRPC and HTTP calls),
    and with this package importable."""
    env = dict(environ)
    entries = [entry for entry in env.get("PYTHONPATH", "").split(os.pathsep) if entry]
    kept = [entry for entry in entries if not os.path.isfile(os.path.join(entry, "sitecustomize.py"))]
    env["PYTHONPATH"] = os.pathsep.join([_PACKAGE_PARENT] + [e for e in kept if e != _PACKAGE_PARENT])
    return env


class ExporterProcessSink:
    """Step records to the exporter process. ``submit`` is thread-safe, O(1) and never blocks."""

    def __init__(self, max_pending: int = 65536, environ: Optional[Mapping[str, str]] = None) -> None:
        self.max_pending = max_pending
        #: Variables the exporter process gets over the engine's own: those that make it export
        #: as a provider does (:mod:`.provider_export`); none when the variables configure it.
        self.environ = dict(environ or {})
        self._reset()
        if hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=self._after_fork_in_child)

    def _reset(self) -> None:
        self.dropped_total = 0  # steps dropped here: the deque or the unsent bytes were full
        self.emitted_total = 0  # steps written to the pipe
        self.failed_total = 0  # steps lost because the exporter could not be started or died
        self._pid = os.getpid()
        self._queue: deque = deque()
        self._waiting = threading.Event()  # steps are waiting for the next write
        self._static_ids: dict[int, tuple[int, Mapping[str, AttributeValue]]] = {}
        self._lock = threading.Lock()
        self._answers_lock = threading.Lock()
        self._answers = bytearray()
        self._unsent = bytearray()
        self._fd: Optional[int] = None
        self._status_fd: Optional[int] = None
        self._last_write_ns = 0
        self._dropped_sent = 0
        self._seq = 0
        self._started = False
        self._broken = False
        self._write_failed = False

    # -- engine thread -------------------------------------------------------------------------

    def submit(
        self,
        finish: Finish,
        captured: Any,
        static_attributes: Mapping[str, AttributeValue],
        parent: Any,
        start_ns: int,
        end_ns: int,
        error: Optional[BaseException],
        extra: Optional[Mapping[str, Any]] = None,
    ) -> None:
        """Record one finished step. Never blocks, never raises."""
        queue = self._queue
        if len(queue) >= self.max_pending:
            self.dropped_total += 1
            return
        try:
            info = captured if type(captured) is StepInfo else finish(captured)
        except Exception:
            info = unknown_step()
        known = self._static_ids.get(id(static_attributes))
        static_id = known[0] if known is not None else self._define(static_attributes)
        queue.append(
            (
                _STEP, start_ns, end_ns, info.mode, info.batch_size, info.extend_tokens, info.decode_seqs,
                info.prefill_seqs, info.num_tokens, info.pass_id, static_id,
                _parent_ids(parent) if parent else None,
                exception_event(error) if error is not None else None,
                dict(extra) if extra else None,
                None if info.links is None else list(map(tuple, info.links)),  # marshal takes plain tuples
                info.queued_requests,
                info.kv_tokens,
            )
        )
        if not self._started:
            self._start()
        # A step goes to the pipe at once unless another write happened less than _WRITE_GAP_NS
        # ago: a write costs about a microsecond, nothing next to an LLM step, and a step in the
        # pipe survives a SIGKILL right after it. Only steps faster than that wait, in batches.
        if end_ns - self._last_write_ns >= _WRITE_GAP_NS or len(queue) >= _WRITE_EVERY:
            self._write()
        elif len(queue) == 1:
            self._waiting.set()  # the first step left behind since the last write

    def _define(self, attributes: Mapping[str, AttributeValue]) -> int:
        """A number for a runner's static attributes, sent to the exporter once. The mapping is
        kept so its id() is never reused for another one."""
        with self._lock:
            known = self._static_ids.get(id(attributes))
            if known is not None:
                return known[0]
            static_id = len(self._static_ids)
            self._static_ids[id(attributes)] = (static_id, attributes)
            self._queue.append((wire.STATIC, static_id, {str(k): _plain(v) for k, v in attributes.items()}))
            return static_id

    def _write(self, wait: bool = False) -> None:
        """Frame what the deque holds and write it to the pipe. Only one thread writes at a time;
        a thread that finds the pipe busy leaves its steps for the next write."""
        if not self._lock.acquire(blocking=wait):
            return
        messages: list = []
        try:
            self._last_write_ns = _time_ns()
            queue = self._queue
            messages = [queue.popleft() for _ in range(len(queue))]
            if self.dropped_total != self._dropped_sent:
                self._dropped_sent = self.dropped_total
                messages.append((wire.DROPPED, self.dropped_total))
            if messages:
                steps = sum(1 for m in messages if m[0] == _STEP)
                if self._broken or len(self._unsent) > _MAX_UNSENT:
                    # No room left: the steps go, what the exporter needs to read later stays.
                    if self._broken:
                        self.failed_total += steps
                    else:
                        self.dropped_total += steps
                    messages = [m for m in messages if m[0] != _STEP]
                    steps = 0
                if messages:
                    self._unsent += wire.frame(messages)
                    self.emitted_total += steps
            self._send_unsent()
        except Exception:  # e.g. a value marshal cannot carry: those steps are lost, counted
            self.failed_total += sum(1 for m in messages if m[0] == _STEP)
            if not self._write_failed:
                self._write_failed = True
                logger.exception(
                    "otel_stepspan: could not hand step spans to the exporter process; further "
                    "failures are counted in stats()['failed']"
                )
        finally:
            self._lock.release()

    def _send_unsent(self) -> None:
        unsent = self._unsent
        while unsent and self._fd is not None and not self._broken:
            try:
                written = os.write(self._fd, unsent)
            except BlockingIOError:
                return  # the pipe is full: the exporter will make room
            except (BrokenPipeError, OSError) as exc:
                self._exporter_gone(f"the exporter process is gone ({exc})")
                return
            del unsent[:written]

    def _exporter_gone(self, why: str) -> None:
        self._broken = True
        lost = len(self._queue)
        self._unsent.clear()
        logger.error("otel_stepspan: %s; step spans of this process are not exported from now on", why)
        self.failed_total += lost

    # -- starting the exporter -----------------------------------------------------------------

    def _start(self) -> None:
        """Make the pipes and start the exporter process, on the first step.

        The exporter must leave the engine's process tree at once: an engine that kills its whole
        tree (sglang's ``kill_process_tree``, right after a short run) must not catch it on the
        way. So a shell starts it in the background and exits (about a millisecond; the exporter
        is then reparented, away from the tree) rather than a Python interpreter that would need
        a second or so before it could fork away. Our thread reaps the shell."""
        with self._lock:
            if self._started:
                return
            self._started = True
            try:
                steps_read, steps_write = os.pipe()
                status_read, status_write = os.pipe()
                for fd in (steps_write, status_read):
                    os.set_blocking(fd, False)
                try:
                    fcntl.fcntl(steps_write, _F_SETPIPE_SZ, _PIPE_SIZE)
                except OSError:
                    pass  # the default size (64 KiB) only makes a full pipe likelier
                self._fd, self._status_fd = steps_write, status_read
            except OSError as exc:
                self._exporter_gone(f"could not make the pipe to the exporter process ({exc})")
                return
            try:
                launcher = subprocess.Popen(
                    [
                        "/bin/sh", "-c", '"$@" &', "otel_stepspan-exporter-launcher",
                        sys.executable, "-m", _EXPORTER_MODULE, "--steps-fd", str(steps_read),
                        "--status-fd", str(status_write), "--engine-pid", str(self._pid),
                    ],
                    pass_fds=(steps_read, status_write),
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    env=exporter_environment({**os.environ, **self.environ}),
                )
            except Exception as exc:
                launcher = None
                self._exporter_gone(f"could not start the exporter process ({type(exc).__name__}: {exc})")
            finally:
                os.close(steps_read)
                os.close(status_write)
        thread = threading.Thread(target=self._run, args=(launcher,), name="otel_stepspan-exporter-pipe", daemon=True)
        thread.start()

    def _run(self, launcher: Optional[subprocess.Popen]) -> None:
        """Reap the launcher; then, each time the engine leaves steps behind, write them
        ``_IDLE_FLUSH_S`` later unless the engine has written them itself meanwhile. Asleep while
        nothing is waiting: no wake-up competes for the engine's GIL."""
        if launcher is not None:
            launcher.wait()
        pid = os.getpid()
        while pid == self._pid and not self._broken:
            self._waiting.wait()
            self._waiting.clear()
            time.sleep(_IDLE_FLUSH_S)
            if self._queue or self._unsent or self.dropped_total != self._dropped_sent:
                self._write()

    def _after_fork_in_child(self) -> None:
        # The child must not write into its parent's pipe; it starts its own exporter on its
        # first step. The parent's exporter delivers the parent's steps.
        for fd in (self._fd, self._status_fd):
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self._reset()

    # -- flushing, stats and exit --------------------------------------------------------------

    def _ask(self, what: str, timeout_s: float) -> Optional[dict]:
        """Send a request after every step recorded so far and wait for the exporter's answer."""
        if not self._started or self._broken:
            return None
        deadline = time.monotonic() + timeout_s
        with self._answers_lock:
            self._seq += 1
            seq = self._seq
            self._queue.append((wire.REQUEST, seq, what))
            self._write(wait=True)
            while self._unsent and not self._broken and time.monotonic() < deadline:
                select.select([], [self._fd], [], min(0.05, max(0.0, deadline - time.monotonic())))
                self._write(wait=True)
            while time.monotonic() < deadline and self._status_fd is not None:
                answer = self._read_answer(seq, deadline)
                if answer is not None:
                    return answer
        return None

    def _read_answer(self, seq: int, deadline: float) -> Optional[dict]:
        ready, _, _ = select.select([self._status_fd], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            return None
        try:
            chunk = os.read(self._status_fd, 1 << 16)
        except BlockingIOError:
            return None
        if not chunk:
            self._status_fd = None  # the exporter is gone
            return None
        answers = self._answers
        answers += chunk
        found = None
        while len(answers) >= wire.HEADER_SIZE:
            length = wire.frame_length(bytes(answers[: wire.HEADER_SIZE]))
            if len(answers) < wire.HEADER_SIZE + length:
                break
            answer = wire.unframe(bytes(answers[wire.HEADER_SIZE : wire.HEADER_SIZE + length]))
            del answers[: wire.HEADER_SIZE + length]
            if isinstance(answer, dict) and answer.get("seq") == seq:
                found = answer
        return found

    def flush(self, timeout_s: float, end_timelines: bool = False) -> bool:
        """Hand every recorded step to the exporter and wait until it has exported them (or
        ``timeout_s`` passed). Spans it could not deliver yet stay queued there, not lost. With
        ``end_timelines``, the exporter ends the open timeline window first."""
        if not self._started:
            return not self._queue
        answer = self._ask("end_timelines" if end_timelines else "flush", timeout_s)
        return bool(answer and answer.get("flushed"))

    def exporter_stats(self, timeout_s: float = 2.0) -> dict[str, int]:
        """The exporter's counters (exported, export_failed, export_queue_full,
        exporter_pending); empty when it has not started or does not answer."""
        answer = self._ask("stats", timeout_s)
        return {k: v for k, v in (answer or {}).items() if k not in ("seq", "flushed")}

    def close(self) -> None:
        """Write what is left and close the pipe: the exporter delivers and exits by itself."""
        if not self._started:
            return
        self._write(wait=True)
        deadline = time.monotonic() + 1.0
        while self._unsent and not self._broken and time.monotonic() < deadline:
            select.select([], [self._fd], [], 0.05)
            self._write(wait=True)
