"""What a forward step is, and what it is called.

This module is the pure core of the project: it imports neither torch nor OpenTelemetry, so the
label grammar and the attribute table can be tested (and reused by any engine) on their own.
Everything here runs off the engine's hot path: sinks build labels only when someone is looking.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional, Sequence, Union

AttributeValue = Union[str, int]
#: A span attribute as the sinks set it: a scalar, or a tuple of them (the request arrays).
SpanValue = Union[str, int, tuple]

#: The value an integer attribute takes when the engine did not expose the count. The keys are
#: always present (so Jaeger tag search and span metrics can rely on them); the label shows ``?``.
UNKNOWN = -1

KNOWN_MODES = ("idle", "decode", "prefill", "mixed", "verify", "draft", "draft_extend")


def normalize_mode(name: object) -> str:
    """Lower-case an engine's mode name and keep it safe inside ``step[...]``.

    Engines name their modes freely (sglang's ``TARGET_VERIFY``, ``SPLIT_PREFILL``…); the label
    must stay one token so that it can be searched for, so anything but letters, digits and ``_``
    becomes ``_``.
    """
    text = str(name).strip().lower()
    cleaned = "".join(ch if (ch.isalnum() and ch.isascii()) or ch == "_" else "_" for ch in text)
    return cleaned or "unknown"


def _count(value: Optional[int]) -> str:
    return "?" if value is None or value < 0 else str(value)


def _attr(value: Optional[int]) -> int:
    return UNKNOWN if value is None or value < 0 else value


#: Links a step span carries at most; the rest are counted in ``forward.request_links_dropped``.
#: The default covers a whole batch (a step of 256 decodes links its 256 requests), so that
#: ``otel-stepspan request`` is complete at any batch size an engine runs; it only bounds a
#: runaway. ``OTEL_SPAN_LINK_COUNT_LIMIT`` lowers it, as it does the SDK's own limit. A provider
#: the engine set up keeps its own limit (the SDK's default is 128): see docs/spans.md.
DEFAULT_LINK_LIMIT = 65536


class RequestLink(NamedTuple):
    """One request a step computed, as a link from the step span to the request's own trace.

    Identifiers and counts only, never content: the request id, the trace context the engine's
    request tracing gave the request, what the step did for it (``prefill``: a prompt chunk,
    ``decode``, ``verify``) and how many tokens of it the step computed.
    """

    request_id: str
    trace_id: int
    span_id: int
    trace_flags: int
    work: str
    tokens: int

    def attributes(self) -> dict[str, AttributeValue]:
        return link_attributes(self.request_id, self.work, self.tokens)


def link_attributes(request_id: str, work: str, tokens: int) -> dict[str, AttributeValue]:
    """A request link's attributes: ``request.id``, ``forward.request.work`` and
    ``forward.request.tokens``."""
    return {"request.id": request_id, "forward.request.work": work, "forward.request.tokens": tokens}


@dataclass(frozen=True)
class StepInfo:
    """One forward step, as the engine counted it.

    ``None`` (or a negative number) in a count means the engine did not expose it: the label shows
    ``?`` and the attribute carries :data:`UNKNOWN`, so a malformed batch degrades the description
    instead of breaking the forward.
    """

    mode: str
    batch_size: Optional[int] = None
    extend_tokens: Optional[int] = 0
    decode_seqs: Optional[int] = 0
    prefill_seqs: Optional[int] = 0
    num_tokens: Optional[int] = 0
    pass_id: Optional[int] = None
    #: The traced requests the step computed (None: the engine does not trace requests).
    links: Optional[tuple[RequestLink, ...]] = None
    #: Scheduler context where the engine exposes it cheaply: requests waiting, KV tokens in use.
    queued_requests: Optional[int] = None
    kv_tokens: Optional[int] = None

    @classmethod
    def from_counts(
        cls,
        *,
        prefill_seqs: int,
        extend_tokens: int,
        decode_seqs: int,
        pass_id: Optional[int] = None,
    ) -> "StepInfo":
        """The step of an engine that knows how many sequences extend a prompt (and by how many
        tokens) and how many decode: idle, prefill, decode or mixed, by what is present."""
        batch_size = prefill_seqs + decode_seqs
        if batch_size == 0:
            return cls("idle", 0, 0, 0, 0, 0, pass_id)
        mode = "mixed" if prefill_seqs and decode_seqs else ("prefill" if prefill_seqs else "decode")
        return cls(mode, batch_size, extend_tokens, decode_seqs, prefill_seqs, extend_tokens + decode_seqs, pass_id)

    @property
    def label(self) -> str:
        """The record_function name and (by default) the span name; grammar in docs/spans.md."""
        mode = self.mode
        if mode == "idle":
            return "step[idle]"
        bs = _count(self.batch_size)
        if mode == "prefill":
            return f"step[prefill bs={bs} toks={_count(self.extend_tokens)}]"
        if mode == "mixed":
            return (
                f"step[mixed bs={bs} ext={_count(self.extend_tokens)} "
                f"dec={_count(self.decode_seqs)}]"
            )
        if mode == "verify":
            return f"step[verify bs={bs} toks={_count(self.num_tokens)}]"
        return f"step[{mode} bs={bs}]"

    @property
    def mode_label(self) -> str:
        """The low-cardinality span name (``OTEL_STEPSPAN_SPAN_NAME=mode``)."""
        return f"step[{self.mode}]"

    def attributes(self) -> dict[str, AttributeValue]:
        """The ``forward.*`` span attributes (docs/spans.md); ``forward.pass_id`` only when known."""
        attrs: dict[str, AttributeValue] = {
            "forward.mode": self.mode,
            "forward.batch_size": _attr(self.batch_size),
            "forward.extend_tokens": _attr(self.extend_tokens),
            "forward.decode_seqs": _attr(self.decode_seqs),
            "forward.prefill_seqs": _attr(self.prefill_seqs),
            "forward.num_tokens": _attr(self.num_tokens),
            "forward.label": self.label,
        }
        attrs.update(step_scalars(self.pass_id, self.queued_requests, self.kv_tokens))
        return attrs


def step_scalars(pass_id: Optional[int], queued_requests: Optional[int], kv_tokens: Optional[int]) -> dict[str, int]:
    """``forward.pass_id``, ``scheduler.queued_requests`` and ``scheduler.kv_tokens``: each only
    when the engine exposed it (a step's other counts are always present, see :data:`UNKNOWN`)."""
    scalars: dict[str, int] = {}
    if pass_id is not None and pass_id >= 0:
        scalars["forward.pass_id"] = pass_id
    if queued_requests is not None and queued_requests >= 0:
        scalars["scheduler.queued_requests"] = queued_requests
    if kv_tokens is not None and kv_tokens >= 0:
        scalars["scheduler.kv_tokens"] = kv_tokens
    return scalars


def link_counts(carried: int, total: int, recomputes: Optional[int]) -> dict[str, int]:
    """``forward.request_links`` (links carried), ``forward.request_links_dropped`` (requests
    over the limit, only when some are) and ``forward.recomputes`` (requests recomputed after a
    preemption, linked or not; None when nobody kept the requests' history, and then absent)."""
    counts = {"forward.request_links": carried}
    if total > carried:
        counts["forward.request_links_dropped"] = total - carried
    if recomputes is not None:
        counts["forward.recomputes"] = recomputes
    return counts


#: The step attributes that repeat the links' attributes as arrays, in link order: request ids,
#: work, tokens (see :func:`request_attributes`).
REQUEST_ARRAYS = ("forward.request_ids", "forward.request_work", "forward.request_tokens")


def request_array_items(link: Sequence[object]) -> tuple[str, str, int]:
    """One link's elements of the three :data:`REQUEST_ARRAYS`: its request id, work and tokens
    (:data:`UNKNOWN` when the engine gave no count). ``link`` holds :class:`RequestLink` fields."""
    tokens = link[5]
    return str(link[0]), str(link[4]), tokens if type(tokens) is int else UNKNOWN  # type: ignore[return-value]


def request_attributes(
    carried: Sequence[Sequence[object]], dropped: int, recomputes: Optional[int]
) -> dict[str, SpanValue]:
    """The step attributes that go with the request links a span carries.

    ``forward.request_links`` counts the links carried, ``forward.request_links_dropped`` those
    over the limit (only when some are), ``forward.recomputes`` the step's requests recomputed
    after a preemption (:func:`link_counts`). ``forward.request_ids``, ``forward.request_work`` and
    ``forward.request_tokens`` repeat each carried link's attributes as arrays in link order:
    stores that keep a link's ids but drop its attributes (Jaeger) keep these, so a request's
    report reads the same from them as from a file (docs/spans.md)."""
    attributes: dict[str, SpanValue] = dict(link_counts(len(carried), len(carried) + dropped, recomputes))
    if carried:
        items = [request_array_items(link) for link in carried]
        for index, key in enumerate(REQUEST_ARRAYS):
            attributes[key] = tuple([item[index] for item in items])
    return attributes


_object_new = object.__new__


def make_step(
    mode: str,
    batch_size: Optional[int],
    extend_tokens: Optional[int],
    decode_seqs: Optional[int],
    prefill_seqs: Optional[int],
    num_tokens: Optional[int],
    pass_id: Optional[int],
) -> StepInfo:
    """``StepInfo(...)`` for the adapters' hot path: the frozen dataclass's ``__init__`` sets each
    field through ``object.__setattr__`` (about 0.8 us); filling ``__dict__`` at once costs half."""
    info = _object_new(StepInfo)
    info.__dict__.update(
        mode=mode,
        batch_size=batch_size,
        extend_tokens=extend_tokens,
        decode_seqs=decode_seqs,
        prefill_seqs=prefill_seqs,
        num_tokens=num_tokens,
        pass_id=pass_id,
    )
    return info


def unknown_step(pass_id: Optional[int] = None) -> StepInfo:
    """What a step is called when the batch could not be read at all."""
    return StepInfo(
        mode="unknown",
        batch_size=None,
        extend_tokens=None,
        decode_seqs=None,
        prefill_seqs=None,
        num_tokens=None,
        pass_id=pass_id,
    )


def engine_attributes(
    name: Optional[str] = None,
    tp_rank: Optional[int] = None,
    dp_rank: Optional[int] = None,
    pp_rank: Optional[int] = None,
) -> dict[str, AttributeValue]:
    """The ``engine.*`` attributes, keeping only what is known (docs/spans.md)."""
    attrs: dict[str, AttributeValue] = {}
    if name:
        attrs["engine.name"] = name
    for key, value in (("engine.tp_rank", tp_rank), ("engine.dp_rank", dp_rank), ("engine.pp_rank", pp_rank)):
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            attrs[key] = value
    return attrs
