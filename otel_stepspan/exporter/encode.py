"""OTLP/protobuf encoding of step spans, written by hand for speed.

The SDK's encoder builds a protobuf object tree per span in Python (about 37 us a span on this
project's machine, more than creating the span). Step spans have a fixed shape: the same keys
every time, a handful of distinct labels, integer counts. So the bytes are assembled directly
from the wire format (``opentelemetry/proto/trace/v1/trace.proto``), and every part that repeats
is encoded once and cached: the resource, the scope, each key, each step shape's attribute block.
The tests decode what this writes with the official generated classes.
"""

from __future__ import annotations

import struct
from typing import Any, Iterable, Mapping, Optional, Sequence

_pack_q = struct.Struct("<Q").pack
_pack_d = struct.Struct("<d").pack
_pack_i = struct.Struct("<I").pack

# Wire-format field tags: (field number << 3) | wire type (0 varint, 1 fixed64, 2 bytes, 5 fixed32).
_SPAN_TRACE_ID = b"\x0a\x10"  # Span.trace_id = 1, 16 bytes
_SPAN_SPAN_ID = b"\x12\x08"  # Span.span_id = 2, 8 bytes
_SPAN_PARENT = b"\x22\x08"  # Span.parent_span_id = 4, 8 bytes
_SPAN_NAME = b"\x2a"  # Span.name = 5
_SPAN_KIND_INTERNAL = b"\x30\x01"  # Span.kind = 6, SPAN_KIND_INTERNAL
_SPAN_START = b"\x39"  # Span.start_time_unix_nano = 7, fixed64
_SPAN_END = b"\x41"  # Span.end_time_unix_nano = 8, fixed64
_SPAN_ATTRIBUTE = b"\x4a"  # Span.attributes = 9
_SPAN_EVENT = b"\x5a"  # Span.events = 11
_SPAN_LINK = b"\x6a"  # Span.links = 13
_SPAN_DROPPED_LINKS = b"\x70"  # Span.dropped_links_count = 14, varint
_SPAN_STATUS = b"\x7a"  # Span.status = 15
_SPAN_FLAGS = b"\x85\x01"  # Span.flags = 16, fixed32
_EVENT_TIME = b"\x09"  # Event.time_unix_nano = 1, fixed64
_EVENT_NAME = b"\x12"  # Event.name = 2
_EVENT_ATTRIBUTE = b"\x1a"  # Event.attributes = 3
_LINK_TRACE_ID = b"\x0a\x10"  # Link.trace_id = 1
_LINK_SPAN_ID = b"\x12\x08"  # Link.span_id = 2
_LINK_ATTRIBUTE = b"\x22"  # Link.attributes = 4
_LINK_FLAGS = b"\x35"  # Link.flags = 6, fixed32
_STATUS_MESSAGE = b"\x12"  # Status.message = 2
_STATUS_CODE_ERROR = b"\x18\x02"  # Status.code = 3, STATUS_CODE_ERROR

# Span.flags / Link.flags: the W3C trace flags in bits 0-7, and whether the parent (or the
# linked context) is remote in bits 8 (known) and 9 (remote).
FLAG_HAS_IS_REMOTE = 0x100
FLAG_IS_REMOTE = 0x200

_VARINTS = []
for _n in range(1024):
    _out = bytearray()
    _v = _n
    while _v > 0x7F:
        _out.append((_v & 0x7F) | 0x80)
        _v >>= 7
    _out.append(_v)
    _VARINTS.append(bytes(_out))


def varint(value: int) -> bytes:
    """A non-negative int as a protobuf varint; negative ints as their 64-bit two's complement."""
    if 0 <= value < 1024:
        return _VARINTS[value]
    if value < 0:
        value &= 0xFFFFFFFFFFFFFFFF
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _length_delimited(tag: bytes, payload: bytes) -> bytes:
    return tag + varint(len(payload)) + payload


def any_value(value: Any) -> bytes:
    """An ``AnyValue`` message: str, bool, int, float, bytes, or a sequence of those."""
    if isinstance(value, str):
        return _length_delimited(b"\x0a", value.encode("utf-8", "replace"))
    if isinstance(value, bool):
        return b"\x10\x01" if value else b"\x10\x00"
    if isinstance(value, int):
        return b"\x18" + varint(value)
    if isinstance(value, float):
        return b"\x21" + _pack_d(value)
    if isinstance(value, bytes):
        return _length_delimited(b"\x3a", value)
    if isinstance(value, (list, tuple)):
        values = b"".join(_length_delimited(b"\x0a", any_value(item)) for item in value)
        return _length_delimited(b"\x2a", values)  # ArrayValue.values = 1
    return _length_delimited(b"\x0a", str(value).encode("utf-8", "replace"))


_key_cache: dict[str, bytes] = {}


def _key(key: str) -> bytes:
    encoded_key = _key_cache.get(key)
    if encoded_key is None:
        encoded_key = _length_delimited(b"\x0a", key.encode("utf-8", "replace"))
        if len(_key_cache) < 4096:
            _key_cache[key] = encoded_key
    return encoded_key


def key_value(key: str, value: Any) -> bytes:
    """A ``KeyValue`` message (without its field tag)."""
    return _key(key) + _length_delimited(b"\x12", any_value(value))


def array_item(value: Any) -> bytes:
    """One element of an ``ArrayValue`` (its ``values`` field), encoded on its own so that a
    caller can keep it and join it into many arrays (:func:`span_array_attribute`)."""
    return _length_delimited(b"\x0a", any_value(value))


def span_array_attribute(key: str, items: Sequence[bytes]) -> bytes:
    """A span attribute whose value is an array of elements made by :func:`array_item`."""
    value = _length_delimited(b"\x2a", b"".join(items))
    return _length_delimited(_SPAN_ATTRIBUTE, _key(key) + _length_delimited(b"\x12", value))


def attributes(tag: bytes, items: Iterable[tuple[str, Any]]) -> bytes:
    """Each ``(key, value)`` as a ``KeyValue`` in repeated field ``tag``."""
    return b"".join([_length_delimited(tag, key_value(k, v)) for k, v in items if v is not None])


def span_attributes(items: Mapping[str, Any]) -> bytes:
    return attributes(_SPAN_ATTRIBUTE, items.items())


def event(name: str, time_ns: int, event_attributes: Mapping[str, Any]) -> bytes:
    body = _EVENT_TIME + _pack_q(time_ns) + _length_delimited(_EVENT_NAME, name.encode())
    return _length_delimited(_SPAN_EVENT, body + attributes(_EVENT_ATTRIBUTE, event_attributes.items()))


def error_status(message: str) -> bytes:
    body = _length_delimited(_STATUS_MESSAGE, message.encode("utf-8", "replace")) + _STATUS_CODE_ERROR
    return _length_delimited(_SPAN_STATUS, body)


def link(trace_id: int, span_id: int, flags: int, link_attributes: Mapping[str, Any]) -> bytes:
    body = (
        _LINK_TRACE_ID + trace_id.to_bytes(16, "big")
        + _LINK_SPAN_ID + span_id.to_bytes(8, "big")
        + attributes(_LINK_ATTRIBUTE, link_attributes.items())
        + _LINK_FLAGS + _pack_i(flags)
    )
    return _length_delimited(_SPAN_LINK, body)


def dropped_links(count: int) -> bytes:
    return _SPAN_DROPPED_LINKS + varint(count)


def span(
    trace_id: int,
    span_id: int,
    parent_span_id: Optional[int],
    name: bytes,
    start_ns: int,
    end_ns: int,
    encoded_attributes: bytes,
    flags: int,
    tail: bytes = b"",
) -> bytes:
    """One ``Span`` as the ``ScopeSpans.spans`` field. ``name`` is the encoded name field
    (:func:`name_field`, cached by the caller); ``tail`` holds encoded events, links, the dropped
    links count and the status, in their field order."""
    body = (
        _SPAN_TRACE_ID + trace_id.to_bytes(16, "big")
        + _SPAN_SPAN_ID + span_id.to_bytes(8, "big")
        + (_SPAN_PARENT + parent_span_id.to_bytes(8, "big") if parent_span_id else b"")
        + name
        + _SPAN_KIND_INTERNAL
        + _SPAN_START + _pack_q(start_ns)
        + _SPAN_END + _pack_q(end_ns)
        + encoded_attributes
        + tail
        + _SPAN_FLAGS + _pack_i(flags)
    )
    return b"\x12" + varint(len(body)) + body


def name_field(name: str) -> bytes:
    return _length_delimited(_SPAN_NAME, name.encode("utf-8", "replace"))


def resource(resource_attributes: Mapping[str, Any]) -> bytes:
    """The ``ResourceSpans.resource`` field."""
    return _length_delimited(b"\x0a", attributes(b"\x0a", resource_attributes.items()))


def scope(name: str, version: str) -> bytes:
    """The ``ScopeSpans.scope`` field."""
    body = _length_delimited(b"\x0a", name.encode()) + _length_delimited(b"\x12", version.encode())
    return _length_delimited(b"\x0a", body)


def export_request(encoded_resource: bytes, encoded_scope: bytes, spans: Sequence[bytes]) -> bytes:
    """An ``ExportTraceServiceRequest`` holding ``spans`` (each from :func:`span`) under one
    resource and one scope."""
    scope_spans = _length_delimited(b"\x12", encoded_scope + b"".join(spans))
    return _length_delimited(b"\x0a", encoded_resource + scope_spans)
