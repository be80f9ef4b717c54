"""What the engine process tells its exporter process, and how the exporter answers.

Pure and tiny: both sides import it. Each message is one ``marshal`` payload in the step ring
(:mod:`otel_stepspan.exporter.ring`); the same interpreter runs both sides (the exporter is
started with ``sys.executable``). ``marshal`` is one C call per step, which is why every message
is made of plain ints, strings, ``None``, tuples and dicts only. The exporter's answers go back
on a pipe as frames: a 4-byte little-endian length and a ``marshal`` payload.

Messages, each a tuple whose first item says what it is:

- ``(STEP, start_ns, end_ns, mode, batch_size, extend_tokens, decode_seqs, prefill_seqs,
  num_tokens, pass_id, static_id, parent, exception, extra, links, queued_requests,
  kv_tokens)``: one finished step. Counts are ints or None (unknown); ``parent`` is None or
  ``(trace_id, span_id, trace_flags, is_remote)``; ``exception`` None or the exception event's
  attributes; ``extra`` None or more attributes; ``links`` None (requests not traced) or a list
  of :class:`otel_stepspan.step.RequestLink` fields as plain tuples. The layout of
  :class:`otel_stepspan.span_data.StepRecord`, which reads it as it is.
- ``(CAPTURED, start_ns, end_ns, finisher_id, static_id, parent, exception, extra, fields)``:
  one finished step not yet described: ``fields`` is what the integration's capture read from
  the batch, as a plain tuple, and the exporter describes it with the finisher named by
  ``finisher_id``; then it is a ``STEP`` like any other (:func:`step_message`). The engine thread
  saves the description's cost this way.
- ``(FINISHER, finisher_id, "module:function")``: a function of this package that turns
  ``fields`` into a :class:`otel_stepspan.step.StepInfo` (an integration's ``finish``, declared
  with ``in_exporter``), sent once, before the first step that names it.
- ``(STATIC, static_id, attributes)``: attributes shared by many steps (a runner's
  ``engine.*``), sent once, before the first step that names them.
- ``(DROPPED, total)``: no longer sent (the ring's header counts the steps it had no room for);
  still understood.
- ``(REQUEST, seq, what)``: ``"flush"`` (export everything received so far now),
  ``"end_timelines"`` (the same, after ending the open timeline window) or ``"stats"``; answered
  on the status pipe with one frame holding a dict that carries ``seq``.
"""

from __future__ import annotations

import marshal
import struct
from typing import Any

VERSION = 1
STEP, STATIC, DROPPED, REQUEST, CAPTURED, FINISHER = 0, 1, 2, 3, 4, 5

_header = struct.Struct("<I")
HEADER_SIZE = _header.size
#: A frame larger than this is refused on reading: the stream is corrupt.
MAX_FRAME = 64 << 20


def step_message(
    info: Any, start_ns: int, end_ns: int, static_id: Any, parent: Any, exception: Any, extra: Any
) -> tuple:
    """The ``STEP`` message of a described step (a :class:`otel_stepspan.step.StepInfo`)."""
    links = info.links
    return (
        STEP, start_ns, end_ns, info.mode, info.batch_size, info.extend_tokens, info.decode_seqs,
        info.prefill_seqs, info.num_tokens, info.pass_id, static_id, parent, exception, extra,
        None if links is None else list(map(tuple, links)),  # marshal takes plain tuples
        info.queued_requests, info.kv_tokens,
    )


def frame(messages: Any) -> bytes:
    payload = marshal.dumps(messages)
    return _header.pack(len(payload)) + payload


def frame_length(header: bytes) -> int:
    return _header.unpack(header)[0]


def unframe(payload: bytes) -> Any:
    return marshal.loads(payload)
