"""OTLP/JSON: write spans the way the OpenTelemetry Collector's file exporter does, read them back.

Usage::

    provider.add_span_processor(BatchSpanProcessor(OtlpJsonFileExporter("spans.jsonl")))
    for step in iter_step_spans(open("spans.jsonl")):
        print(step.name, step.duration_ns)

The written form is the protobuf ``ExportTraceServiceRequest`` in the proto3 JSON mapping with
the OTLP/JSON exceptions (https://opentelemetry.io/docs/specs/otlp/#json-protobuf-encoding):
trace and span ids are lowercase hex, not base64; enums are integers; keys are lowerCamelCase;
64-bit integers (``timeUnixNano``, ``intValue``) are decimal strings. One request per line, as
the Collector's ``file`` exporter writes it, so its output and ours read the same.

The reader is deliberately lenient, because the same spans come back from several places:
Jaeger's API v3 wraps them in ``{"result": ...}`` and (by release) sends ids as base64 or hex;
some writers put 64-bit integers as JSON numbers. All of that normalises to one
:class:`StepSpan` per step span (a span with a ``forward.mode`` attribute).
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Iterable, Iterator, Mapping, Optional, Sequence, Union

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from .step import REQUEST_ARRAYS, link_attributes

__all__ = [
    "OtlpJsonFileExporter",
    "SpanLink",
    "StepSpan",
    "iter_otlp_documents",
    "iter_spans",
    "iter_step_spans",
    "normalize_id",
    "otlp_json_to_request",
    "spans_to_otlp_json",
]

#: The keys of a span (and of a span link) that hold ids: bytes in protobuf, hex in OTLP/JSON.
_ID_KEYS = ("traceId", "spanId", "parentSpanId")

_HEX = frozenset("0123456789abcdefABCDEF")


# -- writing ---------------------------------------------------------------------------------


def spans_to_otlp_json(spans: Sequence[ReadableSpan]) -> dict:
    """One ``ExportTraceServiceRequest`` for ``spans``, as an OTLP/JSON document (a dict).

    Encoding goes through the OTLP exporters' own protobuf encoder, so resource and scope
    grouping, attribute typing, status and events are exactly what an OTLP exporter sends; only
    the JSON spelling is added here.
    """
    from google.protobuf import json_format
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans

    document = json_format.MessageToDict(
        encode_spans(spans),
        use_integers_for_enums=True,
        preserving_proto_field_name=False,
    )
    _convert_ids(document, _base64_to_hex)
    return document


def otlp_json_to_request(document: Mapping[str, Any]):
    """The protobuf ``ExportTraceServiceRequest`` of an OTLP/JSON document (hex or base64 ids).

    The inverse of :func:`spans_to_otlp_json`; protobuf's own JSON parser expects base64 ids, so
    hex ids are converted first. Raises ``google.protobuf.json_format.ParseError`` on anything
    that is not a valid request.
    """
    from google.protobuf import json_format
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    copy = json.loads(json.dumps(document))
    _convert_ids(copy, _to_base64)
    return json_format.ParseDict(copy, ExportTraceServiceRequest())


def _convert_ids(document: dict, convert) -> None:
    for resource_spans in document.get("resourceSpans") or ():
        for scope_spans in resource_spans.get("scopeSpans") or ():
            for span in scope_spans.get("spans") or ():
                _convert_id_keys(span, convert)
                for link in span.get("links") or ():
                    _convert_id_keys(link, convert)


def _convert_id_keys(obj: dict, convert) -> None:
    for key in _ID_KEYS:
        value = obj.get(key)
        if isinstance(value, str) and value:
            obj[key] = convert(value)


def _base64_to_hex(value: str) -> str:
    return base64.b64decode(value).hex()


def _to_base64(value: str) -> str:
    return base64.b64encode(bytes.fromhex(normalize_id(value))).decode("ascii")


class OtlpJsonFileExporter(SpanExporter):
    """Appends one OTLP/JSON line per exported batch to a file, like the Collector's ``file``
    exporter, so that a run needs no backend to be searched afterwards
    (``otel-stepspan search --file spans.jsonl``).

    Thread-safe; every batch is flushed to the OS before ``export`` returns, so a reader (or a
    crash) never sees half a line. The parent directory is created on first export.
    """

    def __init__(self, path: Union[str, os.PathLike]) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._file: Optional[IO[str]] = None
        self._closed = False

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        if not spans:
            return SpanExportResult.SUCCESS
        try:
            line = json.dumps(spans_to_otlp_json(spans), separators=(",", ":"), ensure_ascii=False)
        except Exception:
            return SpanExportResult.FAILURE
        with self._lock:
            if self._closed:
                return SpanExportResult.FAILURE
            try:
                if self._file is None:
                    self.path.parent.mkdir(parents=True, exist_ok=True)
                    self._file = open(self.path, "a", encoding="utf-8")
                self._file.write(line + "\n")
                self._file.flush()
            except OSError:
                return SpanExportResult.FAILURE
        return SpanExportResult.SUCCESS

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        with self._lock:
            if self._file is not None:
                try:
                    self._file.flush()
                except OSError:
                    return False
        return True

    def shutdown(self) -> None:
        with self._lock:
            self._closed = True
            if self._file is not None:
                try:
                    self._file.close()
                finally:
                    self._file = None


# -- reading ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class SpanLink:
    """A link of a span to another trace's span (a step's link to a request it computed)."""

    trace_id: str
    span_id: str
    attributes: Mapping[str, Any] = field(default_factory=dict, hash=False, compare=True)


@dataclass(frozen=True)
class StepSpan:
    """One span as read back from OTLP/JSON (a file, the Collector, or Jaeger): a step span
    (with ``forward.mode``), or any other span where a reader asks for all of them."""

    trace_id: str
    span_id: str
    name: str
    service: str
    start_ns: int
    end_ns: int
    duration_ns: int
    attributes: Mapping[str, Any] = field(default_factory=dict, hash=False, compare=True)
    parent_span_id: str = ""
    links: tuple[SpanLink, ...] = ()

    @property
    def mode(self) -> str:
        return str(self.attributes.get("forward.mode", ""))

    @property
    def batch_size(self) -> Optional[int]:
        return _known_int(self.attributes.get("forward.batch_size"))

    @property
    def num_tokens(self) -> Optional[int]:
        return _known_int(self.attributes.get("forward.num_tokens"))

    @property
    def label(self) -> str:
        """The step's label: ``forward.label``, or the span name when the attribute is absent."""
        label = self.attributes.get("forward.label")
        return label if isinstance(label, str) and label else self.name


def _known_int(value: Any) -> Optional[int]:
    """An integer count, or None when missing or UNKNOWN (-1)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return None
    return value


def normalize_id(value: Any) -> str:
    """A trace or span id as lowercase hex, from hex or base64 (Jaeger sends either).

    The two spellings cannot be confused: 16 and 8 bytes are 32 and 16 hex digits but 24 and 12
    base64 characters. Anything unreadable is returned as it was, lower-cased.
    """
    if not isinstance(value, str):
        return ""
    text = value.strip()
    if len(text) in (16, 32) and all(ch in _HEX for ch in text):
        return text.lower()
    try:
        standard = text.replace("-", "+").replace("_", "/")  # the URL-safe alphabet too
        raw = base64.b64decode(standard + "=" * (-len(standard) % 4), validate=True)
    except (binascii.Error, ValueError):
        return text.lower()
    return raw.hex() if raw else ""


def _int(value: Any) -> int:
    """An int64 from OTLP/JSON: a decimal string (the mapping) or a JSON number (lenient)."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return int(value)
    if isinstance(value, str) and value.strip():
        text = value.strip()
        try:
            return int(text)
        except ValueError:
            return int(float(text))
    return 0


def _any_value(value: Any) -> Any:
    """The Python value of an OTLP ``AnyValue``."""
    if not isinstance(value, Mapping):
        return value
    if "stringValue" in value:
        return value["stringValue"]
    if "intValue" in value:
        return _int(value["intValue"])
    if "doubleValue" in value:
        raw = value["doubleValue"]
        return float(raw) if raw is not None else None
    if "boolValue" in value:
        return bool(value["boolValue"])
    if "arrayValue" in value:
        return tuple(_any_value(item) for item in (value["arrayValue"] or {}).get("values") or ())
    if "kvlistValue" in value:
        return _attributes((value["kvlistValue"] or {}).get("values") or ())
    if "bytesValue" in value:
        return value["bytesValue"]
    return None


def _attributes(key_values: Iterable[Any]) -> dict[str, Any]:
    attrs: dict[str, Any] = {}
    for kv in key_values or ():
        if isinstance(kv, Mapping) and isinstance(kv.get("key"), str):
            attrs[kv["key"]] = _any_value(kv.get("value"))
    return attrs


def _documents_in(obj: Any) -> Iterator[Mapping[str, Any]]:
    """The ``{"resourceSpans": [...]}`` documents inside one parsed JSON value."""
    if isinstance(obj, list):
        for item in obj:
            yield from _documents_in(item)
        return
    if not isinstance(obj, Mapping):
        return
    if "resourceSpans" in obj:
        yield obj
    elif "result" in obj:  # Jaeger API v3: {"result": {"resourceSpans": [...]}}
        yield from _documents_in(obj["result"])
    elif "data" in obj and isinstance(obj["data"], (list, Mapping)):
        yield from _documents_in(obj["data"])


def _json_lines(lines: Any) -> Iterator[Mapping[str, Any]]:
    """The documents of JSON lines (the file exporter's output, or a streamed Jaeger response),
    from any iterable of str or bytes lines; blank lines are skipped."""
    for number, line in enumerate(lines, 1):
        if isinstance(line, bytes):
            line = line.decode("utf-8")
        line = line.strip()
        if not line:
            continue
        try:
            parsed = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"line {number} is not JSON: {exc}") from None
        yield from _documents_in(parsed)


def _parse_text(text: str) -> Iterator[Mapping[str, Any]]:
    text = text.strip()
    if not text:
        return
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError:
        yield from _json_lines(text.splitlines())
        return
    yield from _documents_in(parsed)


def iter_otlp_documents(source: Any) -> Iterator[Mapping[str, Any]]:
    """Every OTLP/JSON request document in ``source``.

    ``source`` is a parsed document (dict or list), JSON text or bytes (one document or JSON
    lines), a path, an open file, or an iterable of lines / documents.
    """
    if isinstance(source, Mapping):
        yield from _documents_in(source)
    elif isinstance(source, bytes):
        yield from _parse_text(source.decode("utf-8"))
    elif isinstance(source, str):
        yield from _parse_text(source)
    elif isinstance(source, os.PathLike):
        with open(source, encoding="utf-8") as handle:
            yield from iter_otlp_documents(handle)
    elif isinstance(source, io.IOBase) or hasattr(source, "readline"):
        yield from _json_lines(source)
    else:
        for item in source:
            yield from iter_otlp_documents(item)


def iter_spans(doc_or_lines: Any) -> Iterator[StepSpan]:
    """Every span in OTLP/JSON input, step spans or not (a request's own spans, timeline roots).

    Accepts what :func:`iter_otlp_documents` accepts. Ids come out as lowercase hex whatever
    their spelling in; 64-bit integers may be strings or numbers.
    """
    for document in iter_otlp_documents(doc_or_lines):
        for resource_spans in document.get("resourceSpans") or ():
            resource = resource_spans.get("resource") or {}
            service = _attributes(resource.get("attributes") or ()).get("service.name")
            service = service if isinstance(service, str) else ""
            for scope_spans in resource_spans.get("scopeSpans") or resource_spans.get("instrumentationLibrarySpans") or ():
                for span in scope_spans.get("spans") or ():
                    start = _int(span.get("startTimeUnixNano"))
                    end = _int(span.get("endTimeUnixNano"))
                    attributes = _attributes(span.get("attributes") or ())
                    for array, _ in _REQUEST_ARRAYS:
                        if array in attributes:
                            attributes[array] = _array(attributes[array])
                    yield StepSpan(
                        trace_id=normalize_id(span.get("traceId")),
                        span_id=normalize_id(span.get("spanId")),
                        name=str(span.get("name", "")),
                        service=service,
                        start_ns=start,
                        end_ns=end,
                        duration_ns=max(0, end - start),
                        attributes=attributes,
                        parent_span_id=normalize_id(span.get("parentSpanId")),
                        links=_with_request_arrays(
                            tuple(
                                SpanLink(
                                    normalize_id(link.get("traceId")),
                                    normalize_id(link.get("spanId")),
                                    _attributes(link.get("attributes") or ()),
                                )
                                for link in span.get("links") or ()
                                if isinstance(link, Mapping)
                            ),
                            attributes,
                        ),
                    )


#: A step's request arrays, in link order, and the link attribute each one restores.
_REQUEST_ARRAYS = tuple(zip(REQUEST_ARRAYS, link_attributes("", "", 0)))


def _array(value: Any) -> Any:
    """An array attribute as a tuple: as OTLP carries it, or as the JSON text a store that has
    no array type keeps instead (Jaeger's span model turns ``["a","b"]`` into that string)."""
    if isinstance(value, str) and value.startswith("["):
        try:
            parsed = json.loads(value)
        except ValueError:
            return value
        return tuple(parsed) if isinstance(parsed, list) else value
    return value


def _with_request_arrays(links: tuple[SpanLink, ...], attributes: Mapping[str, Any]) -> tuple[SpanLink, ...]:
    """The step's links with their attributes restored from the step's request arrays where a
    store dropped them (Jaeger keeps a link's ids, and adds ``opentracing.ref_type``). The arrays
    follow the links' order; when their length is not the links' (a store that reordered or lost
    links), nothing is guessed."""
    if not links or all("request.id" in link.attributes for link in links):
        return links
    arrays = [(attributes.get(array), key) for array, key in _REQUEST_ARRAYS]
    if not all(isinstance(values, tuple) and len(values) == len(links) for values, _ in arrays):
        return links
    return tuple(
        link if "request.id" in link.attributes else SpanLink(
            link.trace_id, link.span_id,
            {**link.attributes, **{key: values[index] for values, key in arrays}},  # type: ignore[index]
        )
        for index, link in enumerate(links)
    )


def iter_step_spans(doc_or_lines: Any) -> Iterator[StepSpan]:
    """Every step span (a span with a ``forward.mode`` attribute) in OTLP/JSON input; see
    :func:`iter_spans`."""
    for span in iter_spans(doc_or_lines):
        if "forward.mode" in span.attributes:
            yield span
