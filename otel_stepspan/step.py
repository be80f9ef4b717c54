"""What a forward step is, and what it is called.

This module is the pure core of the project: it imports neither torch nor OpenTelemetry, so the
label grammar and the attribute table can be tested (and reused by any engine) on their own.
Everything here runs off the engine's hot path: sinks build labels only when someone is looking.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional, Sequence, TypeVar, Union

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
        if self.pass_id is not None and self.pass_id >= 0:
            attrs["forward.pass_id"] = self.pass_id
        if self.queued_requests is not None and self.queued_requests >= 0:
            attrs["scheduler.queued_requests"] = self.queued_requests
        if self.kv_tokens is not None and self.kv_tokens >= 0:
            attrs["scheduler.kv_tokens"] = self.kv_tokens
        return attrs

    def links_within(self, limit: int) -> tuple[tuple[RequestLink, ...], dict[str, SpanValue]]:
        """See :func:`links_within`."""
        return links_within(self.links, limit)


LinkT = TypeVar("LinkT")


def link_counts(carried: int, total: int) -> dict[str, int]:
    """``forward.request_links`` (links carried) and ``forward.request_links_dropped`` (requests
    over the limit, only when some are)."""
    counts = {"forward.request_links": carried}
    if total > carried:
        counts["forward.request_links_dropped"] = total - carried
    return counts

#: The step attributes that repeat the links' attributes as arrays, in link order: request ids,
#: work, tokens (see :func:`links_within`).
REQUEST_ARRAYS = ("forward.request_ids", "forward.request_work", "forward.request_tokens")


def links_within(links: Optional[Sequence[LinkT]], limit: int) -> tuple[tuple[LinkT, ...], dict[str, SpanValue]]:
    """The links a span carries under ``limit``, and the step attributes that go with them.

    ``forward.request_links`` counts the links carried, ``forward.request_links_dropped`` those
    over the limit (only when some are). ``forward.request_ids``, ``forward.request_work`` and
    ``forward.request_tokens`` repeat each carried link's attributes as arrays in link order:
    stores that keep a link's ids but drop its attributes (Jaeger) keep these, so a request's
    report reads the same from them as from a file (docs/spans.md). ``links`` holds
    :class:`RequestLink` or tuples of its fields. Nothing when the engine does not trace requests
    (``links`` is None)."""
    if links is None:
        return (), {}
    kept = tuple(links[: max(limit, 0)])
    counts: dict[str, SpanValue] = dict(link_counts(len(kept), len(links)))
    if kept:
        ids, work, tokens = REQUEST_ARRAYS
        counts[ids] = tuple([str(link[0]) for link in kept])  # type: ignore[index]
        counts[work] = tuple([str(link[4]) for link in kept])  # type: ignore[index]
        counts[tokens] = tuple([
            link[5] if type(link[5]) is int else UNKNOWN for link in kept  # type: ignore[index]
        ])
    return kept, counts


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
