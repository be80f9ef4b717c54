"""``otel-stepspan``: find, summarise and produce step spans.

Subcommands: ``demo`` (the reference engine), ``search`` (matching steps, one a line),
``stats`` (per-mode percentiles and throughput, optionally a plot), ``request`` (the steps one
request went through), ``timeline`` (an engine's windows of steps, drawn as a waterfall), ``run``
(any engine command with step spans on, no code change). ``otel-stepspan <command> --help`` explains each flag.

Exit status: 0 on success (also when nothing matched), 2 for a usage error or an unreachable or
unreadable source, the command's own status for ``run``, 1 from ``doctor`` when something is off.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Optional, Sequence

from ..version import __version__
from ._filters import duration_arg

_FORMATTER = argparse.RawDescriptionHelpFormatter

_MAIN_EPILOG = """\
examples:
  otel-stepspan demo                                  # the reference engine, producing steps
  otel-stepspan search --mode decode --min-bs 8       # recent decode steps of batch size >= 8
  otel-stepspan search --mode prefill --min-duration 50ms --since 15m
  otel-stepspan stats --plot steps.png                # per-mode table and a scatter plot
  otel-stepspan request 4bf92f3577b34da6a3ce929d0e0e4736   # the steps of one traced request
  otel-stepspan timeline --since 5m                   # the engines' windows of steps
  otel-stepspan doctor                                # does the engine still have what we patch?
  OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:4317 \\
    otel-stepspan run -- python -m sglang.launch_server --model-path Qwen/Qwen2.5-0.5B-Instruct

Backends: `docker compose up -d` starts the Collector (OTLP on 127.0.0.1:4317/4318) and Jaeger
(UI and query API on http://127.0.0.1:16686), which search and stats read by default.
"""

_SOURCE_HELP = """\
where the steps come from:
  By default the Jaeger query API v3 at --jaeger (http://127.0.0.1:16686), over the last --since
  (1h). Without --service, every service Jaeger knows is searched except Jaeger's own
  (jaeger, jaeger-*). Jaeger finds traces, not spans, and 2.13 ignores attribute filters over HTTP,
  so up to --search-depth traces per service and mode are fetched and every filter is applied
  again here.
  With --file, an OTLP/JSON lines file (the Collector's `file` exporter output, or
  otel_stepspan.otlp_json.OtlpJsonFileExporter's) is read instead; there --since applies only
  when given.

durations are a number and a unit: 250us, 5ms, 1.5s, 2m, 1h (ns, us, ms, s, m, h).
"""

_SEARCH_EPILOG = _SOURCE_HELP + """
output: one line per step, oldest first: local time (ms), label, duration (ms), service,
trace id. With --limit N (default 20) only the N most recent matches are shown. With --json,
one JSON object per line (time, start_unix_nano, duration_ms, label, mode, batch_size,
num_tokens, service, trace_id, span_id, attributes). Nothing matched: "no matching steps" on
stderr, exit status 0.

examples:
  otel-stepspan search --mode decode
  otel-stepspan search --mode prefill,mixed --min-duration 20ms --since 10m
  otel-stepspan search --mode decode --min-bs 32 --max-bs 64 --service sglang --limit 100
  otel-stepspan search --file spans.jsonl --mode verify --json | jq .duration_ms
"""

_STATS_EPILOG = _SOURCE_HELP + """
output: one row per mode, then `all`: STEPS, P50_MS/P90_MS/P99_MS (step duration percentiles,
linear interpolation), MEAN_BS (mean forward.batch_size), TOKENS/S (sum of forward.num_tokens
over the summed durations of those steps), TIME_SHARE (the mode's share of all step time).
--json prints one JSON object per row instead.

examples:
  otel-stepspan stats
  otel-stepspan stats --since 5m --service sglang --plot steps.png
  otel-stepspan stats --file spans.jsonl --mode decode,prefill --json
"""

_REQUEST_EPILOG = _SOURCE_HELP + """
how the request is found: every step span links to the trace context of each traced request it
computed (link attributes request.id, forward.request.work = prefill | decode | verify,
forward.request.tokens; from Jaeger, which drops link attributes, the step's arrays
forward.request_ids / _work / _tokens). With a trace id, the request's own trace is read first
(when the engine exports its request spans to the same place): its request.steps report names
the windows to read (else its start and end bound the search), and its start gives the time
queued before its first step. With a request id, the --since window is searched;
the id a client gave vLLM also finds the engine's own id for it (the client's id, a dash and 8
hex characters), unless it names several engine requests (then they are listed).

output: one row per step (AT_MS: since the request started; WORK and TOKENS: what the step did
for this request; STEP: the step's label and batch size), runs of decode steps folded unless
--all; then where the wall time went (queued, prefill, decode, verify, between steps), the
slowest steps, and prompt work after decoding (a preempted request recomputed). --json prints the
report as one JSON object.

examples:
  otel-stepspan request 4bf92f3577b34da6a3ce929d0e0e4736
  otel-stepspan request req-17 --file spans.jsonl --all
  otel-stepspan request 4bf92f3577b34da6a3ce929d0e0e4736 --plot request.png --since 6h
"""

_TIMELINE_EPILOG = _SOURCE_HELP + """
output: without TRACE_ID, one row per window (START, SERVICE, STEPS, BY_MODE, DURATION_MS,
TRACE_ID), oldest first; with TRACE_ID, one row per step: AT_MS from the window's start, MS its
duration, its bar on the window's time axis (gaps are idle time), its label. --json prints the
windows as JSON lines.

examples:
  otel-stepspan timeline --service sglang --since 5m
  otel-stepspan timeline 0af7651916cd43dd8448eb211c80319c --plot window.png
  otel-stepspan timeline --file spans.jsonl
"""

_RUN_EPILOG = """\
how it works:
  The command and every Python process it starts (engine workers started with spawn or fork
  included) import a sitecustomize that run puts first on PYTHONPATH. It installs the sglang
  (ModelRunner.forward) and vLLM step-span instrumentation, then chains to any sitecustomize
  that would have been imported otherwise (so `opentelemetry-instrument` keeps working, before
  or after run). Python started with -S, -I or -E ignores it.

  Export is configured as usual by the OTEL_* variables, inherited by all processes:
  OTEL_EXPORTER_OTLP_ENDPOINT (e.g. http://127.0.0.1:4317), OTEL_TRACES_EXPORTER (otlp, console),
  OTEL_SERVICE_NAME, OTEL_STEPSPAN_SPAN_NAME=mode, ... One line on stderr says what is on.

  run replaces itself with the command (exec): its exit status and every signal are the
  command's own. With --no-exec, otel-stepspan stays the parent, forwards SIGINT, SIGTERM and
  SIGHUP to it and exits with its status.

examples:
  otel-stepspan run --endpoint http://127.0.0.1:4317 --service-name sglang -- \\
      python -m sglang.launch_server --model-path Qwen/Qwen2.5-0.5B-Instruct
  OTEL_TRACES_EXPORTER=console otel-stepspan run -- python my_engine.py
  otel-stepspan run -- vllm serve facebook/opt-125m
"""


def _add_source_and_filters(parser: argparse.ArgumentParser, *, depth: int) -> None:
    _add_source(parser, depth=depth)
    _add_filters(parser)


def _add_source(parser: argparse.ArgumentParser, *, depth: int) -> None:
    source = parser.add_argument_group("source")
    choice = source.add_mutually_exclusive_group()
    choice.add_argument(
        "--jaeger",
        metavar="URL",
        default="http://127.0.0.1:16686",
        help="Jaeger query base URL (default: %(default)s), e.g. --jaeger http://jaeger.internal:16686",
    )
    choice.add_argument(
        "--file",
        metavar="PATH",
        help="read an OTLP/JSON lines spans file instead of Jaeger, e.g. --file spans.jsonl",
    )
    source.add_argument(
        "--service",
        action="append",
        metavar="NAME",
        help="only this service (repeatable, or a comma list), e.g. --service sglang; default: "
        "every service in Jaeger except Jaeger's own, every service in a file",
    )
    source.add_argument(
        "--since",
        type=duration_arg,
        metavar="DURATION",
        help="only steps that started within this long before now, e.g. --since 15m "
        "(default: 1h for Jaeger; all of a --file)",
    )
    source.add_argument(
        "--search-depth",
        type=int,
        default=depth,
        metavar="N",
        help="Jaeger: traces to fetch per service and mode (query.num_traces; default: %(default)s). "
        "Raise it when steps are missing from a busy window",
    )
    source.add_argument(
        "--timeout",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="Jaeger: seconds to wait for each answer (default: %(default)s)",
    )
    source.add_argument("-v", "--verbose", action="store_true", help="print each Jaeger request on stderr")
    parser.add_argument("--json", action="store_true", help="print JSON lines instead of a table")


def _add_filters(parser: argparse.ArgumentParser) -> None:
    filters = parser.add_argument_group("filters")
    filters.add_argument(
        "--mode",
        action="append",
        metavar="MODE",
        help="only these step modes (repeatable, or a comma list): idle, decode, prefill, mixed, "
        "verify, draft, draft_extend, or any engine mode, e.g. --mode decode --mode prefill,mixed",
    )
    filters.add_argument("--min-bs", type=int, metavar="N", help="batch size at least N, e.g. --min-bs 8")
    filters.add_argument("--max-bs", type=int, metavar="N", help="batch size at most N, e.g. --max-bs 64")
    filters.add_argument(
        "--min-duration", type=duration_arg, metavar="DURATION", help="steps lasting at least this, e.g. --min-duration 5ms"
    )
    filters.add_argument(
        "--max-duration", type=duration_arg, metavar="DURATION", help="steps lasting at most this, e.g. --max-duration 1.5s"
    )
    filters.add_argument(
        "--request",
        metavar="ID",
        help="only the steps that computed this request: its trace id (32 hex digits) or its request id, "
        "e.g. --request 4bf92f3577b34da6a3ce929d0e0e4736 (needs an engine that traces requests)",
    )


def build_parser(demo_module: Optional[object] = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="otel-stepspan",
        description="Every forward step of an LLM inference engine as a span: find them,\n"
        "summarise them, and turn them on in any engine.",
        epilog=_MAIN_EPILOG,
        formatter_class=_FORMATTER,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    demo = commands.add_parser(
        "demo",
        help="run the project's reference engine, which emits step spans",
        description="Run the reference engine (otel_stepspan.engine): a small model served by a\n"
        "scheduler loop whose every forward is a step span. Its own flags follow.",
        formatter_class=_FORMATTER,
    )
    if demo_module is not None:
        demo_module.add_arguments(demo)  # type: ignore[attr-defined]

    search = commands.add_parser(
        "search",
        help="list the steps that match a mode, batch size, duration",
        description="List the step spans that match the filters, oldest first.",
        epilog=_SEARCH_EPILOG,
        formatter_class=_FORMATTER,
    )
    _add_source_and_filters(search, depth=1000)
    search.add_argument(
        "--limit",
        type=int,
        default=20,
        metavar="N",
        help="show the N most recent matches (default: %(default)s; 0: all)",
    )

    stats = commands.add_parser(
        "stats",
        help="per-mode step statistics: percentiles, batch size, tokens/s, time share",
        description="Per-mode statistics of the step spans that match the filters.",
        epilog=_STATS_EPILOG,
        formatter_class=_FORMATTER,
    )
    _add_source_and_filters(stats, depth=5000)
    stats.add_argument(
        "--plot",
        metavar="PATH",
        help="also draw step durations over time, one colour per mode, to this image "
        "(PNG, SVG or PDF by extension; needs matplotlib: pip install 'otel_stepspan[plot]'), "
        "e.g. --plot steps.png",
    )

    request = commands.add_parser(
        "request",
        help="the steps one request went through, and where its time went",
        description="The steps that computed one request, in order: time queued before its first\n"
        "step, each prefill chunk, its decode steps, recomputes after preemption, and where its\n"
        "wall time went. Needs an engine that traces requests (sglang --enable-trace, vLLM\n"
        "--otlp-traces-endpoint): each step span then links to the requests it computed.",
        epilog=_REQUEST_EPILOG,
        formatter_class=_FORMATTER,
    )
    request.add_argument("id", metavar="ID", help="the request's trace id (32 hex digits) or its request id")
    _add_source(request, depth=1000)
    request.add_argument("--all", action="store_true", help="one row for every step (long decode runs are folded otherwise)")
    request.add_argument(
        "--plot",
        metavar="PATH",
        help="also draw the request's steps on a time line (PNG, SVG or PDF; needs matplotlib), e.g. --plot req.png",
    )

    timeline = commands.add_parser(
        "timeline",
        help="engine timeline traces: list the windows of steps, or draw one as a waterfall",
        description="Each engine process's steps gather under a `timeline` root span per window\n"
        "of steps. Without TRACE_ID, list the windows; with one, draw that window's steps as a\n"
        "waterfall (as Jaeger's trace view does), in the terminal or with --plot as a picture.",
        epilog=_TIMELINE_EPILOG,
        formatter_class=_FORMATTER,
    )
    timeline.add_argument("trace_id", nargs="?", metavar="TRACE_ID", help="a timeline trace's id (32 hex digits)")
    _add_source(timeline, depth=200)
    timeline.add_argument("--limit", type=int, default=20, metavar="N",
                          help="list the N most recent windows (default: %(default)s; 0: all)")
    timeline.add_argument("--plot", metavar="PATH",
                          help="with TRACE_ID: draw the waterfall to this image (PNG, SVG or PDF; needs matplotlib)")

    run = commands.add_parser(
        "run",
        help="run an engine command with step spans on in all its Python processes",
        description="Run CMD (sglang, vLLM, any Python engine) with step-span instrumentation\n"
        "active in it and in every Python process it starts, with no code change.",
        usage="otel-stepspan run [-h] [--service-name NAME] [--endpoint URL] [--no-exec] [-q] -- CMD [ARG ...]",
        epilog=_RUN_EPILOG,
        formatter_class=_FORMATTER,
    )
    run.add_argument(
        "--service-name",
        metavar="NAME",
        help="set OTEL_SERVICE_NAME for the command, e.g. --service-name sglang",
    )
    run.add_argument(
        "--endpoint",
        metavar="URL",
        help="set OTEL_EXPORTER_OTLP_ENDPOINT for the command, e.g. --endpoint http://127.0.0.1:4317 "
        "(gRPC; for HTTP also set OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf and port 4318)",
    )
    run.add_argument(
        "--no-exec",
        action="store_true",
        help="stay the parent process: forward SIGINT/SIGTERM/SIGHUP to CMD, exit with its status",
    )
    run.add_argument("-q", "--quiet", action="store_true", help="do not print the note on stderr")
    run.add_argument("cmd", nargs=argparse.REMAINDER, metavar="CMD", help="the command, after --")

    doctor = commands.add_parser(
        "doctor",
        help="check the installed engine's patch points and where spans would go",
        description="For each supported engine installed in this Python (sglang, vLLM): its version\n"
        "against the range otel_stepspan was tested with, and each place the integration patches,\n"
        "found or not (read from the engine's source, so no GPU is needed). Then where step spans\n"
        "would go with the current OTEL_* variables, and whether the Collector answers.",
        epilog=_DOCTOR_EPILOG,
        formatter_class=_FORMATTER,
    )
    doctor.add_argument("--engine", choices=("sglang", "vllm"), help="check this engine only")
    doctor.add_argument("--import", dest="by_import", action="store_true",
                        help="import the engine's modules and check the loaded classes (slower; needs "
                        "an engine that imports on this machine) instead of reading their source")
    doctor.add_argument("--json", action="store_true", help="one JSON object instead of lines")
    doctor.add_argument("--timeout", type=float, default=3.0, metavar="SECONDS",
                        help="how long to wait for the Collector (default: %(default)s)")
    return parser


_DOCTOR_EPILOG = """\
output: per engine, "found" or "PROBLEM" for each patch point, with what a problem costs
(e.g. no step spans for the forwards); then "spans go to" and "collector: answers" or
"DOES NOT ANSWER" for the OTLP endpoint the variables name (an empty export is sent).

exit status: 0 when all is well; 1 when a patch point is missing or reshaped, the version is
outside the tested range, the Collector does not answer, or no supported engine is installed.
Run it with the engine's own Python and the same OTEL_* variables as the engine.

examples:
  otel-stepspan doctor
  OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:4317 otel-stepspan doctor --engine sglang
"""


def _load_demo() -> object:
    import importlib

    try:
        module = importlib.import_module("otel_stepspan.engine.demo")
    except ModuleNotFoundError as exc:
        if exc.name in ("otel_stepspan.engine", "otel_stepspan.engine.demo"):
            raise _DemoMissing(
                "otel-stepspan demo: the reference engine (otel_stepspan.engine.demo) is not part "
                "of this installation"
            ) from None
        raise _DemoMissing(
            f"otel-stepspan demo: the reference engine needs {exc.name!r}, which is not installed "
            f"({exc})"
        ) from None
    for name in ("add_arguments", "run"):
        if not callable(getattr(module, name, None)):
            raise _DemoMissing(f"otel-stepspan demo: otel_stepspan.engine.demo has no {name}()")
    return module


class _DemoMissing(Exception):
    pass


def _load(args: argparse.Namespace, command: str) -> "list | int":
    """The steps that match the flags, or the exit status when there are none to show: 2 (with
    the reason) for a source that cannot be read, 0 (saying so) for no match."""
    from ._filters import filter_from_args
    from ._sources import SourceError, load_steps
    from .report import NO_MATCH

    try:
        steps = load_steps(args, filter_from_args(args), search_depth=args.search_depth)
    except SourceError as exc:
        print(f"otel-stepspan {command}: {exc}", file=sys.stderr)
        return 2
    if not steps:
        print(NO_MATCH, file=sys.stderr)
        return 0
    return steps


def _search(args: argparse.Namespace) -> int:
    from .report import print_steps

    steps = _load(args, "search")
    if isinstance(steps, int):
        return steps
    if args.limit and args.limit > 0:
        steps = steps[-args.limit :]
    print_steps(steps, sys.stdout, as_json=args.json)
    return 0


def _stats(args: argparse.Namespace) -> int:
    from .report import mode_stats, plot_steps, print_stats

    steps = _load(args, "stats")
    if isinstance(steps, int):
        return steps
    print_stats(mode_stats(steps), sys.stdout, as_json=args.json)
    return _write_plot("stats", lambda: plot_steps(steps, args.plot), args.plot) if args.plot else 0


def _write_plot(command: str, draw: Callable[[], None], path: str) -> int:
    """Draw a picture to ``path``; the exit status, with the reason when it cannot be done."""
    try:
        draw()
    except ImportError:
        print(
            f"otel-stepspan {command}: --plot needs matplotlib: pip install 'otel_stepspan[plot]' "
            "(or pip install matplotlib)",
            file=sys.stderr,
        )
        return 2
    except (OSError, ValueError) as exc:
        print(f"otel-stepspan {command}: cannot write {path}: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {path}", file=sys.stderr)
    return 0


def _request(args: argparse.Namespace) -> int:
    from ._filters import filter_from_args
    from ._sources import SourceError, load_request
    from .request import AmbiguousRequestId, plot_report, print_report, summarise
    from ..settings import read_settings

    try:
        steps, root = load_request(
            args,
            args.id.strip(),
            filter_from_args(args),
            search_depth=args.search_depth,
            timeline_s=read_settings().timeline.max_seconds,
        )
    except (SourceError, AmbiguousRequestId) as exc:
        print(f"otel-stepspan request: {exc}", file=sys.stderr)
        return 2
    if not steps:
        print(
            f"no step linked to request {args.id}: is the engine tracing requests (sglang --enable-trace, "
            "vLLM --otlp-traces-endpoint), and is the time window (--since) right?",
            file=sys.stderr,
        )
        return 0
    summary = summarise(args.id.strip(), steps, root)
    print_report(summary, steps, sys.stdout, as_json=args.json, every_step=args.all)
    return _write_plot("request", lambda: plot_report(summary, steps, args.plot), args.plot) if args.plot else 0


def _timeline(args: argparse.Namespace) -> int:
    from ._filters import filter_from_args
    from ._sources import SourceError, load_timelines
    from .timeline import plot_waterfall, print_waterfall, print_windows, windows

    trace_id = args.trace_id.strip().lower() if args.trace_id else None
    try:
        found = windows(load_timelines(args, trace_id, filter_from_args(args), search_depth=args.search_depth))
    except SourceError as exc:
        print(f"otel-stepspan timeline: {exc}", file=sys.stderr)
        return 2
    if not found:
        what = f"trace {trace_id} is not a timeline trace, or is not there" if trace_id else "no timeline trace found"
        print(f"{what} (timelines need OTEL_STEPSPAN_TIMELINE on, the default; check --since and --service)",
              file=sys.stderr)
        return 0
    if not trace_id:
        print_windows(found[-args.limit:] if args.limit > 0 else found, sys.stdout, as_json=args.json)
        return 0
    print_waterfall(found[0], sys.stdout)
    return _write_plot("timeline", lambda: plot_waterfall(found[0], args.plot), args.plot) if args.plot else 0


def _range_problem(args: argparse.Namespace) -> Optional[str]:
    if args.search_depth < 1:
        return "--search-depth must be at least 1"
    if args.command == "request":
        return None if args.id.strip() else "the request ID is empty"
    if args.command == "timeline":
        if args.plot and not args.trace_id:
            return "--plot draws one window: give its TRACE_ID"
        return None
    if args.min_bs is not None and args.max_bs is not None and args.min_bs > args.max_bs:
        return "--min-bs is larger than --max-bs"
    if args.min_duration is not None and args.max_duration is not None and args.min_duration > args.max_duration:
        return "--min-duration is longer than --max-duration"
    return None


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    demo_module = None
    if argv[:1] == ["demo"]:
        try:
            demo_module = _load_demo()
        except _DemoMissing as exc:
            print(exc, file=sys.stderr)
            return 2
    parser = build_parser(demo_module)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, usage errors: argparse's own status
        return int(exc.code or 0) if not isinstance(exc.code, str) else 2
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    if args.command == "demo":
        return int(demo_module.run(args) or 0)  # type: ignore[union-attr]
    if args.command == "run":
        from .run import run

        return run(args)
    if args.command == "doctor":
        from . import doctor

        return doctor.run(args.engine, args.by_import, args.json, args.timeout)
    problem = _range_problem(args)
    if problem:
        print(f"otel-stepspan {args.command}: error: {problem}", file=sys.stderr)
        return 2
    if args.command == "search":
        return _search(args)
    if args.command == "request":
        return _request(args)
    if args.command == "timeline":
        return _timeline(args)
    return _stats(args)


if __name__ == "__main__":
    sys.exit(main())
