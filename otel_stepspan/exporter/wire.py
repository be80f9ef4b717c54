"""What the engine process tells its exporter process, and how it is framed on the pipe.

Pure and tiny: both sides import it. A frame is a 4-byte little-endian length and a ``marshal``
payload (the same interpreter runs both sides: the exporter is started with ``sys.executable``),
holding a list of messages. ``marshal`` is one C call for a whole batch of steps, which is why
every message is made of plain ints, strings, ``None``, tuples and dicts only.

Messages, each a tuple whose first item says what it is:

- ``(STEP, start_ns, end_ns, mode, batch_size, extend_tokens, decode_seqs, prefill_seqs,
  num_tokens, pass_id, static_id, parent, exception, extra, links, queued_requests,
  kv_tokens)``: one finished step. Counts are ints or None (unknown); ``parent`` is None or
  ``(trace_id, span_id, trace_flags, is_remote)``; ``exception`` None or the exception event's
  attributes; ``extra`` None or more attributes; ``links`` None (requests not traced) or a list
  of :class:`otel_stepspan.step.RequestLink` fields as plain tuples. The layout of
  :class:`otel_stepspan.span_data.StepRecord`, which reads it as it is.
- ``(STATIC, static_id, attributes)``: attributes shared by many steps (a runner's
  ``engine.*``), sent once, before the first step that names them.
- ``(DROPPED, total)``: steps the engine dropped because the pipe was full, so far.
- ``(REQUEST, seq, what)``: ``"flush"`` (export everything received so far now),
  ``"end_timelines"`` (the same, after ending the open timeline window) or ``"stats"``; answered
  on the status pipe with one frame holding a dict that carries ``seq``.
"""

from __future__ import annotations

import marshal
import struct
from typing import Any

VERSION = 1
STEP, STATIC, DROPPED, REQUEST = 0, 1, 2, 3

_header = struct.Struct("<I")
HEADER_SIZE = _header.size
#: A frame larger than this is refused on reading: the stream is corrupt.
MAX_FRAME = 64 << 20


def frame(messages: Any) -> bytes:
    payload = marshal.dumps(messages)
    return _header.pack(len(payload)) + payload


def frame_length(header: bytes) -> int:
    return _header.unpack(header)[0]


def unframe(payload: bytes) -> Any:
    return marshal.loads(payload)
