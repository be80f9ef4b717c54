"""What ``search`` and ``stats`` print: the step table, per-mode statistics, the plot."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import IO, Optional, Sequence

from ..otlp_json import StepSpan
from ..quantiles import percentile
from ..step import KNOWN_MODES

NO_MATCH = "no matching steps"


def local_time(unix_ns: int) -> str:
    """Local ISO 8601 with milliseconds and the UTC offset: ``2026-11-24T08:20:17.123+01:00``."""
    seconds, nanos = divmod(unix_ns, 1_000_000_000)
    stamp = datetime.fromtimestamp(seconds).astimezone().replace(microsecond=nanos // 1000)
    return stamp.isoformat(timespec="milliseconds")


def _ms(ns: float) -> float:
    return ns / 1e6


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], right: Sequence[bool]) -> str:
    """Columns padded to their widest cell, right-aligned where ``right`` says so."""
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(cell)) for w, cell in zip(widths, row)]

    def line(cells: Sequence[str]) -> str:
        out = [cell.rjust(w) if r else cell.ljust(w) for cell, w, r in zip(cells, widths, right)]
        return "  ".join(out).rstrip()

    return "\n".join([line(headers)] + [line(row) for row in rows])


# -- search ----------------------------------------------------------------------------------


def step_record(step: StepSpan) -> dict:
    """One step as ``search --json`` prints it."""
    return {
        "time": local_time(step.start_ns),
        "start_unix_nano": step.start_ns,
        "end_unix_nano": step.end_ns,
        "duration_ms": round(_ms(step.duration_ns), 6),
        "label": step.label,
        "mode": step.mode,
        "batch_size": step.batch_size,
        "num_tokens": step.num_tokens,
        "service": step.service,
        "trace_id": step.trace_id,
        "span_id": step.span_id,
        "name": step.name,
        "attributes": dict(step.attributes),
    }


def print_steps(steps: Sequence[StepSpan], out: IO[str], *, as_json: bool) -> None:
    if as_json:
        for step in steps:
            out.write(json.dumps(step_record(step), separators=(",", ":")) + "\n")
        return
    rows = [
        [local_time(s.start_ns), s.label, f"{_ms(s.duration_ns):.3f}", s.service or "-", s.trace_id]
        for s in steps
    ]
    out.write(table(["TIME", "LABEL", "DURATION_MS", "SERVICE", "TRACE_ID"], rows, [False, False, True, False, False]) + "\n")


# -- stats -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModeStats:
    mode: str
    steps: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_batch_size: Optional[float]
    tokens_per_s: Optional[float]
    time_share: float  # 0..1 of the summed durations of all selected steps
    total_ms: float

    def record(self) -> dict:
        return {
            "mode": self.mode,
            "steps": self.steps,
            "p50_ms": round(self.p50_ms, 6),
            "p90_ms": round(self.p90_ms, 6),
            "p99_ms": round(self.p99_ms, 6),
            "mean_batch_size": None if self.mean_batch_size is None else round(self.mean_batch_size, 6),
            "tokens_per_s": None if self.tokens_per_s is None else round(self.tokens_per_s, 3),
            "time_share": round(self.time_share, 6),
            "total_ms": round(self.total_ms, 6),
        }


def _mode_order(mode: str) -> tuple[int, str]:
    return (KNOWN_MODES.index(mode) if mode in KNOWN_MODES else len(KNOWN_MODES), mode)


def _stats_of(mode: str, steps: Sequence[StepSpan], all_ns: int) -> ModeStats:
    durations = sorted(s.duration_ns for s in steps)
    total_ns = sum(durations)
    sizes = [s.batch_size for s in steps if s.batch_size is not None]
    # tokens/s over the steps whose token count is known, divided by those steps' own time.
    counted = [s for s in steps if s.num_tokens is not None]
    counted_ns = sum(s.duration_ns for s in counted)
    tokens_per_s = (
        sum(s.num_tokens or 0 for s in counted) / (counted_ns / 1e9) if counted and counted_ns > 0 else None
    )
    return ModeStats(
        mode=mode,
        steps=len(steps),
        p50_ms=_ms(percentile(durations, 0.50)),
        p90_ms=_ms(percentile(durations, 0.90)),
        p99_ms=_ms(percentile(durations, 0.99)),
        mean_batch_size=sum(sizes) / len(sizes) if sizes else None,
        tokens_per_s=tokens_per_s,
        time_share=total_ns / all_ns if all_ns > 0 else 0.0,
        total_ms=_ms(total_ns),
    )


def mode_stats(steps: Sequence[StepSpan]) -> list[ModeStats]:
    """One row per mode (the order of docs/spans.md, then alphabetical), then ``all``."""
    by_mode: dict[str, list[StepSpan]] = {}
    for step in steps:
        by_mode.setdefault(step.mode, []).append(step)
    all_ns = sum(s.duration_ns for s in steps)
    rows = [_stats_of(mode, by_mode[mode], all_ns) for mode in sorted(by_mode, key=_mode_order)]
    if steps:
        rows.append(_stats_of("all", list(steps), all_ns))
    return rows


def print_stats(rows: Sequence[ModeStats], out: IO[str], *, as_json: bool) -> None:
    if as_json:
        for row in rows:
            out.write(json.dumps(row.record(), separators=(",", ":")) + "\n")
        return

    def opt(value: Optional[float], fmt: str) -> str:
        return "-" if value is None else format(value, fmt)

    cells = [
        [
            r.mode,
            str(r.steps),
            f"{r.p50_ms:.3f}",
            f"{r.p90_ms:.3f}",
            f"{r.p99_ms:.3f}",
            opt(r.mean_batch_size, ".1f"),
            opt(r.tokens_per_s, ".1f"),
            f"{100 * r.time_share:.1f}%",
        ]
        for r in rows
    ]
    headers = ["MODE", "STEPS", "P50_MS", "P90_MS", "P99_MS", "MEAN_BS", "TOKENS/S", "TIME_SHARE"]
    out.write(table(headers, cells, [False] + [True] * 7) + "\n")


def plot_steps(steps: Sequence[StepSpan], path: str) -> None:
    """Step durations over time, one colour per mode, written to ``path`` (PNG, SVG, PDF...).

    Uses matplotlib's Agg canvas directly (no pyplot, no display needed). Raises ImportError
    when matplotlib is missing.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(10, 4.5), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 1, 1)
    t0 = min(s.start_ns for s in steps)
    by_mode: dict[str, list[StepSpan]] = {}
    for step in steps:
        by_mode.setdefault(step.mode, []).append(step)
    for mode in sorted(by_mode, key=_mode_order):
        chosen = by_mode[mode]
        axes.scatter(
            [(s.start_ns - t0) / 1e9 for s in chosen],
            [_ms(s.duration_ns) for s in chosen],
            s=8,
            label=f"{mode} ({len(chosen)})",
        )
    axes.set_xlabel(f"seconds since {local_time(t0)}")
    durations = [s.duration_ns for s in steps if s.duration_ns > 0]
    if durations and max(durations) > 50 * min(durations):
        axes.set_yscale("log")  # idle steps and slow prefills differ by orders of magnitude
    axes.set_ylabel("step duration (ms)")
    axes.set_title("otel_stepspan: step durations by mode")
    axes.grid(True, alpha=0.3)
    axes.legend(loc="best", fontsize="small")
    figure.tight_layout()
    figure.savefig(path)
