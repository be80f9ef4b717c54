"""``otel-stepspan demo``: run the reference engine on a synthetic workload and look at its steps.

Usage::

    otel-stepspan demo                      # or: python -m otel_stepspan.engine.demo
    # -> ./trace.json (open in https://ui.perfetto.dev) and ./spans.jsonl (OTLP/JSON)
    otel-stepspan stats --file spans.jsonl

With no OpenTelemetry backend configured, the step spans go to a local OTLP/JSON file through an
SDK tracer provider the demo sets up itself; with the standard ``OTEL_*`` export variables set
they go to the collector as well. The torch profiler runs around the whole workload, so the same
``step[...]`` labels appear in the Chrome trace and in the spans, step for step.

The engine traces its requests through the same provider, as a server with request tracing on
does: one span per request, and every step span links to the requests it computed, so
``otel-stepspan request <id> --file spans.jsonl`` shows the steps one request went through.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

from ..quantiles import percentile

DEFAULT_SERVICE_NAME = "otel-stepspan-demo"
MODES = ("idle", "prefill", "decode", "mixed")


# -- flags -------------------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1")
    return value


def _rate(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number (requests per second, or 'inf')") from None
    if math.isnan(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be > 0 (or 'inf': all requests at once)")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The demo's flags, on ``parser`` (the ``demo`` subcommand's, or the module's own)."""
    from .workload import LENGTH_DISTRIBUTIONS

    workload = parser.add_argument_group("workload (synthetic: random token ids, no text)")
    workload.add_argument(
        "--requests", type=_positive_int, default=40, metavar="N",
        help="requests to serve (default: %(default)s)",
    )
    workload.add_argument(
        "--rate", type=_rate, default=16.0, metavar="R",
        help="mean arrival rate in requests/s, Poisson arrivals; 'inf' sends all at once (default: %(default)s)",
    )
    workload.add_argument(
        "--prompt-len", type=_positive_int, default=96, metavar="MEAN",
        help="mean prompt length in tokens (default: %(default)s)",
    )
    workload.add_argument(
        "--output-len", type=_positive_int, default=48, metavar="MEAN",
        help="mean output length in tokens (default: %(default)s)",
    )
    workload.add_argument(
        "--length-dist", choices=LENGTH_DISTRIBUTIONS, default="exponential",
        help="distribution of prompt and output lengths, clipped at 4x the mean: exponential (a long tail, "
        "so long prompts get chunked), uniform (1 .. 2*MEAN-1) or fixed (default: %(default)s)",
    )
    workload.add_argument(
        "--seed", type=int, default=0,
        help="seeds the workload and the model weights (default: %(default)s)",
    )

    engine = parser.add_argument_group("engine (batches like sglang)")
    engine.add_argument(
        "--max-batch", type=_positive_int, default=16, metavar="N",
        help="most requests running at once, prefilling or decoding (default: %(default)s)",
    )
    engine.add_argument(
        "--token-budget", type=_positive_int, default=256, metavar="T",
        help="most tokens computed in one step, prompt chunks and decodes together; at least --max-batch "
        "(default: %(default)s)",
    )
    engine.add_argument(
        "--chunk-size", type=_positive_int, default=128, metavar="T",
        help="most prompt tokens of one request in one step; a longer prompt is prefilled in chunks over "
        "several steps (default: %(default)s)",
    )
    engine.add_argument(
        "--no-mixed", dest="mixed", action="store_false",
        help="run prompt chunks in steps of their own while the decodes wait, instead of mixing them into "
        "the running decodes (sglang without --enable-mixed-chunk); no 'mixed' steps then",
    )
    engine.add_argument(
        "--device", choices=("cpu", "cuda", "auto"), default="cpu",
        help="where the model runs; auto: CUDA when available (default: %(default)s)",
    )
    engine.add_argument(
        "--threads", type=_positive_int, default=1, metavar="N",
        help="torch CPU threads; the model is small, and more threads only add stalls on a busy machine "
        "(default: %(default)s)",
    )

    output = parser.add_argument_group("output")
    output.add_argument(
        "--out-dir", default=".", metavar="DIR",
        help="where the files go (default: the current directory)",
    )
    output.add_argument(
        "--trace-file", default="trace.json", metavar="FILE",
        help="the Chrome trace, relative to --out-dir; a name ending in .gz writes it compressed (Perfetto "
        "opens both) (default: %(default)s)",
    )
    output.add_argument(
        "--spans-file", default="spans.jsonl", metavar="FILE",
        help="the step spans as OTLP/JSON lines (the Collector file-exporter format), relative to --out-dir; "
        "replaced if it exists (default: %(default)s)",
    )
    output.add_argument(
        "--no-profiler", dest="profiler", action="store_false",
        help="do not run the torch profiler: no Chrome trace, and steps run faster",
    )
    output.add_argument(
        "--quiet", action="store_true",
        help="print nothing but errors: no progress bar, no summary",
    )
    parser.set_defaults(_demo_parser=parser)


def _usage_error(args: argparse.Namespace, message: str) -> int:
    """Report a bad combination of flags the way argparse reports a bad flag (usage, then
    ``prog: error: ...``, status 2), but by returning, so a caller's ``main`` keeps control."""
    parser = getattr(args, "_demo_parser", None)
    if parser is not None:
        parser.print_usage(sys.stderr)
        print(f"{parser.prog}: error: {message}", file=sys.stderr)
    else:
        print(f"error: {message}", file=sys.stderr)
    return 2


# -- tracing setup -----------------------------------------------------------------------------


def _closable_processor(inner: Any) -> Any:
    """``inner`` (a span processor) behind a processor that can be taken out of service: an SDK
    provider has no way to remove a processor, and a provider that outlives this run (one set
    before it) must not keep reporting a closed file's processor as failing to flush."""
    from opentelemetry.sdk.trace import SpanProcessor

    class ClosableProcessor(SpanProcessor):
        def __init__(self) -> None:
            self.inner = inner

        def on_start(self, span: Any, parent_context: Any = None) -> None:
            if self.inner is not None:
                self.inner.on_start(span, parent_context=parent_context)

        def on_end(self, span: Any) -> None:
            if self.inner is not None:
                self.inner.on_end(span)

        def force_flush(self, timeout_millis: int = 30000) -> bool:
            return self.inner.force_flush(timeout_millis) if self.inner is not None else True

        def shutdown(self) -> None:
            inner, self.inner = self.inner, None
            if inner is not None:
                inner.shutdown()

    return ClosableProcessor()


class _Tracing:
    """The tracer provider the step spans go to, and the local file exporter on it."""

    def __init__(self, spans_path: Path) -> None:
        from opentelemetry import trace
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        from ..otlp_json import OtlpJsonFileExporter
        from ..settings import read_settings
        from ..sinks import otel_provider

        self.remote: list[str] = []
        self.problems: list[str] = []
        self.disabled = read_settings().sdk_disabled
        self.file_processor = _closable_processor(BatchSpanProcessor(OtlpJsonFileExporter(spans_path)))
        existing = otel_provider.current_provider()
        if existing is not None:
            # Someone (opentelemetry-instrument, or an earlier run in this process) set the
            # process's provider: keep its exporters and add the file next to them.
            self.provider = existing
            self.owned = False
            if hasattr(existing, "add_span_processor"):
                existing.add_span_processor(self.file_processor)
                self.remote.append("the tracer provider already set in this process")
            else:
                self.problems.append(
                    f"the process's tracer provider ({type(existing).__name__}) takes no span processors; "
                    "no local spans file"
                )
            return
        self.owned = True
        self.provider = TracerProvider(resource=_resource())
        self.provider.add_span_processor(self.file_processor)
        if not self.disabled:
            try:
                added = otel_provider.add_env_exporters(self.provider, os.environ)
            except otel_provider.ExportConfigError as exc:
                self.problems.append(f"not exporting to a collector: {exc}")
            else:
                self.remote.extend(_describe_exporter(name) for name in added)
        trace.set_tracer_provider(self.provider)

    def close(self) -> bool:
        """Export what is pending everywhere; close the local file."""
        import otel_stepspan

        ok = otel_stepspan.flush(30.0, end_timelines=True)  # the last window's root too
        ok = self.file_processor.force_flush(30_000) and ok
        self.file_processor.shutdown()
        return ok


def _resource() -> Any:
    """The SDK's resource from OTEL_SERVICE_NAME / OTEL_RESOURCE_ATTRIBUTES, named after the demo
    when neither names the service."""
    from opentelemetry.sdk.resources import Resource

    resource = Resource.create({"process.pid": os.getpid()})
    if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
        resource = resource.merge(Resource({"service.name": DEFAULT_SERVICE_NAME}))
    return resource


def _describe_exporter(name: str) -> str:
    if name != "otlp":
        return f"the {name} exporter (OTEL_TRACES_EXPORTER)"
    endpoint = (
        os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "").strip()
        or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip()
        or "the default OTLP endpoint"
    )
    protocol = (
        os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "").strip()
        or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL", "").strip()
        or "grpc"
    )
    return f"OTLP {protocol} at {endpoint}"


# -- progress and summary ----------------------------------------------------------------------


class _Progress:
    """One stderr line, redrawn with ``\\r`` at most ten times a second; only on a terminal."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total = total
        self.enabled = enabled and sys.stderr.isatty()
        self.started = time.monotonic()
        self.last = 0.0
        self.steps = 0

    def __call__(self, step: Any, finished: int) -> None:
        self.steps += 1
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self.last < 0.1 and finished < self.total:
            return
        self.last = now
        width = 30
        filled = width * finished // max(1, self.total)
        bar = "#" * filled + "." * (width - filled)
        sys.stderr.write(f"\r[{bar}] {finished}/{self.total} requests, {self.steps} steps, {now - self.started:.1f} s ")
        sys.stderr.flush()

    def done(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")
            sys.stderr.flush()


def summary_table(steps: Sequence[Any]) -> str:
    """Per mode: steps, p50/p90/p99 forward duration (ms), tokens computed per second of forward."""
    header = f"{'mode':<8} {'steps':>6} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'tokens/s':>10}"
    lines = [header, "-" * len(header)]
    groups = [(mode, [s for s in steps if s.mode == mode]) for mode in MODES]
    others = sorted({s.mode for s in steps} - set(MODES))
    groups += [(mode, [s for s in steps if s.mode == mode]) for mode in others]
    groups.append(("all", list(steps)))
    for mode, group in groups:
        durations = [s.duration_s * 1e3 for s in group]
        tokens = sum(s.num_tokens for s in group)
        seconds = sum(s.duration_s for s in group)
        rate = f"{tokens / seconds:,.0f}" if tokens and seconds > 0 else "-"
        durations.sort()
        cells = [f"{percentile(durations, q):8.2f}" if group else f"{'-':>8}" for q in (0.5, 0.9, 0.99)]
        lines.append(f"{mode:<8} {len(group):>6} {' '.join(cells)} {rate:>10}")
    return "\n".join(lines)


def _requests_line(result: Any) -> str:
    reqs = result.requests
    outputs = sum(r.output_len for r in reqs)
    ttft = sorted(r.ttft_s * 1e3 for r in reqs)
    chunked = sum(1 for r in reqs if r.prefill_chunks > 1)
    return (
        f"{len(reqs)} requests in {result.wall_s:.2f} s: {outputs} output tokens "
        f"({outputs / result.wall_s:,.0f} tok/s), TTFT p50 {percentile(ttft, 0.5):.1f} ms "
        f"p90 {percentile(ttft, 0.9):.1f} ms, {chunked} prompts prefilled in chunks"
    )


def _shown(path: Path) -> str:
    """``path`` relative to the current directory when it is inside it, else absolute."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path.resolve())


def _size(path: Path) -> str:
    size = path.stat().st_size
    return f"{size / 1e6:.1f} MB" if size >= 1e5 else f"{size / 1e3:.1f} kB"


# -- the run -----------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    """Run the demo as configured by :func:`add_arguments`'s flags. Returns the exit status."""
    if args.token_budget < args.max_batch:
        return _usage_error(
            args,
            f"--token-budget ({args.token_budget}) must be at least --max-batch ({args.max_batch}): "
            "a full batch of decodes must fit in one step",
        )

    import torch

    from .engine import Engine, EngineConfig, resolve_device
    from .workload import WorkloadConfig, make_workload

    try:
        device = resolve_device(args.device)
    except ValueError as exc:
        return _usage_error(args, f"--device {args.device}: {exc}")
    if device.type == "cpu":
        torch.set_num_threads(args.threads)

    out_dir = Path(args.out_dir)
    trace_path = out_dir / args.trace_file
    spans_path = out_dir / args.spans_file
    try:
        for path in (trace_path, spans_path) if args.profiler else (spans_path,):
            path.parent.mkdir(parents=True, exist_ok=True)
        if spans_path.exists():
            spans_path.unlink()  # the exporter appends; a rerun must not mix two runs
    except OSError as exc:
        print(f"error: cannot write to {exc.filename}: {exc.strerror}", file=sys.stderr)
        return 1

    workload = WorkloadConfig(
        requests=args.requests,
        rate=args.rate,
        prompt_len=args.prompt_len,
        output_len=args.output_len,
        length_dist=args.length_dist,
        seed=args.seed,
    )
    config = EngineConfig(
        max_running=args.max_batch,
        token_budget=args.token_budget,
        chunk_size=args.chunk_size,
        mixed=args.mixed,
        device=str(device),
        vocab_size=workload.vocab_size,
        max_context=workload.max_prompt_len() + workload.max_output_len(),
        model_seed=args.seed,
    )
    specs = make_workload(workload)
    # One small untraced run first: torch's first calls of each kernel are slow, and would
    # otherwise show as a first prefill a hundred times too long.
    from opentelemetry.instrumentation.utils import suppress_instrumentation

    warm_up = WorkloadConfig(requests=2, rate=math.inf, prompt_len=8, output_len=2, length_dist="fixed", seed=args.seed)
    with suppress_instrumentation():
        Engine(config).run(make_workload(warm_up))
    tracing = _Tracing(spans_path)
    for problem in tracing.problems:
        print(f"warning: {problem}", file=sys.stderr)
    if tracing.disabled and not args.quiet:
        print("warning: OTEL_SDK_DISABLED=true: no step spans are recorded", file=sys.stderr)

    from ..version import __version__

    engine = Engine(config, request_tracer=tracing.provider.get_tracer("otel_stepspan.engine", __version__))
    progress = _Progress(len(specs), enabled=not args.quiet)
    if args.profiler:
        activities = [torch.profiler.ProfilerActivity.CPU]
        if device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        else:
            # Without a GPU, kineto logs an ERROR about counting GPUs that only alarms.
            os.environ.setdefault("KINETO_LOG_LEVEL", "5")
        with torch.profiler.profile(activities=activities) as profiler:
            result = engine.run(specs, on_step=progress)
        progress.done()
        profiler.export_chrome_trace(str(trace_path))
    else:
        result = engine.run(specs, on_step=progress)
        progress.done()
    exported = tracing.close()

    from ..otlp_json import iter_step_spans

    written = sum(1 for _ in iter_step_spans(spans_path)) if spans_path.exists() else 0
    if not args.quiet:
        print(summary_table(result.steps))
        print(_requests_line(result))
        if device.type == "cuda":
            print(
                "(on CUDA a step's time is the forward call on the CPU: the GPU finishes at sampling; "
                "OTEL_STEPSPAN_GPU_TIMING=1 times the spans with CUDA events)"
            )
        print()
        if args.profiler:
            print(f"Chrome trace: {_shown(trace_path)} ({_size(trace_path)})")
            print("  open it at https://ui.perfetto.dev (Open trace file) and search for step[")
        print(f"Step spans:   {_shown(spans_path)} ({written} spans, OTLP/JSON lines)")
        print(f"  otel-stepspan stats --file {_shown(spans_path)}")
        if result.requests:
            slowest = max(result.requests, key=lambda r: r.latency_s)
            print(f"  otel-stepspan request {slowest.rid} --file {_shown(spans_path)}   # the slowest request's steps")
        for target in tracing.remote:
            print(f"Also sent to: {target}")
    if not exported:
        print("warning: not every step span could be exported in time", file=sys.stderr)
    if written != len(result.steps) and not tracing.disabled:
        print(f"warning: {len(result.steps)} steps ran, {written} step spans reached {spans_path}", file=sys.stderr)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m otel_stepspan.engine.demo",
        description="Run the reference engine on a synthetic workload; write a Chrome trace and the step spans.",
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
