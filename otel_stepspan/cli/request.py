"""``otel-stepspan request ID``: the steps one request went through, and where its time went.

A step span links to every traced request it computed (``request.id``, ``forward.request.work``
prefill/decode/verify, ``forward.request.tokens``), so a request's steps are the step spans with
a link into its trace (the ID is a trace id) or with its request id (any other ID). When the
request's own trace is in the same place (the engine exports request spans, e.g. sglang
``--enable-trace`` or vLLM ``--otlp-traces-endpoint``), its root span gives the request's start
and end: the time it waited before its first step, and its whole wall time.

Pure: :func:`request_steps` and :func:`summarise` work on spans from anywhere; the CLI reads them
(``_sources``) and prints (:func:`print_report`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import IO, Any, Iterable, Optional, Sequence

from ..otlp_json import SpanLink, StepSpan
from ..quantiles import percentile
from ..request_tally import GENERATING_WORK
from .report import local_time, table

WORK_ORDER = ("prefill", "decode", "verify")


def is_trace_id(key: str) -> bool:
    return len(key) == 32 and all(ch in "0123456789abcdef" for ch in key.lower())


@dataclass(frozen=True)
class RequestStep:
    """One step of the request: the step span and what it did for this request."""

    step: StepSpan
    work: str  # prefill (a prompt chunk, or a recompute), decode, verify
    tokens: int
    request_id: str
    request_trace_id: str


class AmbiguousRequestId(ValueError):
    """A client's request id that names several engine requests (see :func:`link_to`)."""

    def __init__(self, key: str, request_ids: Sequence[str]) -> None:
        self.request_ids = sorted(request_ids)
        shown = ", ".join(self.request_ids[:5]) + (" ..." if len(self.request_ids) > 5 else "")
        super().__init__(f"request id {key} names {len(self.request_ids)} engine requests ({shown}): give one of them")


def _engine_form(key: str) -> "re.Pattern[str]":
    """vLLM's engine-core request id: the id the client gave, a dash and 8 hex characters."""
    return re.compile(re.escape(key) + r"-[0-9a-f]{8}")


def link_to(span: StepSpan, key: str, *, exact: bool = False) -> Optional[SpanLink]:
    """The link of step ``span`` to the request ``key``, if any: a trace id names the request's
    trace; any other key its ``request.id``, or, unless ``exact``, vLLM's engine-core form of it
    (the client's id, a dash and 8 hex characters), so the id a client sent finds its steps."""
    if is_trace_id(key):
        wanted = key.lower()
        return next((link for link in span.links if link.trace_id == wanted), None)
    for link in span.links:
        request_id = link.attributes.get("request.id")
        if request_id == key:
            return link
    if exact:
        return None
    engine_form = _engine_form(key)
    return next((link for link in span.links
                 if isinstance(link.attributes.get("request.id"), str)
                 and engine_form.fullmatch(link.attributes["request.id"])), None)


def request_steps(spans: Iterable[StepSpan], key: str) -> list[RequestStep]:
    """The steps that computed the request ``key`` (a trace id or a request id), oldest first,
    each once. A request id matches exactly; only where nothing does, vLLM's engine-core form of
    it, and then it must name one request (else :class:`AmbiguousRequestId`)."""
    steps = [span for span in spans if "forward.mode" in span.attributes]
    found = _steps_linked(steps, key, exact=True)
    if not found and not is_trace_id(key):
        found = _steps_linked(steps, key, exact=False)
        request_ids = {r.request_id for r in found}
        if len(request_ids) > 1:
            raise AmbiguousRequestId(key, list(request_ids))
    return found


def _steps_linked(spans: Iterable[StepSpan], key: str, exact: bool) -> list[RequestStep]:
    found: dict[tuple[str, str], RequestStep] = {}
    for span in spans:
        link = link_to(span, key, exact=exact)
        if link is None:
            continue
        tokens = link.attributes.get("forward.request.tokens")
        found.setdefault(
            (span.trace_id, span.span_id),
            RequestStep(
                span,
                str(link.attributes.get("forward.request.work") or "?"),
                tokens if isinstance(tokens, int) and tokens >= 0 else 0,  # -1: unknown
                str(link.attributes.get("request.id") or ""),
                link.trace_id,
            ),
        )
    return sorted(found.values(), key=lambda r: (r.step.start_ns, r.step.span_id))


def request_root(spans: Iterable[StepSpan], trace_id: str) -> Optional[StepSpan]:
    """The root span of the request's own trace (no parent in it), when that trace is at hand."""
    in_trace = [s for s in spans if s.trace_id == trace_id and "forward.mode" not in s.attributes]
    roots = [s for s in in_trace if not s.parent_span_id or s.parent_span_id not in {x.span_id for x in in_trace}]
    return min(roots, key=lambda s: s.start_ns) if roots else None


@dataclass(frozen=True)
class Phase:
    """The request's steps of one kind of work."""

    work: str
    steps: int
    tokens: int
    step_ms: float  # summed durations
    p50_ms: float
    p99_ms: float
    batch_min: Optional[int]
    batch_mean: Optional[float]
    batch_max: Optional[int]


@dataclass(frozen=True)
class RequestSummary:
    key: str
    request_id: str
    trace_id: str
    service: str
    start_ns: int  # the request's start: its root span's, else its first step's
    end_ns: int
    queued_ms: Optional[float]  # before its first step (known with the request's root span)
    in_steps_ms: float
    between_steps_ms: float
    phases: tuple[Phase, ...]
    recomputes: tuple[int, ...]  # indices (1-based) of prefill steps that came after a decode or verify
    slowest: tuple[int, ...]  # indices (1-based) of the slowest steps, slowest first
    tokens: int

    @property
    def wall_ms(self) -> float:
        return (self.end_ns - self.start_ns) / 1e6


def summarise(key: str, steps: Sequence[RequestStep], root: Optional[StepSpan] = None, slowest: int = 3) -> RequestSummary:
    """Where the request's time went. ``root`` is its own root span when known."""
    first, last = steps[0].step, steps[-1].step
    start = root.start_ns if root is not None else first.start_ns
    end = max(root.end_ns, last.end_ns) if root is not None else last.end_ns
    in_steps = sum(r.step.duration_ns for r in steps) / 1e6
    queued = (first.start_ns - root.start_ns) / 1e6 if root is not None else None
    phases = []
    for work in sorted({r.work for r in steps}, key=lambda w: (WORK_ORDER.index(w) if w in WORK_ORDER else 9, w)):
        chosen = [r for r in steps if r.work == work]
        durations = sorted(r.step.duration_ns / 1e6 for r in chosen)
        sizes = [r.step.batch_size for r in chosen if r.step.batch_size is not None]
        phases.append(
            Phase(
                work,
                len(chosen),
                sum(r.tokens for r in chosen),
                sum(durations),
                percentile(durations, 0.5),
                percentile(durations, 0.99),
                min(sizes) if sizes else None,
                sum(sizes) / len(sizes) if sizes else None,
                max(sizes) if sizes else None,
            )
        )
    recomputes, seen_decode = [], False
    for index, r in enumerate(steps, 1):
        if r.work in GENERATING_WORK:
            seen_decode = True
        elif r.work == "prefill" and seen_decode:
            recomputes.append(index)  # prompt work again after decoding: preempted, recomputed
    order = sorted(range(len(steps)), key=lambda i: -steps[i].step.duration_ns)
    return RequestSummary(
        key=key,
        request_id=next((r.request_id for r in steps if r.request_id), ""),
        trace_id=steps[0].request_trace_id,
        service=first.service,
        start_ns=start,
        end_ns=end,
        queued_ms=queued,
        in_steps_ms=in_steps,
        between_steps_ms=max(0.0, (end - start) / 1e6 - in_steps - (queued or 0.0)),
        phases=tuple(phases),
        recomputes=tuple(recomputes),
        slowest=tuple(i + 1 for i in order[:slowest]),
        tokens=sum(r.tokens for r in steps),
    )


def _rows(steps: Sequence[RequestStep], start_ns: int, every_step: bool) -> list[list[str]]:
    """One row a step; with ``every_step`` False, runs of more than 6 decode steps fold into
    their first two, a summary line and their last two."""
    rows: list[list[str]] = []

    def row(index: int, r: RequestStep) -> list[str]:
        s = r.step
        bs = "?" if s.batch_size is None else str(s.batch_size)
        return [str(index), f"+{(s.start_ns - start_ns) / 1e6:.1f}", r.work, str(r.tokens), s.label, bs,
                f"{s.duration_ns / 1e6:.3f}"]

    index = 0
    while index < len(steps):
        run_end = index
        while run_end < len(steps) and steps[run_end].work == "decode":
            run_end += 1
        if every_step or run_end - index <= 6:
            for i in range(index, max(run_end, index + 1)):
                rows.append(row(i + 1, steps[i]))
            index = max(run_end, index + 1)
            continue
        run = steps[index:run_end]
        for i in range(index, index + 2):
            rows.append(row(i + 1, steps[i]))
        hidden = run[2:-2]
        sizes = [r.step.batch_size for r in hidden if r.step.batch_size is not None]
        ms = [r.step.duration_ns / 1e6 for r in hidden]
        rows.append(["...", "", "decode", str(sum(r.tokens for r in hidden)),
                     f"{len(hidden)} more decode steps, bs {min(sizes) if sizes else '?'}-{max(sizes) if sizes else '?'}",
                     "", f"{min(ms):.3f}-{max(ms):.3f}"])
        for i in range(run_end - 2, run_end):
            rows.append(row(i + 1, steps[i]))
        index = run_end
    return rows


def report_record(summary: RequestSummary, steps: Sequence[RequestStep]) -> dict[str, Any]:
    """The report as ``request --json`` prints it."""
    return {
        "key": summary.key,
        "request_id": summary.request_id,
        "trace_id": summary.trace_id,
        "service": summary.service,
        "start": local_time(summary.start_ns),
        "wall_ms": round(summary.wall_ms, 6),
        "queued_ms": None if summary.queued_ms is None else round(summary.queued_ms, 6),
        "in_steps_ms": round(summary.in_steps_ms, 6),
        "between_steps_ms": round(summary.between_steps_ms, 6),
        "tokens": summary.tokens,
        "recompute_steps": list(summary.recomputes),
        "slowest_steps": list(summary.slowest),
        "phases": [p.__dict__ for p in summary.phases],
        "steps": [
            {
                "index": i,
                "start_unix_nano": r.step.start_ns,
                "duration_ms": round(r.step.duration_ns / 1e6, 6),
                "work": r.work,
                "tokens": r.tokens,
                "label": r.step.label,
                "mode": r.step.mode,
                "batch_size": r.step.batch_size,
                "trace_id": r.step.trace_id,
                "span_id": r.step.span_id,
            }
            for i, r in enumerate(steps, 1)
        ],
    }


def print_report(summary: RequestSummary, steps: Sequence[RequestStep], out: IO[str], *, as_json: bool,
                 every_step: bool = False) -> None:
    if as_json:
        out.write(json.dumps(report_record(summary, steps), separators=(",", ":")) + "\n")
        return
    name = summary.request_id or summary.key
    out.write(f"request {name}  trace {summary.trace_id}  service {summary.service or '-'}  "
              f"started {local_time(summary.start_ns)}\n")
    rows = _rows(steps, summary.start_ns, every_step)
    out.write(table(["#", "AT_MS", "WORK", "TOKENS", "STEP", "BS", "DURATION_MS"], rows,
                     [True, True, False, True, False, True, True]) + "\n\n")
    parts = []
    if summary.queued_ms is not None:
        parts.append(f"queued {summary.queued_ms:.1f} ms")
    for phase in summary.phases:
        bs = ""
        if phase.batch_min is not None:
            bs = f", bs {phase.batch_min}" + ("" if phase.batch_min == phase.batch_max else f"-{phase.batch_max}")
        times = (
            f"{phase.p50_ms:.2f} ms" if phase.steps == 1 else f"p50 {phase.p50_ms:.2f} ms, p99 {phase.p99_ms:.2f} ms"
        )
        parts.append(
            f"{phase.work} {phase.step_ms:.1f} ms ({phase.steps} step{'s' if phase.steps != 1 else ''}, "
            f"{phase.tokens} tokens{bs}, {times})"
        )
    parts.append(f"between steps {summary.between_steps_ms:.1f} ms")
    out.write(f"where the time went: {summary.wall_ms:.1f} ms = " + " + ".join(parts) + "\n")
    slow = ", ".join(f"#{i} {steps[i - 1].step.label} {steps[i - 1].step.duration_ns / 1e6:.2f} ms"
                     for i in summary.slowest)
    out.write(f"slowest steps: {slow}\n")
    if summary.recomputes:
        out.write(f"preempted and recomputed: prompt work again at step {', '.join(f'#{i}' for i in summary.recomputes)}\n")
    if summary.queued_ms is None:
        out.write("(the request's own trace was not found: wall time runs from its first step)\n")


def plot_report(summary: RequestSummary, steps: Sequence[RequestStep], path: str) -> None:
    """The request's steps on a time line, one bar a step coloured by what it did for the
    request, its height the step's batch size. Raises ImportError without matplotlib."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(10, 3.5), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 1, 1)
    colours = {"prefill": "tab:orange", "decode": "tab:blue", "verify": "tab:green"}
    for work in sorted({r.work for r in steps}):
        chosen = [r for r in steps if r.work == work]
        axes.bar(
            [(r.step.start_ns - summary.start_ns) / 1e6 for r in chosen],
            [r.step.batch_size or 0 for r in chosen],
            width=[max(r.step.duration_ns / 1e6, 0.05) for r in chosen],
            align="edge",
            color=colours.get(work, "tab:gray"),
            label=f"{work} ({len(chosen)} steps)",
        )
    if summary.queued_ms:
        axes.axvspan(0, summary.queued_ms, color="tab:red", alpha=0.15, label=f"queued {summary.queued_ms:.1f} ms")
    axes.set_xlim(0, summary.wall_ms)
    axes.set_xlabel(f"ms since the request started ({local_time(summary.start_ns)})")
    axes.set_ylabel("batch size of the step")
    axes.set_title(f"request {summary.request_id or summary.key}: {len(steps)} steps, {summary.wall_ms:.1f} ms")
    axes.legend(loc="best", fontsize="small")
    figure.tight_layout()
    figure.savefig(path)
