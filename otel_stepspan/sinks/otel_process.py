"""The OpenTelemetry sink when the variables configure export: spans made by an exporter process.

The engine thread does the least it can under the engine's GIL: it packs what the integration
read from the batch with ``marshal`` and copies it into a ring in shared memory
(:mod:`otel_stepspan.exporter.ring`); the exporter process describes the step (the
:class:`~otel_stepspan.step.StepInfo`) from it. (An integration whose captured values are not
plain, or whose ``finish`` does not declare ``in_exporter``, is described here first.) No system call, no
thread or process woken: the exporter process reads the ring every 50 ms on its own
schedule. Building span ids and attributes, encoding OTLP, gRPC's threads, retries: all of that
happens there (:mod:`otel_stepspan.exporter`), outside the engine's GIL.

What reached the ring survives the engine: the exporter holds the ring's memory, is detached from
the engine's process tree, and drains the ring once the engine is gone, SIGKILL included. A pipe
between the two carries no steps: its end tells the exporter the engine is gone, and a byte on it
wakes the exporter for a flush. Nothing here ever blocks the engine: a full ring drops the step,
counted.
"""

from __future__ import annotations

import logging
import marshal
import os
import select
import subprocess
import sys
import threading
import time
from typing import Any, Callable, Mapping, Optional

from opentelemetry import trace

from ..exporter import wire
from ..exporter.ring import Ring
from ..span_data import exception_event
from ..step import AttributeValue, StepInfo, unknown_step

logger = logging.getLogger("otel_stepspan")

Finish = Callable[[Any], StepInfo]

#: Bytes of ring per step that ``max_pending`` asks room for: a step without request links packs
#: into about 150 bytes; links add about 60 each.
_BYTES_PER_STEP = 256
_EXPORTER_MODULE = "otel_stepspan.exporter"
_PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_CAPTURED = wire.CAPTURED
_dumps = marshal.dumps


def ring_capacity(max_pending: int) -> int:
    """The ring's size for ``max_pending`` steps: a power of two, 1 MiB at least."""
    return 1 << max(20, (max(1, max_pending) * _BYTES_PER_STEP - 1).bit_length())


def _parent_ids(context: Any) -> Optional[tuple[int, int, int, bool]]:
    """The current span of ``context`` as plain ints, or None when there is none."""
    span_context = trace.get_current_span(context).get_span_context()
    if not span_context.is_valid:
        return None
    return (span_context.trace_id, span_context.span_id, int(span_context.trace_flags), span_context.is_remote)


def _plain(value: Any) -> Any:
    """An attribute value as marshal can carry it (OpenTelemetry's attribute types)."""
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
        #: Bytes of shared memory for steps the exporter has not read yet.
        self.capacity = ring_capacity(max_pending)
        #: Variables the exporter process gets over the engine's own: those that make it export
        #: as a provider does (:mod:`.provider_export`); none when the variables configure it.
        self.environ = dict(environ or {})
        self._reset()
        if hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=self._after_fork_in_child)

    def _reset(self) -> None:
        self.dropped_total = 0  # steps dropped here: the ring was full
        self._emitted = 0  # steps put in the ring by the Python submit
        self.failed_total = 0  # steps lost: could not be packed, or the exporter is gone
        self._pid = os.getpid()
        self._static_ids: dict[int, tuple[int, Mapping[str, AttributeValue]]] = {}
        self._finishers: dict[Finish, int] = {}  # -1: described on the engine thread
        self._lock = threading.Lock()  # the ring has one producer at a time
        self._answers_lock = threading.Lock()
        self._answers = bytearray()
        self._ring: Optional[Ring] = None
        self.__dict__.pop("submit", None)  # the compiled submitter of a ring that is gone
        self._fd: Optional[int] = None  # the pipe's write end: its end tells the exporter we are gone
        self._status_fd: Optional[int] = None
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
        """Record one finished step. Never blocks, never raises.

        Once the ring is made with the compiled producer, the instance's own ``submit`` is its
        compiled submitter (:meth:`_attach_ring`): the usual step goes into the ring in that one
        call, and everything else comes here."""
        if not self._started:
            self._start()
        known = self._static_ids.get(id(static_attributes))
        static_id = known[0] if known is not None else self._define(static_attributes)
        parent_ids = _parent_ids(parent) if parent else None
        exception = exception_event(error) if error is not None else None
        if extra:
            extra = dict(extra)
        payload = None
        if type(captured) is not StepInfo:
            finisher_id = self._finishers.get(finish)
            if finisher_id is None:
                finisher_id = self._define_finisher(finish)
            if finisher_id >= 0:
                # Described in the exporter process: the engine thread only packs what it read.
                try:
                    payload = _dumps(
                        (_CAPTURED, start_ns, end_ns, finisher_id, static_id, parent_ids, exception, extra or None,
                         tuple(captured))
                    )
                except ValueError:  # a value marshal cannot carry: described here, as below
                    pass
        if payload is None:
            try:
                info = captured if type(captured) is StepInfo else finish(captured)
            except Exception:
                info = unknown_step()
            try:
                payload = _dumps(wire.step_message(info, start_ns, end_ns, static_id, parent_ids, exception, extra or None))
            except Exception:  # e.g. a value marshal cannot carry: the step is lost, counted
                self._cannot_pack()
                return
        with self._lock:
            ring = self._ring
            if ring is not None and ring.put(payload):
                self._emitted += 1
                return
        self._not_put()

    def _define_finisher(self, finish: Finish) -> int:
        """A number for ``finish`` when the exporter process may run it (it names itself with
        ``in_exporter``), put in the ring once; -1 when it must run here."""
        where = getattr(finish, "in_exporter", None)
        with self._lock:
            if not isinstance(where, str) or not where.startswith("otel_stepspan.") or self._ring is None:
                self._finishers[finish] = -1
                return -1
            finisher_id = len(self._finishers)
            if not self._ring.put(_dumps((wire.FINISHER, finisher_id, where))):
                return -1  # the ring is full: tried again with the next step
            self._finishers[finish] = finisher_id
            return finisher_id

    def _define(self, attributes: Mapping[str, AttributeValue]) -> int:
        """A number for a runner's static attributes, put in the ring once, before the first
        step that names it. The mapping is kept so its id() is never reused for another one."""
        with self._lock:
            known = self._static_ids.get(id(attributes))
            if known is not None:
                return known[0]
            static_id = len(self._static_ids)
            message = (wire.STATIC, static_id, {str(k): _plain(v) for k, v in attributes.items()})
            if self._ring is not None:
                self._ring.put(_dumps(message))
            # Known only once in the ring: submit's compiled path puts steps naming it unlocked.
            self._static_ids[id(attributes)] = (static_id, attributes)
            return static_id

    def _cannot_pack(self) -> None:
        self.failed_total += 1
        if not self._write_failed:
            self._write_failed = True
            logger.exception(
                "otel_stepspan: could not hand step spans to the exporter process; further "
                "failures are counted in stats()['failed']"
            )

    def _not_put(self) -> None:
        """A step the ring had no room for: the exporter is behind (counted as dropped), or gone
        (counted as failed, and said once)."""
        if self._broken or self._ring is None:
            self.failed_total += 1
        elif self._exporter_alive():
            self.dropped_total += 1
        else:
            self._exporter_gone("the exporter process is gone")
            self.failed_total += 1

    def _exporter_alive(self) -> bool:
        """Whether the exporter still holds its end of the answers pipe: a pipe whose writer
        has gone reports a hang-up, without anything being read from it (answers stay for
        :meth:`_read_answer`). Only asked when the ring is full or a request cannot be put."""
        if self._status_fd is None:
            return False
        try:
            poller = select.poll()
            poller.register(self._status_fd, select.POLLIN)
            return not any(events & (select.POLLHUP | select.POLLERR | select.POLLNVAL) for _, events in poller.poll(0))
        except OSError:
            return False

    def _exporter_gone(self, why: str) -> None:
        if not self._broken:
            self._broken = True
            logger.error("otel_stepspan: %s; step spans of this process are not exported from now on", why)

    def _wake(self) -> None:
        """One byte on the pipe: the exporter reads the ring now rather than at its next poll."""
        try:
            os.write(self._fd, b"!")
        except BlockingIOError:
            pass  # the pipe is full of wake-ups already
        except OSError as exc:
            self._exporter_gone(f"the exporter process is gone ({exc})")

    # -- starting the exporter -----------------------------------------------------------------

    def _start(self) -> None:
        """Make the ring and the pipes and start the exporter process, on the first step.

        The exporter must leave the engine's process tree at once: an engine that kills its whole
        tree (sglang's ``kill_process_tree``, right after a short run) must not catch it on the
        way. So a shell starts it in the background and exits (about a millisecond; the exporter
        is then reparented, away from the tree) rather than a Python interpreter that would need
        a second or so before it could fork away. A thread of ours reaps the shell."""
        with self._lock:
            if self._started:
                return
            self._started = True
            try:
                ring = Ring.create(self.capacity)
            except (OSError, ValueError) as exc:
                self._exporter_gone(f"could not make the shared memory for the exporter process ({exc})")
                return
            try:
                steps_read, steps_write = os.pipe()
                status_read, status_write = os.pipe()
                for fd in (steps_write, status_read):
                    os.set_blocking(fd, False)
                self._fd, self._status_fd = steps_write, status_read
            except OSError as exc:
                ring.close()
                self._exporter_gone(f"could not make the pipe to the exporter process ({exc})")
                return
            try:
                launcher = subprocess.Popen(
                    [
                        "/bin/sh", "-c", '"$@" &', "otel_stepspan-exporter-launcher",
                        sys.executable, "-m", _EXPORTER_MODULE, "--steps-fd", str(steps_read),
                        "--status-fd", str(status_write), "--ring-fd", str(ring.fd),
                        "--engine-pid", str(self._pid),
                    ],
                    pass_fds=(steps_read, status_write, ring.fd),
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    env=exporter_environment({**os.environ, **self.environ}),
                )
            except Exception as exc:
                ring.close()
                self._exporter_gone(f"could not start the exporter process ({type(exc).__name__}: {exc})")
                return
            finally:
                os.close(steps_read)
                os.close(status_write)
            self._attach_ring(ring)
        threading.Thread(target=launcher.wait, name="otel_stepspan-exporter-launcher", daemon=True).start()

    def _attach_ring(self, ring: Ring, compiled: bool = True) -> None:
        """Put steps into ``ring`` from now on; with the compiled producer where it was built
        (and ``compiled``): then the usual step is one call of its submitter, installed as this
        sink's ``submit``, with no Python frame (a paced step's cold cost, see
        ``benchmarks/bench_paced.py``); its other steps go to the Python :meth:`submit`. The
        submitter reads the same dicts of finishers and attributes as the Python path."""
        self._ring = ring
        if compiled and ring.use_compiled(_CAPTURED):
            python_submit = ExporterProcessSink.submit.__get__(self)
            self.submit = ring.producer.submitter(  # type: ignore[method-assign]
                self._finishers, self._static_ids, python_submit, self._not_put, StepInfo, exception_event
            )

    @property
    def emitted_total(self) -> int:
        """Steps put in the ring, by either path."""
        fast = self.__dict__.get("submit")
        return self._emitted + (fast.emitted if fast is not None else 0)

    def _after_fork_in_child(self) -> None:
        # The child must not write into its parent's ring or pipe; it starts its own exporter on
        # its first step. The parent's exporter delivers the parent's steps.
        for fd in (self._fd, self._status_fd):
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass
        if self._ring is not None:
            try:
                self._ring.close()
            except (OSError, ValueError, BufferError):
                pass
        self._reset()

    # -- flushing, stats and exit --------------------------------------------------------------

    def pending(self) -> int:
        """Steps (and the rare record of another kind) in the ring that the exporter has not
        read yet."""
        ring = self._ring
        return ring.waiting() if ring is not None and not self._broken else 0

    def _ask(self, what: str, timeout_s: float) -> Optional[dict]:
        """Put a request after every step recorded so far, wake the exporter, and wait for its
        answer."""
        if not self._started or self._broken or self._ring is None:
            return None
        deadline = time.monotonic() + timeout_s
        with self._answers_lock:
            self._seq += 1
            seq = self._seq
            payload = _dumps((wire.REQUEST, seq, what))
            while True:
                with self._lock:
                    if self._ring.put(payload):
                        break
                if time.monotonic() >= deadline or not self._exporter_alive():
                    return None
                time.sleep(0.005)  # the ring is full: the exporter is making room
            self._wake()
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
            return True
        answer = self._ask("end_timelines" if end_timelines else "flush", timeout_s)
        return bool(answer and answer.get("flushed"))

    def exporter_stats(self, timeout_s: float = 2.0) -> dict[str, int]:
        """The exporter's counters (exported, export_failed, export_queue_full,
        exporter_pending); empty when it has not started or does not answer."""
        answer = self._ask("stats", timeout_s)
        return {k: v for k, v in (answer or {}).items() if k not in ("seq", "flushed")}

    def close(self) -> None:
        """At exit: every step is in the ring already; wake the exporter so that it reads them
        now. It delivers them and leaves by itself once this process is gone (the pipe ends)."""
        if self._started and not self._broken and self._fd is not None:
            self._wake()
