"""Where ``search`` and ``stats`` read steps from: a Jaeger query API, or a local OTLP/JSON file."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Optional

from ..otlp_json import StepSpan, iter_step_spans
from ._filters import DEFAULT_SINCE_NS, StepFilter, go_duration
from .jaeger import JaegerClient, JaegerError, is_jaeger_own

class SourceError(Exception):
    """The steps could not be read; the message is for the user (exit status 2)."""


def load_steps(args: argparse.Namespace, step_filter: StepFilter, *, search_depth: int) -> list[StepSpan]:
    """Every step the filter selects, once each, in start-time order."""
    if args.file:
        return step_filter.apply(_read_file(Path(args.file)))
    return step_filter.apply(_ask_jaeger(args, step_filter, search_depth))


def _read_file(path: Path) -> list[StepSpan]:
    try:
        with open(path, encoding="utf-8") as handle:
            return list(iter_step_spans(handle))
    except FileNotFoundError:
        raise SourceError(f"no such spans file: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SourceError(f"cannot read {path}: {exc}") from None
    except ValueError as exc:
        raise SourceError(f"{path} is not OTLP/JSON lines: {exc}") from None


def _ask_jaeger(args: argparse.Namespace, step_filter: StepFilter, search_depth: int) -> list[StepSpan]:
    client = JaegerClient(args.jaeger, timeout_s=args.timeout)
    try:
        services = list(step_filter.services)
        if not services:
            services = [name for name in client.services() if not is_jaeger_own(name)]
            _verbose(args, f"services in Jaeger (its own left out): {', '.join(services) or 'none'}")
        now_ns = time.time_ns()
        start_min = step_filter.start_min_ns if step_filter.start_min_ns is not None else now_ns - DEFAULT_SINCE_NS
        start_max = step_filter.start_max_ns if step_filter.start_max_ns is not None else now_ns
        # One query per mode: the attribute filter holds one value per key. Jaeger releases that
        # ignore query.attributes return every mode; the filter sorts them out afterwards.
        modes: list[Optional[str]] = list(step_filter.modes) or [None]
        steps: list[StepSpan] = []
        for service in services:
            for mode in modes:
                documents = client.find_traces(
                    service,
                    start_min,
                    start_max,
                    search_depth=search_depth,
                    attributes={"forward.mode": mode} if mode else None,
                    duration_min=_duration(step_filter.min_duration_ns),
                    duration_max=_duration(step_filter.max_duration_ns),
                )
                steps.extend(iter_step_spans(documents))
    except JaegerError as exc:
        raise SourceError(str(exc)) from None
    except ValueError as exc:
        raise SourceError(f"Jaeger at {client.base_url} answered something that is not OTLP/JSON: {exc}") from None
    finally:
        for url in client.requested:
            _verbose(args, f"GET {url}")
    return steps


def _duration(ns: Optional[int]) -> Optional[str]:
    return go_duration(ns) if ns is not None else None


def _verbose(args: argparse.Namespace, message: str) -> None:
    if getattr(args, "verbose", False):
        print(f"otel-stepspan: {message}", file=sys.stderr)
