"""``otel-stepspan timeline [TRACE_ID]``: engine timeline traces, listed or drawn as a waterfall.

Parentless steps of an engine process gather under a ``timeline`` root span per window of steps
(:mod:`otel_stepspan.timeline`). Jaeger's trace view shows such a trace as a waterfall; this
command lists the windows (without a trace id) and draws one window's steps (with one), in the
terminal or, with ``--plot``, as a picture: the same view where no Jaeger UI is at hand.

Pure: :func:`windows` and :func:`waterfall_rows` work on spans from anywhere.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import IO, Iterable, Sequence

from ..otlp_json import StepSpan
from ..timeline import ROOT_NAME
from .report import local_time, table


@dataclass(frozen=True)
class Window:
    root: StepSpan
    steps: tuple[StepSpan, ...]

    @property
    def by_mode(self) -> dict[str, int]:
        counts = {k[len("timeline.steps."):]: v for k, v in self.root.attributes.items() if k.startswith("timeline.steps.")}
        return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


def windows(spans: Iterable[StepSpan]) -> list[Window]:
    """Every timeline root with the steps under it (those at hand), oldest first."""
    spans = list(spans)
    roots = {s.span_id: s for s in spans if s.name == ROOT_NAME and "forward.mode" not in s.attributes}
    members: dict[str, list[StepSpan]] = {span_id: [] for span_id in roots}
    for span in spans:
        if "forward.mode" in span.attributes and span.parent_span_id in members:
            members[span.parent_span_id].append(span)
    return sorted(
        (Window(root, tuple(sorted(members[span_id], key=lambda s: s.start_ns))) for span_id, root in roots.items()),
        key=lambda w: w.root.start_ns,
    )


def print_windows(found: Sequence[Window], out: IO[str], *, as_json: bool) -> None:
    if as_json:
        for w in found:
            out.write(json.dumps({
                "trace_id": w.root.trace_id, "service": w.root.service, "start_unix_nano": w.root.start_ns,
                "duration_ms": round(w.root.duration_ns / 1e6, 6), "steps": w.root.attributes.get("timeline.steps"),
                "by_mode": w.by_mode, "tokens": w.root.attributes.get("timeline.tokens"),
            }, separators=(",", ":")) + "\n")
        return
    rows = [
        [local_time(w.root.start_ns), w.root.service or "-", str(w.root.attributes.get("timeline.steps", "?")),
         " ".join(f"{mode}={count}" for mode, count in w.by_mode.items()), f"{w.root.duration_ns / 1e6:.1f}",
         w.root.trace_id]
        for w in found
    ]
    out.write(table(["START", "SERVICE", "STEPS", "BY_MODE", "DURATION_MS", "TRACE_ID"], rows,
                    [False, False, True, False, True, False]) + "\n")


def waterfall_rows(window: Window, width: int = 48) -> list[list[str]]:
    """One row a step: offset from the window's start, a bar placed on the window's time axis,
    the duration and the label; the gaps between steps show as the bars' offsets."""
    start, span_ns = window.root.start_ns, max(window.root.duration_ns, 1)
    rows = []
    for step in window.steps:
        left = int((step.start_ns - start) / span_ns * width)
        length = max(1, int(round(step.duration_ns / span_ns * width)))
        bar = " " * min(left, width - 1) + "#" * min(length, width - min(left, width - 1))
        rows.append([f"+{(step.start_ns - start) / 1e6:.1f}", f"{step.duration_ns / 1e6:.3f}", bar.ljust(width),
                     step.label])
    return rows


def print_waterfall(window: Window, out: IO[str]) -> None:
    root = window.root
    out.write(
        f"timeline {root.trace_id}  service {root.service or '-'}  started {local_time(root.start_ns)}  "
        f"{root.duration_ns / 1e6:.1f} ms, {len(window.steps)} steps ("
        + ", ".join(f"{mode} {count}" for mode, count in window.by_mode.items()) + ")\n"
    )
    out.write(table(["AT_MS", "MS", "WATERFALL", "STEP"], waterfall_rows(window), [True, True, False, False]) + "\n")


def plot_waterfall(window: Window, path: str) -> None:
    """The window as the Chrome trace shows it: the root on top, the steps on one track below it,
    each bar at its time and as long as the step, coloured by mode (gaps between bars are the
    engine's time outside steps), and under them each step's batch size. Raises ImportError
    without matplotlib."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    steps = window.steps
    root = window.root
    figure = Figure(figsize=(11, 4), dpi=100)
    FigureCanvasAgg(figure)
    track, sizes = figure.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [1, 2]})
    colours = {"prefill": "tab:orange", "decode": "tab:blue", "mixed": "tab:purple", "idle": "tab:gray",
               "verify": "tab:green", "draft": "tab:olive"}
    track.broken_barh([(0, root.duration_ns / 1e6)], (1.1, 0.8), color="tab:cyan")
    modes = sorted({s.mode for s in steps})
    for mode in modes:
        chosen = [s for s in steps if s.mode == mode]
        bars = [((s.start_ns - root.start_ns) / 1e6, max(s.duration_ns / 1e6, 0.05)) for s in chosen]
        track.broken_barh(bars, (0, 0.8), color=colours.get(mode, "tab:red"), label=f"{mode} ({len(chosen)})")
        sizes.bar([(s.start_ns - root.start_ns) / 1e6 for s in chosen], [s.batch_size or 0 for s in chosen],
                  width=[max(s.duration_ns / 1e6, 0.05) for s in chosen], align="edge",
                  color=colours.get(mode, "tab:red"))
    track.set_yticks([0.4, 1.5])
    track.set_yticklabels(["steps", "timeline"])
    track.set_ylim(-0.2, 2.1)
    track.legend(loc="upper center", bbox_to_anchor=(0.5, -0.05), ncol=len(modes) or 1, fontsize="small",
                 frameon=False)
    track.set_title(f"{root.service or 'engine'} timeline {root.trace_id}: {len(steps)} steps, "
                    f"{root.duration_ns / 1e6:.0f} ms")
    sizes.set_ylabel("batch size")
    sizes.set_xlabel(f"ms since {local_time(root.start_ns)}")
    sizes.set_xlim(0, root.duration_ns / 1e6)
    figure.tight_layout()
    figure.savefig(path)
