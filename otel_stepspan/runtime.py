"""The step span: which sinks are on, and the hot path around one forward.

The hot path is the product. When no profiler runs and OpenTelemetry is off, a traced forward
costs three cheap reads (is the profiler on, has anyone set a tracer provider, does the
environment ask for export) and calls the forward: no label, no dict, no OTel object. Everything
else is decided once and cached: the first step with a provider in place builds the OTel sink;
a provider set later (by the engine, after our first step) is noticed because its identity
changes.
"""

from __future__ import annotations

import atexit
import contextvars
import functools
import logging
import os
import sys
import threading
import time
from typing import Any, Callable, Mapping, NamedTuple, Optional, Union

from opentelemetry import context as _otel_context
from opentelemetry import trace as _trace_api
from opentelemetry.context import _SUPPRESS_INSTRUMENTATION_KEY as _SUPPRESS_KEY
from opentelemetry.instrumentation.utils import _SUPPRESS_INSTRUMENTATION_KEY_PLAIN as _SUPPRESS_KEY_PLAIN

from .settings import ExportConfigError, Settings, otlp_protocol, read_settings
from .sinks import nvtx as _nvtx
from .sinks import profiler as _profiler
from .sinks.gpu_timing import GpuStepTimer, cuda_timer
from .sinks.otel import DeferredSpanSink
from .sinks.otel_process import ExporterProcessSink
from .sinks.otel_provider import current_provider, provider_link_limit, resolve_provider
from .sinks.provider_export import NotOtlp, provider_export
from .step import AttributeValue, StepInfo, unknown_step

logger = logging.getLogger("otel_stepspan")

try:  # built from otel_stepspan/_stepcall.c; without a compiler the Python wrapper does it all
    from . import _stepcall
except ImportError:  # pragma: no cover - the build is optional
    _stepcall = None

Capture = Callable[..., Any]
Finish = Callable[[Any], StepInfo]
Sink = Union[DeferredSpanSink, ExporterProcessSink]

_time_ns = time.time_ns


def _current_context_getter() -> Callable[[], Any]:
    """OpenTelemetry's ``context.get_current`` as one C call where the runtime context is the
    default one (a ``ContextVar`` with a default): two Python frames fewer on every traced step,
    which counts when the step runs with cold caches. Any other runtime context keeps the API's."""
    runtime_context = getattr(_otel_context, "_RUNTIME_CONTEXT", None)
    variable = getattr(runtime_context, "_current_context", None)
    if type(runtime_context).__name__ == "ContextVarsRuntimeContext" and isinstance(variable, contextvars.ContextVar):
        return variable.get
    return _otel_context.get_current


_get_current = _current_context_getter()


class _State:
    """Process-wide decisions, re-made only when their inputs change."""

    def __init__(self) -> None:
        self.settings: Settings = read_settings()
        # True when the environment alone turns a sink on (OTel export, NVTX): the wrappers then
        # always take the traced path.
        self.wanted = self.settings.otel_wanted or self.settings.nvtx
        self.nvtx = self.settings.nvtx and _nvtx.available()
        self.decided_for: object = _UNDECIDED
        self.sink: Optional[Sink] = None
        #: The sink when a step needs nothing but its submit (no GPU timer, no NVTX): what the
        #: compiled step call (otel_stepspan/_stepcall.c) reads, with decided_for and wanted. It
        #: keeps what it read until otel_sink() decides again (and says so), the state is replaced
        #: or the provider changes: these fields change nowhere else.
        self.fast_sink: Optional[Sink] = None
        self.gpu_timer: Optional[GpuStepTimer] = None
        self.gpu_timers: list[GpuStepTimer] = []
        self.sinks_by_provider: dict[int, DeferredSpanSink] = {}
        self.lock = threading.Lock()
        self.atexit_registered = False
        self.warned: set[str] = set()
        for problem in self.settings.problems:
            logger.warning("otel_stepspan: %s", problem)


_UNDECIDED = object()
_state = _State()
#: The process's exporter-process sinks, by the variables that differ from the engine's (none:
#: configured by the variables; else those standing in for a provider), kept across
#: refresh_settings(): each exporter process lives as long as this process.
_process_sinks: dict[tuple, ExporterProcessSink] = {}


def refresh_settings() -> None:
    """Re-read the environment (tests, or an engine that sets OTEL_* after importing us)."""
    global _state
    _state = _State()


def warn_once(key: str, message: str, *args: object, level: int = logging.WARNING, exc_info: bool = True) -> None:
    """Log ``message`` once per ``key`` for this process's settings (a state refresh forgets),
    with the exception being handled unless ``exc_info`` is False."""
    if key in _state.warned:
        return
    _state.warned.add(key)
    logger.log(level, message, *args, exc_info=exc_info)


def sinks_off() -> bool:
    """True when neither sink can be on: the single test the wrappers make before the forward."""
    return not _profiler.profiler_enabled() and _trace_api._TRACER_PROVIDER is None and not _state.wanted


def _suppressed(context: Any) -> bool:
    """True inside OpenTelemetry's standard ``suppress_instrumentation()`` (either of its keys),
    read from a context the caller already holds: one context read per step, not three."""
    return bool(context.get(_SUPPRESS_KEY) or context.get(_SUPPRESS_KEY_PLAIN))


def otel_sink() -> Optional[DeferredSpanSink]:
    """The OTel sink for the provider in place now, or ``None`` when OpenTelemetry is off."""
    state = _state
    if state.decided_for is _trace_api._TRACER_PROVIDER:
        return state.sink
    with state.lock:
        provider_key = _trace_api._TRACER_PROVIDER
        if state.decided_for is provider_key:
            return state.sink
        sink = _decide_sink(state) if not state.settings.sdk_disabled else None
        provider_key = _trace_api._TRACER_PROVIDER
        if sink is not None and not state.atexit_registered:
            atexit.register(_flush_at_exit)
            _flush_on_sigterm()
            state.atexit_registered = True
        state.gpu_timer = _gpu_timer_for(sink) if sink is not None and state.settings.gpu_timing else None
        state.sink = sink
        state.fast_sink = sink if state.gpu_timer is None and not state.nvtx else None
        state.decided_for = provider_key
        if _stepcall is not None:
            _stepcall.changed()  # compiled step calls keep what they read of the state until then
        return sink


def _decide_sink(state: _State) -> Optional[Sink]:
    """Where step spans go. Through an exporter process of our own wherever that is possible:
    everything but the step record then happens outside the engine's GIL, and what a killed
    engine left is still delivered. That is when the variables ask for OTLP export and no
    provider is set, and when the provider in place (the engine's own, or
    ``opentelemetry-instrument``'s) exports OTLP alone: the exporter process then sends to the
    same place, with the provider's resource and sampler (:mod:`.sinks.provider_export`).
    Through the provider itself, in this process, when it exports anywhere else (the reason is
    logged once) or ``OTEL_STEPSPAN_EXPORT=provider`` asks for it; through a provider built
    here from the variables for other exporters (``console``)."""
    settings = state.settings
    provider = current_provider()
    if provider is not None and settings.export_via != "provider":
        export = _provider_export(provider, settings)
        if export is not None:
            return export
    if provider is None and settings.export_requested:
        if settings.otlp_only:
            try:
                otlp_protocol(os.environ)
            except ExportConfigError as exc:
                logger.error("otel_stepspan: OpenTelemetry export is off: %s", exc)
                return None
            return _process_sink_for({}, settings)
        provider = resolve_provider(True)
    if provider is None:
        return None
    sink = state.sinks_by_provider.get(id(provider))
    if sink is None:
        provider_links = provider_link_limit(provider)  # the SDK would drop links past it unsaid
        sink = DeferredSpanSink(
            provider,
            name_by=settings.span_name,
            max_pending=settings.max_pending,
            timeline=settings.timeline,
            link_limit=settings.link_limit if provider_links is None else min(settings.link_limit, provider_links),
            requests=settings.requests,
        )
        state.sinks_by_provider[id(provider)] = sink
    return sink


def _provider_export(provider: Any, settings: Settings) -> Optional[ExporterProcessSink]:
    """The exporter process standing in for ``provider``, or None (and one line saying why)
    when its spans must stay on it."""
    try:
        export = provider_export(provider)
    except NotOtlp as exc:
        reason = str(exc)
    except Exception as exc:  # a provider shaped in a way not foreseen: never the engine's problem
        reason = f"its settings could not be read ({type(exc).__name__}: {exc})"
    else:
        warn_once("export:" + export.description, "otel_stepspan: step spans go through the exporter process "
                  "(%s), as the tracer provider in place would export them", export.description,
                  level=logging.INFO, exc_info=False)
        return _process_sink_for(export.environ, settings)
    if settings.export_via == "process" and settings.otlp_only:
        logger.warning("otel_stepspan: OTEL_STEPSPAN_EXPORT=process: the tracer provider in place "
                       "cannot be read (%s); step spans go to the OTLP endpoint of the variables", reason)
        return _process_sink_for({}, settings)
    warn_once("provider:" + reason, "otel_stepspan: step spans are made in this process, through the tracer "
              "provider in place: %s (the exporter process stands in for OTLP exporters only; "
              "OTEL_STEPSPAN_EXPORT=provider says this is wanted)", reason, exc_info=False)
    return None


def _process_sink_for(environ: Mapping[str, str], settings: Settings) -> ExporterProcessSink:
    """The process's exporter-process sink for these variables: one per destination, each
    living as long as this process."""
    key = tuple(sorted(environ.items()))
    sink = _process_sinks.get(key)
    if sink is None:
        sink = _process_sinks[key] = ExporterProcessSink(max_pending=settings.max_pending, environ=environ)
    return sink


def _gpu_timer_for(sink: Sink) -> Optional[GpuStepTimer]:
    """The CUDA-event timer feeding ``sink`` (OTEL_STEPSPAN_GPU_TIMING=1), or None without CUDA."""

    def emit(payload: tuple, start_ns: int, end_ns: int, extra: dict) -> None:
        finish, captured, static, parent = payload
        sink.submit(finish, captured, static, parent, start_ns, end_ns, None, extra)

    try:
        timer = cuda_timer(emit)
    except Exception:
        timer = None
    if timer is None:
        warn_once("gpu", "otel_stepspan: OTEL_STEPSPAN_GPU_TIMING=1 but CUDA is not available; spans keep CPU times")
    else:
        _state.gpu_timers.append(timer)
    return timer


class _ForkAnchor:
    """multiprocessing keeps its after-fork callbacks by weak reference to an object."""


_FORK_ANCHOR = _ForkAnchor()


def _flush_when_forked_worker_exits() -> None:
    """multiprocessing's fork workers leave through ``os._exit``, skipping atexit, and clear the
    finalizers they inherited: register a flush among the worker's own exit finalizers, from
    multiprocessing's after-fork callbacks which run once that clearing is done."""
    multiprocessing_util = sys.modules.get("multiprocessing.util")
    if multiprocessing_util is None or not _state.atexit_registered:
        return

    def add_finalizer(_anchor: object) -> None:
        multiprocessing_util.Finalize(None, _flush_at_exit, exitpriority=100)

    multiprocessing_util.register_after_fork(_FORK_ANCHOR, add_finalizer)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_flush_when_forked_worker_exits)


def _flush_on_sigterm() -> None:
    """SIGTERM skips atexit: flush first, then die of the signal as before (or run the handler
    the engine had installed). Only from the main thread, and only over the default handler or
    a Python one; an engine that installs its own later takes over (and usually exits through
    sys.exit, which runs the atexit flush)."""
    import signal

    if threading.current_thread() is not threading.main_thread():
        return
    try:
        previous = signal.getsignal(signal.SIGTERM)
    except (AttributeError, ValueError):
        return
    if previous is signal.SIG_IGN or previous is None:
        return

    def on_sigterm(signum: int, frame: Any) -> None:
        _flush_at_exit(timeout_s=5.0)
        if callable(previous):
            previous(signum, frame)
            return
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)

    try:
        signal.signal(signal.SIGTERM, on_sigterm)
    except (ValueError, OSError):
        pass


def _flush_at_exit(timeout_s: float = 10.0) -> None:
    """At exit and on SIGTERM: spans made in this process are exported within ``timeout_s``;
    steps bound for the exporter process are in its ring already (it outlives us and
    delivers them), so exiting does not wait for the network."""
    try:
        deadline = time.monotonic() + timeout_s
        for timer in list(_state.gpu_timers):
            timer.drain(max(0.0, deadline - time.monotonic()))
        for process_sink in list(_process_sinks.values()):
            process_sink.close()
        for sink in list(_state.sinks_by_provider.values()):
            sink.drain(max(0.0, deadline - time.monotonic()))
            sink.close_timeline()
            sink.flush(max(0.0, deadline - time.monotonic()))
    except Exception:  # interpreter shutdown: say why, never raise
        logger.exception("otel_stepspan: flushing step spans at exit failed")


def flush(timeout_s: float = 10.0, *, end_timelines: bool = False) -> bool:
    """Turn every recorded step into a span and export what is pending, within ``timeout_s``.

    With ``end_timelines``, the open timeline windows are ended first, so their roots are
    exported too: for a program that is done stepping and shuts its own tracer provider down
    (at exit this happens by itself). Returns True when everything was handed to the exporters
    in time. Shutdown hooks and tests call it; it is also called on normal interpreter exit.
    """
    deadline = time.monotonic() + timeout_s
    ok = True
    for timer in list(_state.gpu_timers):
        ok = timer.drain(max(0.0, deadline - time.monotonic())) and ok
    for process_sink in list(_process_sinks.values()):
        ok = process_sink.flush(max(0.0, deadline - time.monotonic()), end_timelines=end_timelines) and ok
    for sink in list(_state.sinks_by_provider.values()):
        if end_timelines:
            ok = sink.drain(max(0.0, deadline - time.monotonic())) and ok
            sink.close_timeline()
        ok = sink.flush(max(0.0, deadline - time.monotonic())) and ok
    return ok


def stats() -> dict[str, int]:
    """Counters of this process's step spans: ``emitted`` (spans created, or steps handed to the
    exporter process), ``dropped`` (steps not traced because the step queue was full),
    ``failed`` (spans the sink could not create or hand over), ``pending`` (steps queued in this
    process now); and for the exports this package does itself (the exporter process, or a
    provider built here from the variables): ``exported``, ``export_failed`` (refused, or given
    up on), ``export_queue_full`` (no room in the export queue), ``exporter_pending`` (queued
    in the exporter process, still to be sent), ``exporter_cpu_ns`` (CPU the exporter process
    has used), ``timelines_exported`` and ``requests_exported`` (timeline roots and request
    reports it sent). Asking the exporter process takes a round trip (at most 2 s)."""
    from .sinks.otel_provider import health

    sinks: list[Any] = list(_state.sinks_by_provider.values()) + list(_process_sinks.values())
    counters = {
        "emitted": sum(s.emitted_total for s in sinks),
        "dropped": sum(s.dropped_total for s in sinks),
        "failed": sum(s.failed_total for s in sinks),
        "pending": sum(s.pending() for s in sinks),
        "exported": health.exported,
        "export_failed": health.export_failed,
        "export_queue_full": health.queue_full,
        "exporter_pending": 0,
        "exporter_cpu_ns": 0,
        "timelines_exported": 0,
        "requests_exported": 0,
    }
    for process_sink in list(_process_sinks.values()):
        for key, value in process_sink.exporter_stats().items():
            if key in counters and isinstance(value, int):
                counters[key] += value
    return counters


class _Open:
    """What the engine thread holds between the start and the end of one traced forward."""

    __slots__ = ("sink", "scope", "nvtx", "captured", "parent", "start_ns", "finish", "static", "gpu")

    def __init__(self, sink, scope, nvtx, captured, parent, finish, static, gpu) -> None:
        self.sink = sink
        self.scope = scope
        self.nvtx = nvtx
        self.captured = captured
        self.parent = parent
        self.finish = finish
        self.static = static
        self.gpu = gpu
        self.start_ns = 0


def begin(
    capture: Capture,
    finish: Finish,
    static_attributes: Mapping[str, AttributeValue],
    capture_args: tuple,
) -> Optional[_Open]:
    """Start tracing one forward, or return None when no sink is on. Never raises."""
    try:
        state = _state
        profiling = _profiler.profiler_enabled()
        sink = otel_sink()
        nvtx = state.nvtx
        if sink is None and not profiling and not nvtx:
            return None
        context = _get_current()
        if context and _suppressed(context):
            return None
        try:
            captured = capture(*capture_args)
        except Exception:
            warn_once("capture", "otel_stepspan: could not read the batch; labelling the step unknown")
            captured = unknown_step()
        scope = None
        if profiling or nvtx:
            # These sinks need the label now, on the engine thread.
            captured = _finished(finish, captured)
            if profiling:
                scope = _profiler.enter_range(captured.label)
            if nvtx:
                _nvtx.push(captured.label)
        parent = context if sink is not None else None
        gpu = state.gpu_timer.start() if sink is not None and state.gpu_timer is not None else None
        opened = _Open(sink, scope, nvtx, captured, parent, finish, static_attributes, gpu)
        opened.start_ns = _time_ns()
        return opened
    except Exception:
        warn_once("begin", "otel_stepspan: step instrumentation failed; the forward runs untraced")
        return None


def end(opened: _Open, error: Optional[BaseException]) -> None:
    """Finish tracing one forward. Never raises."""
    end_ns = _time_ns()
    try:
        if opened.nvtx:
            _nvtx.pop()
        if opened.scope is not None:
            _profiler.exit_range(opened.scope)
        sink = opened.sink
        if sink is None:
            return
        if opened.gpu is not None:
            timer = _state.gpu_timer
            if error is None and timer is not None:
                payload = (opened.finish, opened.captured, opened.static, opened.parent)
                timer.stop(opened.gpu, payload, opened.start_ns, end_ns)
                return
            if timer is not None:
                timer.cancel(opened.gpu)
        sink.submit(opened.finish, opened.captured, opened.static, opened.parent, opened.start_ns, end_ns, error)
    except Exception:
        warn_once("end", "otel_stepspan: step instrumentation failed at the end of a forward")


def _finished(finish: Finish, captured: Any) -> StepInfo:
    if isinstance(captured, StepInfo):
        return captured
    try:
        return finish(captured)
    except Exception:
        warn_once("finish", "otel_stepspan: could not describe the batch; labelling the step unknown")
        return unknown_step()


def wrap_method(
    method: Callable[..., Any],
    capture: Capture,
    finish: Finish,
    attributes_of: Callable[[Any], Mapping[str, AttributeValue]],
    label_of: Optional[Callable[[Any], str]] = None,
    compiled: Optional["CompiledCapture"] = None,
) -> Callable[..., Any]:
    """Wrap ``method(self, batch, *args, **kwargs)`` with a step span.

    ``capture(self, batch)`` runs on the engine thread only while a sink is on and should only
    read attributes; ``finish(captured)`` makes the :class:`StepInfo`, off the engine thread when
    only OpenTelemetry is on. The wrapper is a plain function rather than a ``wrapt`` proxy: on
    the off path it costs three reads and a call (measured in ``benchmarks/``), where a generic
    ``(wrapped, instance, args, kwargs)`` wrapper costs more than the sinks-off budget.

    With ``compiled``, the capture as a plan the compiled step call can follow, the wrapper is
    that call (:func:`_compiled_step_call`): it handles the usual step itself and hands every
    other to the Python wrapper made here.
    """

    batch_name = _second_parameter(method)
    engine_attributes_of = attributes_of
    # The last runner and its attributes: a runner's attributes do not change, and a process
    # steps one runner (or a few) over and over.
    last: list = [None, _NO_ATTRIBUTES]

    def attributes_of(self: Any) -> Mapping[str, AttributeValue]:
        if last[0] is self:
            return last[1]
        try:
            attributes = engine_attributes_of(self)
        except Exception:
            warn_once("attributes", "otel_stepspan: could not read the runner's engine attributes")
            return _NO_ATTRIBUTES
        last[0], last[1] = self, attributes
        return attributes

    def traced(self: Any, batch: Any = _MISSING, *args: Any, **kwargs: Any) -> Any:
        if not _profiler.profiler_enabled() and _trace_api._TRACER_PROVIDER is None and not _state.wanted:
            if args or kwargs or batch is _MISSING:
                if batch is _MISSING:
                    return method(self, *args, **kwargs)
                return method(self, batch, *args, **kwargs)
            return method(self, batch)
        if batch is _MISSING:
            return run_traced(
                method, (self, *args), kwargs, capture, finish, attributes_of(self), (self, kwargs.get(batch_name))
            )
        return on(self, batch, args, kwargs)

    def on(self: Any, batch: Any, args: tuple, kwargs: dict) -> Any:
        """The forward with a sink on (both wrappers end up here)."""
        state = _state
        sink = state.sink if state.decided_for is _trace_api._TRACER_PROVIDER else otel_sink()
        profiling = _profiler.profiler_enabled()
        if sink is not None and not profiling and state.gpu_timer is None and not state.nvtx:
            # OpenTelemetry alone: capture, call, queue. No label, no StepInfo on this thread.
            try:
                parent = _get_current()
                if parent and _suppressed(parent):  # an empty context, the usual one, is not
                    return method(self, batch, *args, **kwargs)
                captured = capture(self, batch)
            except Exception:  # a batch that cannot be read: the general path labels it unknown
                return run_traced(
                    method, (self, batch, *args), kwargs, capture, finish, attributes_of(self), (self, batch)
                )
            static = last[1] if last[0] is self else attributes_of(self)
            start_ns = _time_ns()
            try:
                result = method(self, batch, *args, **kwargs)
            except BaseException as exc:
                sink.submit(finish, captured, static, parent, start_ns, _time_ns(), exc)
                raise
            sink.submit(finish, captured, static, parent, start_ns, _time_ns(), None)
            return result
        if sink is None and profiling and not state.nvtx:
            # The profiler alone: the label now, one record_function range around the call.
            try:
                context = _get_current()
                if context and _suppressed(context):
                    return method(self, batch, *args, **kwargs)
                captured = capture(self, batch)
                if type(captured) is StepInfo:
                    label = captured.label
                elif label_of is not None:
                    label = label_of(captured)
                else:
                    label = finish(captured).label
                scope = _profiler.enter_range(label)
            except Exception:
                return run_traced(
                    method, (self, batch, *args), kwargs, capture, finish, attributes_of(self), (self, batch)
                )
            try:
                return method(self, batch, *args, **kwargs)
            finally:
                scope.__exit__(None, None, None)
        return run_traced(
            method, (self, batch, *args), kwargs, capture, finish, attributes_of(self), (self, batch)
        )

    traced = _same_signature(method, traced, on) or traced
    traced = functools.update_wrapper(traced, method, updated=())
    if compiled is not None:
        return _compiled_step_call(method, traced, finish, compiled) or traced
    return traced


#: Markers in a :class:`CompiledCapture`'s fields (see otel_stepspan/_stepcall.c).
CAPTURE_MODE: Any = _stepcall.MODE if _stepcall is not None else object()
CAPTURE_PASS_ID: Any = _stepcall.PASS_ID if _stepcall is not None else object()


class CompiledCapture(NamedTuple):
    """An integration's capture as a plan of reads, for the compiled step call.

    ``fields`` makes the captured value (a ``captured_type``): each item a batch attribute name
    (missing: None), :data:`CAPTURE_MODE` (the batch's ``forward_mode`` named through ``modes``,
    ``{id(member): (member, name)}``, which the Python capture fills), :data:`CAPTURE_PASS_ID`
    (the runner's ``pass_name`` attribute plus one, where an int) or a constant. A batch whose
    ``guards`` attributes are not all None, and a runner ``statics_of`` declines (None; else it
    gives the runner's static attributes, the same mapping on every call), go through the
    Python capture: the plan covers the usual step, the capture every step."""

    captured_type: type
    fields: tuple
    guards: tuple[str, ...]
    modes: dict
    pass_name: str
    statics_of: Callable[[Any], Optional[Mapping[str, AttributeValue]]]


def _compiled_step_call(
    method: Callable[..., Any], traced: Callable[..., Any], finish: Finish, compiled: CompiledCapture
) -> Optional[Callable[..., Any]]:
    """``traced`` as one compiled call (otel_stepspan/_stepcall.c) for the usual step, or None
    where the module was not built: a paced step runs with cold caches, where each Python-level
    operation costs about a microsecond (benchmarks/bench_paced.py). It reads the same state as
    ``traced`` (this module's ``_state``, the API's provider, the profiler's check) and hands
    every step it does not take to ``traced``."""
    if _stepcall is None:
        return None
    call = _stepcall.StepCall(
        method, traced, finish, *compiled, globals(), vars(_trace_api), vars(_profiler), _get_current
    )
    return functools.update_wrapper(call, method, updated=())


_MISSING: Any = object()
_NO_ATTRIBUTES: Mapping[str, AttributeValue] = {}


def _same_signature(
    method: Callable[..., Any], generic: Callable[..., Any], on: Callable[..., Any]
) -> Optional[Callable[..., Any]]:
    """A wrapper declared with ``method``'s own parameters, or None where that cannot be done.

    sglang calls ``forward(forward_batch, pp_proxy_tensors=...)``: with keywords, a
    ``(self, batch, *args, **kwargs)`` wrapper packs and unpacks a dict and a tuple on every step
    (about 0.3 us, more than the whole off-path budget). Declared with the method's own
    parameters, the off path is one positional call whatever the call shape; the traced path
    goes on through ``on`` (or ``generic`` when the batch was not passed).
    """
    import inspect

    try:
        params = list(inspect.signature(method, follow_wrapped=False).parameters.values())
    except (TypeError, ValueError):
        return None
    allowed = {inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY}
    if len(params) < 2 or any(p.kind not in allowed for p in params) or params[1].kind not in allowed - {
        inspect.Parameter.KEYWORD_ONLY
    }:
        return None
    if any(not p.name.isidentifier() or p.name.startswith("_ss_") for p in params):
        return None
    declared: list[str] = []
    positional: list[str] = []
    keywords: list[str] = []
    defaults: list[Any] = []
    for index, p in enumerate(params):
        if p.default is not p.empty:
            default = f"=_ss_d{len(defaults)}"
            defaults.append(p.default)
        else:
            default = "=_ss_missing" if index == 1 else ""  # the batch may come as a keyword
        if p.kind is inspect.Parameter.KEYWORD_ONLY:
            if "*" not in declared:
                declared.append("*")
            keywords.append(f"{p.name}={p.name}")
        else:
            positional.append(p.name)
        declared.append(p.name + default)
    self_name, batch_name = positional[0], positional[1]
    call = ", ".join(positional + keywords)
    without_batch = ", ".join([self_name] + [f"{n}={n}" for n in positional[2:]] + keywords)
    d_args = "".join(f", _ss_d{i}" for i in range(len(defaults)))
    rest = "".join(f"{n}, " for n in positional[2:])
    kw_dict = ", ".join(f"{k.split('=')[0]!r}: {k.split('=')[0]}" for k in keywords)
    src = (
        f"def _ss_make(_ss_method, _ss_generic, _ss_on, _ss_missing{d_args}):\n"
        f"    def traced({', '.join(declared)}):\n"
        f"        if {batch_name} is _ss_missing:\n"
        f"            return _ss_generic({without_batch})\n"
        f"        if not _profiler.profiler_enabled() and _trace_api._TRACER_PROVIDER is None and not _state.wanted:\n"
        f"            return _ss_method({call})\n"
        f"        return _ss_on({self_name}, {batch_name}, ({rest}), {{{kw_dict}}})\n"
        f"    return traced\n"
    )
    namespace: dict[str, Any] = {}
    try:
        exec(compile(src, "<otel_stepspan wrapper>", "exec"), globals(), namespace)
        return namespace["_ss_make"](method, generic, on, _MISSING, *defaults)
    except Exception:
        return None


def _second_parameter(method: Callable[..., Any]) -> str:
    """The name the batch goes by when passed as a keyword (``forward_batch`` in sglang)."""
    import inspect

    try:
        names = list(inspect.signature(method).parameters)
    except (TypeError, ValueError):
        return "batch"
    return names[1] if len(names) > 1 else "batch"


def run_traced(
    call: Callable[..., Any],
    args: tuple,
    kwargs: dict[str, Any],
    capture: Capture,
    finish: Finish,
    static_attributes: Mapping[str, AttributeValue],
    capture_args: tuple,
) -> Any:
    """Call ``call(*args, **kwargs)`` inside a step span. The forward's result and exceptions
    pass through unchanged; a failure of the instrumentation only costs the span."""
    opened = begin(capture, finish, static_attributes, capture_args)
    if opened is None:
        return call(*args, **kwargs)
    try:
        result = call(*args, **kwargs)
    except BaseException as exc:
        end(opened, exc)
        raise
    end(opened, None)
    return result
