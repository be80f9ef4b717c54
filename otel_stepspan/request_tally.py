"""What the engine did for each traced request, gathered from its steps: the request's own span.

A step span links to the requests it computed, but a link is one-way: Jaeger shows it on the
step, and a user looking at a slow request's trace has no way to the steps that computed it.
So each traced request gets one more span in its own trace, a child of the request's span, made
by this project: ``request.steps``, covering the request's first step to its last, with what its
steps did (prompt chunks, decodes, tokens, recomputes, time in steps and between them) and a
link to each timeline window that holds its steps (or to the step itself, for a step outside
any window), so a click in Jaeger leads from the request to them. Attributes: docs/spans.md.

When is a request done? The engine's steps say which requests they computed, not which have
finished; a request that no step has computed for ``idle_seconds`` is taken as done (finished,
or waiting so long that the report is worth having now), and every request still open is
reported when the engine's steps end. A request that comes back after that (preempted for
longer than ``idle_seconds``) gets a second span for the rest of its steps; both say which part
of the request they cover by their times and counts.

Pure: the sinks feed it the steps and make the spans (the exporter process encodes them, the
in-process sink makes them through the provider).

Variables (read by :mod:`otel_stepspan.settings`): ``OTEL_STEPSPAN_REQUEST_SPANS`` (``on``,
the default; ``off``), ``OTEL_STEPSPAN_REQUEST_IDLE_SECONDS`` (5).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Optional, Sequence

SPAN_NAME = "request.steps"
#: The work that generates a request's tokens, plain or speculative: prompt work (``prefill``)
#: for a request after a step of this work is a recompute after a preemption.
GENERATING_WORK = frozenset(("decode", "verify"))
DEFAULT_IDLE_SECONDS = 5.0
#: Requests followed at once; past it the one idle longest is reported early, so a flood of
#: requests that never finish cannot grow the exporter without bound.
MAX_OPEN = 65536


@dataclass(frozen=True)
class RequestSettings:
    enabled: bool = True
    idle_seconds: float = DEFAULT_IDLE_SECONDS
    #: Links to windows (or steps) a request's span carries at most; the rest are counted.
    max_places: int = 128


@dataclass(slots=True)
class RequestTally:
    """One traced request's steps so far."""

    request_id: str
    trace_id: int
    span_id: int  # the request's span, which the report is a child of
    trace_flags: int
    start_ns: int  # the first step's start
    end_ns: int  # the last step's end
    steps: int = 0
    tokens: int = 0
    in_steps_ns: int = 0
    #: work ("prefill", "decode", "verify", ...) -> [steps, tokens]
    by_work: dict[str, list[int]] = field(default_factory=dict)
    #: prefill steps that came after a decode or verify: the request was preempted and recomputed
    recomputes: int = 0
    decoded: bool = False
    #: (trace id, span id) of each window root (or lone step) that holds its steps, in order
    places: dict[tuple[int, int], None] = field(default_factory=dict)
    places_dropped: int = 0

    def attributes(self, reason: str) -> dict[str, Any]:
        """The report span's attributes (docs/spans.md); ``reason`` says why it was made now."""
        between = max(0, self.end_ns - self.start_ns - self.in_steps_ns)
        attributes: dict[str, Any] = {
            "request.id": self.request_id,
            "request.steps": self.steps,
            "request.tokens": self.tokens,
            "request.recomputes": self.recomputes,
            "request.in_steps_ms": round(self.in_steps_ns / 1e6, 6),
            "request.between_steps_ms": round(between / 1e6, 6),
            "request.links": len(self.places),
            "request.reported": reason,
        }
        for work, (steps, tokens) in sorted(self.by_work.items()):
            attributes[f"request.{work}_steps"] = steps
            attributes[f"request.{work}_tokens"] = tokens
        if self.places_dropped:
            attributes["request.links_dropped"] = self.places_dropped
        return attributes


class RequestLedger:
    """The traced requests whose steps are being counted. Not thread-safe: a sink calls it from
    one thread at a time."""

    def __init__(self, settings: RequestSettings) -> None:
        self.idle_ns = int(settings.idle_seconds * 1e9)
        self.max_places = max(settings.max_places, 0)
        self._open: dict[str, RequestTally] = {}

    def __len__(self) -> int:
        return len(self._open)

    def add(
        self, start_ns: int, end_ns: int, links: Optional[Sequence[Sequence[Any]]], place: Optional[tuple[int, int]]
    ) -> list[RequestTally]:
        """Count one step for each request it links to (``RequestLink`` fields: request id,
        trace id, span id, flags, work, tokens). ``place`` is where the step can be found (its
        window's root, or the step itself), None when the step was not sampled. Returns the
        requests reported early to stay under :data:`MAX_OPEN`.

        Runs once per link of every step where the spans are made: plain loads and stores only."""
        if not links:
            return []
        evicted: list[RequestTally] = []
        duration = end_ns - start_ns if end_ns > start_ns else 0
        tallies = self._open
        for request_id, trace_id, span_id, flags, work, tokens in links:
            tally = tallies.get(request_id)
            if tally is None:
                if len(tallies) >= MAX_OPEN:
                    evicted.append(self._evict_idlest())
                tally = tallies[request_id] = RequestTally(str(request_id), trace_id, span_id, flags, start_ns, end_ns)
            elif end_ns > tally.end_ns:
                tally.end_ns = end_ns
            tally.steps += 1
            tally.in_steps_ns += duration
            count = tokens if tokens.__class__ is int and tokens > 0 else 0
            tally.tokens += count
            entry = tally.by_work.get(work)
            if entry is None:  # its first step of this work (an empty work counts as unknown)
                entry = tally.by_work.setdefault(str(work) or "unknown", [0, 0])
            entry[0] += 1
            entry[1] += count
            if work in GENERATING_WORK:
                tally.decoded = True
            elif work == "prefill" and tally.decoded:
                tally.recomputes += 1
            if place is not None and place not in tally.places:
                if len(tally.places) < self.max_places:
                    tally.places[place] = None
                else:
                    tally.places_dropped += 1
        return evicted

    def recomputing(self, links: Sequence[Sequence[Any]]) -> int:
        """How many of a step's requests (``RequestLink`` fields) do prompt work after having
        decoded (or verified) in an earlier step: recomputed after a preemption. The step's own
        ``forward.recomputes``, read before :meth:`add` counts the step, by the rule
        :meth:`add` counts ``request.recomputes`` with. A request this ledger no longer holds
        (reported idle, or evicted) is not known to have decoded, so its prompt work reads as a
        first prefill.

        Runs once per step where the spans are made: a dict lookup for prompt work only."""
        tallies = self._open
        count = 0
        for link in links:
            if link[4] == "prefill":
                tally = tallies.get(link[0])
                if tally is not None and tally.decoded:
                    count += 1
        return count

    def _evict_idlest(self) -> RequestTally:
        key = min(self._open, key=lambda k: self._open[k].end_ns)
        return self._open.pop(key)

    def due(self, now_ns: int) -> list[RequestTally]:
        """The requests no step has computed for the idle time: taken as done."""
        done = [key for key, tally in self._open.items() if now_ns - tally.end_ns >= self.idle_ns]
        return [self._open.pop(key) for key in done]

    def close(self) -> list[RequestTally]:
        """Every request still open (the engine's steps have ended)."""
        tallies, self._open = list(self._open.values()), {}
        return tallies


def sampled(tallies: Iterable[RequestTally]) -> list[RequestTally]:
    """The tallies whose request trace was sampled at its head: only those have a trace to
    join."""
    return [tally for tally in tallies if tally.trace_flags & 0x01]
