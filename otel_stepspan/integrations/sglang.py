"""sglang integration: a step span around every ``ModelRunner.forward``.

Usage::

    from otel_stepspan.integrations.sglang import SGLangInstrumentor
    SGLangInstrumentor().instrument()
    # or, with no code change: opentelemetry-instrument python -m sglang.launch_server ...

sglang is never imported by this module: ``ForwardBatch`` is read by duck typing, and every patch
is applied when sglang itself imports the patched module (a post-import hook), so processes that
never load a model pay nothing.

Reading a batch happens in two halves. :func:`capture` runs on the engine thread at entry to
``forward`` (before sglang pads or rewrites the batch): a few attribute reads and no arithmetic,
O(1) whatever the batch size, and only plain Python values kept. :func:`finish` turns that
capture into a :class:`StepInfo` later. Neither ever touches a value on the GPU: only Python
ints, the ``*_cpu`` mirrors and the spec-decoding config are read.

Besides ``ModelRunner.forward`` the instrumentor patches, each for one reason:

* ``ForwardBatch.init_new``: the scheduler knows which rows of an extend-shaped batch are running
  decodes (``ScheduleBatch.decoding_reqs``: the tail a MIXED step appended, or every row of a
  decode batch that DP attention turned into EXTEND); ``ForwardBatch`` does not carry it. The
  count is written on the ``ForwardBatch`` itself, on the thread that builds it and right before
  the same thread calls ``forward``: no GPU read, no shared state. While OpenTelemetry is on, the
  same hook writes the scheduler's context there too (requests waiting, KV tokens in use) and,
  when sglang traces requests (``--enable-trace``), each row's request and trace context, so
  that the step span links to the requests it computed.
* ``Scheduler.__init__``: the scheduler of this thread, remembered (weakly) so that the batch
  hook can read its waiting queue and KV pool.
* sglang's own step range inside ``forward`` (0.5.11+, ``build_step_span_name``): a step shows
  exactly one ``step[...]`` range, ours, named like the span. sglang's detailed annotations, when
  the user turns them on in ``start_profile``, become a range of their own inside it.
* the CUDA-graph replays of draft models that never pass through ``ModelRunner.forward``
  (EAGLE v2, frozen-KV MTP, multi-layer EAGLE's draft extend): each replay is a ``draft`` step.
"""

from __future__ import annotations

import enum
import functools
import logging
import operator
import sys
import threading
import weakref
from typing import Any, Callable, Collection, NamedTuple, Optional

from .. import runtime
from ..step import UNKNOWN, AttributeValue, RequestLink, StepInfo, engine_attributes, make_step, normalize_mode
from ._instrumentor import EngineInstrumentor, is_patched
from ._patch_points import PatchPoint
from ._read import as_count, cpu_int_list

logger = logging.getLogger("otel_stepspan")

MODULE = "sglang.srt.model_executor.model_runner"
METHOD = "ModelRunner.forward"
BATCH_MODULE = "sglang.srt.model_executor.forward_batch_info"
INIT_NEW = "ForwardBatch.init_new"
#: The module globals sglang's own step range inside ``ModelRunner.forward`` is made of (0.5.11+).
STEP_NAME, STEP_RANGE = "build_step_span_name", "profile_range"
#: Draft-model CUDA-graph replays that bypass ``ModelRunner.forward``: each call is one draft step.
GRAPH_REPLAYS = (
    ("sglang.srt.speculative.eagle_draft_cuda_graph_runner", "EAGLEDraftCudaGraphRunner.execute"),
    ("sglang.srt.speculative.eagle_draft_extend_cuda_graph_runner", "EAGLEDraftExtendCudaGraphRunner.execute"),
    ("sglang.srt.speculative.frozen_kv_mtp_cuda_graph_runner", "FrozenKVMTPCudaGraphRunner.execute"),
)
#: Where sglang wraps draft replays in a range of its own (multi-layer EAGLE): a draft step there.
NAMED_REPLAYS = ("sglang.srt.speculative.multi_layer_eagle_worker_v2",)
#: The releases whose source has every patch point (scripts/engine_releases.py checks each).
_instruments = ("sglang >= 0.5.21, < 0.5.24",)

#: The attribute :func:`mark_decode_rows` writes on a ``ForwardBatch``.
DECODE_ROWS = "_otel_stepspan_decode_rows"
#: The attribute :func:`mark_requests` writes on a ``ForwardBatch``.
REQUESTS = "_otel_stepspan_requests"
SCHEDULER_MODULE = "sglang.srt.managers.scheduler"
SCHEDULER_INIT = "Scheduler.__init__"
#: sglang's request tracing (``--enable-trace``); its ``opentelemetry_initialized`` says it is on.
TRACE_MODULE = "sglang.srt.observability.trace"
#: Where a request's trace identity is remembered on sglang's ``Req``, read once per request.
REQUEST_TRACE = "_otel_stepspan_trace"

#: One row's request, as :func:`mark_requests` takes it: (request id, trace id, span id, trace
#: flags) of the span the engine's request tracing made for the request.
RequestTrace = tuple[str, int, int, int]

# sglang mode names with a name of their own in docs/spans.md. Everything else keeps its own name,
# lower-cased (SPLIT_PREFILL -> split_prefill, DLLM_EXTEND -> dllm_extend, ...).
_MODE_NAMES = {
    "EXTEND": "prefill",
    "DECODE": "decode",
    "MIXED": "mixed",
    "IDLE": "idle",
    "TARGET_VERIFY": "verify",
    "DRAFT_EXTEND": "draft_extend",
    "DRAFT_EXTEND_V2": "draft_extend",
}


def mark_decode_rows(forward_batch: Any, decode_rows: int) -> None:
    """Record on ``forward_batch`` that its last ``decode_rows`` rows are running decodes.

    sglang's scheduler knows it when it builds the batch (``ScheduleBatch.decoding_reqs``) and
    the instrumentor copies it from there; an engine built on sglang's batch shape (the reference
    engine) calls this itself. Without it an extend-shaped batch is read as all prompt work, and
    a MIXED one says ``ext=? dec=?``: its length-1 rows may be decodes or fully cached prompts.
    """
    setattr(forward_batch, DECODE_ROWS, decode_rows)


def mark_requests(
    forward_batch: Any,
    rows: Optional[list[Optional[RequestTrace]]],
    queued_requests: Optional[int] = None,
    kv_tokens: Optional[int] = None,
) -> None:
    """Record on ``forward_batch`` which requests its rows compute, and the scheduler around it.

    ``rows`` has one entry per row of the batch, in batch order: the :data:`RequestTrace` of the
    span the engine's request tracing made for that row's request, or None for a request it does
    not trace; ``rows`` is None as a whole when the engine does not trace requests. The step span
    then links to every traced request, marked with what the step did for it, which is read from
    the batch itself (a prompt chunk of its extend length, one decode, a verify of its draft
    tokens). ``queued_requests`` (requests waiting to be scheduled) and ``kv_tokens`` (KV cache
    tokens held by requests) become the span's ``scheduler.*`` attributes.

    The instrumentor fills this from sglang's scheduler; an engine built on sglang's batch shape
    (the reference engine) calls it itself. Plain values only: the step may be described later,
    off the engine thread.
    """
    setattr(forward_batch, REQUESTS, (rows, queued_requests, kv_tokens))


class Captured(NamedTuple):
    """What the engine thread keeps of a ``ForwardBatch``: plain values (the per-row lengths are
    the batch's own CPU list, kept by reference)."""

    mode: str
    batch_size: Any
    extend_seq_lens_cpu: Any
    extend_num_tokens: Any
    decode_rows: Any
    split_index: Any
    verify_total: Optional[int]
    verify_width: Optional[int]
    verify_lens: Any
    is_draft_worker: bool
    pass_id: Optional[int]
    #: What :func:`mark_requests` wrote: (rows, queued requests, KV tokens), or None.
    requests: Any


_tuple_new = tuple.__new__


def _tokens_per_request(spec_info: Any) -> Optional[int]:
    """Query width of a verify step: EAGLE's ``draft_token_num`` (a Python int), or
    ``num_tokens_per_req`` where a release fills that instead (-1 there means "not set")."""
    for name in ("draft_token_num", "num_tokens_per_req"):
        width = as_count(getattr(spec_info, name, None))
        if width:
            return width
    return None


def capture(forward_batch: Any, is_draft_worker: bool = False, pass_id: Optional[int] = None) -> Captured:
    """The engine-thread half of describing a batch: attribute reads, nothing computed. One
    tuple made directly, without the NamedTuple's Python-level constructor: this runs every step."""
    spec_info = getattr(forward_batch, "spec_info", None)
    verify_total = verify_width = verify_lens = None
    if spec_info is not None:
        # A ragged verify (DSpark: each request verifies its own number of draft tokens) has a
        # host-side layout: the total and the per-request counts.
        layout = getattr(spec_info, "ragged_verify_layout", None)
        if layout is not None:
            verify_total = as_count(getattr(layout, "total_verify_tokens", None))
            verify_lens = getattr(layout, "verify_lens_cpu", None)
        verify_width = _tokens_per_request(spec_info)
    return _tuple_new(
        Captured,
        (
            "draft" if is_draft_worker else mode_name(getattr(forward_batch, "forward_mode", None)),
            getattr(forward_batch, "batch_size", None),
            getattr(forward_batch, "extend_seq_lens_cpu", None),
            getattr(forward_batch, "extend_num_tokens", None),
            getattr(forward_batch, DECODE_ROWS, None),
            getattr(forward_batch, "split_index", None),
            verify_total,
            verify_width,
            verify_lens,
            is_draft_worker,
            pass_id,
            getattr(forward_batch, REQUESTS, None),
        ),
    )


_mode_by_member: dict[int, tuple[Any, str]] = {}


def mode_name(forward_mode: Any) -> str:
    """``_mode_name`` remembered per enum member (members live as long as their class): reading
    ``Enum.name`` is a Python-level property call, on every step otherwise."""
    hit = _mode_by_member.get(id(forward_mode))
    if hit is not None and hit[0] is forward_mode:
        return hit[1]
    mode = _mode_name(forward_mode)
    if isinstance(forward_mode, enum.Enum) and len(_mode_by_member) < 1024:
        _mode_by_member[id(forward_mode)] = (forward_mode, mode)
    return mode


def _mode_name(forward_mode: Any) -> str:
    """The mode docs/spans.md gives sglang's ``ForwardMode``, by the member's *name*.

    Never ``is_extend()``: sglang answers True there for MIXED, TARGET_VERIFY and DRAFT_EXTEND too.
    """
    name = getattr(forward_mode, "name", None)
    if not isinstance(name, str):
        name = forward_mode if isinstance(forward_mode, str) else None
    if not name:
        return "unknown"
    key = name.upper()
    if key in _MODE_NAMES:
        return _MODE_NAMES[key]
    return normalize_mode(name)


def _extend_step(mode: str, bs: Optional[int], lens: Optional[list[int]], total: Optional[int],
                 decode_rows: Any, pass_id: Optional[int]) -> StepInfo:
    """An EXTEND or MIXED batch: prompt rows first, then the running decodes the scheduler
    appended (``mix_with_running``), or only decodes (DP attention's ``convert_decode_to_extend``).
    Named by what it computes: prefill, mixed or decode."""
    decodes = as_count(decode_rows)
    if decodes is None:
        if mode == "mixed":
            # No exact count of the appended decodes: say so rather than guess from the lengths
            # (a fully cached prompt extends by one token too).
            return make_step("mixed", bs, None, None, None, total, pass_id)
        return make_step("prefill", bs, total, 0, bs, total, pass_id)
    if decodes == 0:
        return make_step("prefill", bs, total, 0, bs, total, pass_id)
    if decodes == bs:
        return make_step("decode", bs, 0, decodes, 0, decodes, pass_id)
    if lens is None or decodes > len(lens):
        return make_step("mixed", bs, None, decodes, None, total, pass_id)
    prompt = lens[: len(lens) - decodes]
    if not prompt:
        return make_step("decode", bs, 0, decodes, 0, decodes, pass_id)
    extend = sum(prompt)
    return make_step("mixed", bs, extend, decodes, len(prompt), extend + decodes, pass_id)


def finish(captured: Captured) -> StepInfo:
    """The off-thread half: counts from the captured CPU values (docs/spans.md), and the requests
    the step computed with the scheduler's context, where the batch carries them."""
    mode = captured.mode
    lens = None if mode == "idle" or mode == "decode" else cpu_int_list(captured.extend_seq_lens_cpu)
    info = _counted(captured, lens)
    context = captured.requests
    if context is None:
        return info
    try:
        rows, queued, kv_tokens = context
        links = None if rows is None or captured.is_draft_worker else _links(captured, info.mode, rows, lens)
    except Exception:  # not what mark_requests writes: the step keeps its counts, without links
        return info
    # The same fast fill as make_step's, on the StepInfo made just above that nobody else holds.
    info.__dict__.update(links=links, queued_requests=as_count(queued), kv_tokens=as_count(kv_tokens))
    return info


def finish_fields(fields: tuple) -> StepInfo:
    """:func:`finish` of a :class:`Captured` that crossed to the exporter process as a plain
    tuple: the exporter describes sglang's steps, not the engine thread."""
    return finish(_tuple_new(Captured, fields))


#: The exporter process may describe these steps (see otel_stepspan.sinks.otel_process).
finish.in_exporter = f"{__name__}:finish_fields"  # type: ignore[attr-defined]


def _counted(captured: Captured, lens: Optional[list[int]]) -> StepInfo:
    mode = captured.mode
    bs = as_count(captured.batch_size)
    pass_id = captured.pass_id
    if mode == "idle":
        # Under DP attention an idle rank runs a padded dummy batch: nothing real is computed.
        return make_step("idle", 0, 0, 0, 0, 0, pass_id)
    if mode == "decode":
        return make_step("decode", bs, 0, bs, 0, bs, pass_id)
    total = as_count(captured.extend_num_tokens)
    if total is None and lens is not None:
        total = sum(lens)
    if mode == "prefill" or mode == "mixed":
        return _extend_step(mode, bs, lens, total, captured.decode_rows, pass_id)
    if mode == "verify":
        toks = captured.verify_total
        if toks is None and bs is not None and captured.verify_width is not None:
            toks = bs * captured.verify_width
        return make_step("verify", bs, 0, bs, 0, toks, pass_id)
    if mode == "split_prefill":
        # sglang runs one SPLIT_PREFILL batch as several forwards, a slice of the layers each;
        # each forward is a step, and the prompt's tokens count once, on the first slice.
        if captured.split_index != 0:
            return make_step(mode, bs, 0, 0, 0, 0, pass_id)
        return make_step(mode, bs, total, 0, bs, total, pass_id)
    if lens is None:
        return make_step(mode, bs, 0, 0, 0, total, pass_id)
    # draft, draft_extend, dllm_extend, ...: a row computing more than one token is prompt work,
    # a row computing one is a decode (docs/spans.md, counting by what the forward computes).
    prompt = [n for n in lens if n > 1]
    extend = sum(prompt)
    return make_step(mode, bs, extend, len(lens) - len(prompt), len(prompt), sum(lens), pass_id)


_DECODE = ("decode", 1)


def _row_work(captured: Captured, mode: str, n: int, lens: Optional[list[int]]) -> list[tuple[str, int]]:
    """What the step did for each of its ``n`` rows, counted as the step itself is (docs/spans.md):
    ``("prefill", extend length)`` for prompt work (a chunk, a cached prompt's last token, a
    recompute), ``("decode", 1)``, ``("verify", draft tokens)``. Unknown token counts are -1."""
    if mode == "decode":
        return [_DECODE] * n
    if mode == "verify":
        per_row = cpu_int_list(captured.verify_lens)
        if per_row is not None and len(per_row) == n:
            return [("verify", k) for k in per_row]
        width = captured.verify_width
        return [("verify", width if width is not None else UNKNOWN)] * n
    if lens is None or len(lens) != n:
        lens = [UNKNOWN] * n
    if mode == "prefill" or mode == "mixed":
        decodes = as_count(captured.decode_rows)
        if decodes is None and mode == "prefill":
            decodes = 0
        if decodes is not None and decodes <= n:
            # The scheduler's running decodes are the last rows (mix_with_running).
            return [("prefill", k) for k in lens[: n - decodes]] + [_DECODE] * decodes
    if mode == "split_prefill":
        first = captured.split_index == 0
        return [("prefill", k if first else 0) for k in lens]
    return [_DECODE if k == 1 else ("prefill", k) for k in lens]


def _links(captured: Captured, mode: str, rows: Any, lens: Optional[list[int]]) -> tuple[RequestLink, ...]:
    """The step's links to the traced requests among its rows (untraced rows have None)."""
    if mode == "idle" or not rows:
        return ()
    links = []
    for row, work in zip(rows, _row_work(captured, mode, len(rows), lens)):
        if row is not None:
            request_id, trace_id, span_id, flags = row
            links.append(_tuple_new(RequestLink, (request_id, trace_id, span_id, flags, *work)))
    return tuple(links)


def describe(
    forward_batch: Any, *, is_draft_worker: bool = False, pass_id: Optional[int] = None
) -> StepInfo:
    """The :class:`StepInfo` of one sglang ``ForwardBatch``. Never raises, never syncs the GPU."""
    try:
        return finish(capture(forward_batch, is_draft_worker, pass_id))
    except Exception:
        from ..step import unknown_step

        return unknown_step(pass_id)


# -- the ModelRunner wrapper -----------------------------------------------------------------


class _RunnerFacts(NamedTuple):
    runner: "weakref.ref[Any]"
    is_draft_worker: bool
    attributes: dict[str, AttributeValue]


_facts_by_runner: dict[int, _RunnerFacts] = {}


def _rank(runner: Any, *names: str) -> Optional[int]:
    for name in names:
        value = getattr(runner, name, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def _process_ranks() -> tuple[Optional[int], Optional[int], Optional[int]]:
    """(tp, dp, pp) from sglang's process-wide parallel state, for releases whose runner no longer
    keeps its ranks (0.5.18 keeps them in ``runtime_context``, 0.5.23 only there). Only modules
    sglang has already imported are consulted."""
    tp = dp = pp = None
    context = sys.modules.get("sglang.srt.runtime_context")
    try:
        parallel = context.get_parallel() if context is not None else None
        if parallel is not None:
            tp, dp, pp = (_rank(parallel, "tp_rank"), _rank(parallel, "attn_dp_rank", "dp_rank"), _rank(parallel, "pp_rank"))
    except Exception:
        pass
    distributed = sys.modules.get("sglang.srt.distributed")
    for getter, slot in (("get_tensor_model_parallel_rank", 0), ("get_pipeline_model_parallel_rank", 2)):
        if (tp if slot == 0 else pp) is not None or distributed is None:
            continue
        try:
            value = getattr(distributed, getter)()
        except Exception:
            continue
        if isinstance(value, int) and not isinstance(value, bool):
            tp, pp = (value, pp) if slot == 0 else (tp, value)
    return tp, dp, pp


def _runner_facts(runner: Any, engine_name: str = "sglang") -> _RunnerFacts:
    """What never changes for a runner (draft or target, its ranks): read on its first step."""
    facts = _facts_by_runner.get(id(runner))
    if facts is None or facts.runner() is not runner:
        tp, dp, pp = _rank(runner, "tp_rank"), _rank(runner, "dp_rank", "attn_dp_rank"), _rank(runner, "pp_rank")
        if tp is None or pp is None:
            fallback = _process_ranks()
            tp = tp if tp is not None else fallback[0]
            dp = dp if dp is not None else fallback[1]
            pp = pp if pp is not None else fallback[2]
        try:
            ref: Any = weakref.ref(runner)
        except TypeError:  # a runner without __weakref__: remember nothing, read it each step
            ref = lambda: None  # noqa: E731
        facts = _RunnerFacts(
            ref,
            getattr(runner, "is_draft_worker", False) is True,
            engine_attributes(engine_name, tp, dp, pp),
        )
        _facts_by_runner[id(runner)] = facts
    return facts


def _capture_for(
    engine_name: str,
) -> tuple[Callable[[Any, Any], Captured], Callable[[Any], dict], runtime.CompiledCapture]:
    """The engine-thread capture of ``ModelRunner.forward`` for runners named ``engine_name``,
    the runner's static attributes (the facts the capture looked up serve the attributes asked
    for right after it, without a second look-up), and the same capture as a plan for the
    compiled step call: :func:`capture` of a target model's batch without speculative decoding,
    read by the same names."""
    last: list = [None]

    def capture_forward(runner: Any, forward_batch: Any) -> Captured:
        counter = getattr(runner, "forward_pass_id", None)
        facts = _facts_by_runner.get(id(runner))  # _runner_facts' own look-up, without its frame
        if facts is None or facts.runner() is not runner:
            facts = _runner_facts(runner, engine_name)
        last[0] = facts
        # sglang increments forward_pass_id first thing in forward(): this step's id is the next.
        return capture(forward_batch, facts.is_draft_worker, counter + 1 if type(counter) is int else None)

    def runner_attributes(runner: Any) -> dict[str, AttributeValue]:
        facts = last[0]
        if facts is None or facts.runner() is not runner:
            facts = _runner_facts(runner, engine_name)
        return facts.attributes

    def target_attributes(runner: Any) -> Optional[dict[str, AttributeValue]]:
        facts = _runner_facts(runner, engine_name)  # asked once per runner, by the compiled call
        return None if facts.is_draft_worker else facts.attributes  # a draft model's: capture()

    plan = runtime.CompiledCapture(
        captured_type=Captured,
        fields=(
            runtime.CAPTURE_MODE, "batch_size", "extend_seq_lens_cpu", "extend_num_tokens", DECODE_ROWS,
            "split_index", None, None, None, False, runtime.CAPTURE_PASS_ID, REQUESTS,
        ),
        guards=("spec_info",),
        modes=_mode_by_member,
        pass_name="forward_pass_id",
        statics_of=target_attributes,
    )
    return capture_forward, runner_attributes, plan


_labels: dict[tuple, str] = {}


def label_of(captured: Captured) -> str:
    """The label alone, for the profiler's range on the engine thread. Steps with no
    per-sequence list (decode, idle, most draft steps) repeat a handful of shapes: their label
    is remembered by (mode, batch size), at most 4096 of them."""
    mode, bs, lens, _, _, _, verify_total, verify_width, _, _, _, _ = captured
    if lens is None and verify_total is None and verify_width is None and type(bs) is int:
        key = (mode, bs)
        label = _labels.get(key)
        if label is None:
            label = finish(captured).label
            if len(_labels) >= 4096:
                _labels.clear()
            _labels[key] = label
        return label
    return finish(captured).label


def traced_forward(forward: Any, *, engine_name: str = "sglang") -> Any:
    """``ModelRunner.forward`` with a step span; what the instrumentor installs. Engines built
    on sglang's runner shape (the reference engine) pass their own ``engine_name``."""

    capture_forward, runner_attributes, plan = _capture_for(engine_name)
    return runtime.wrap_method(forward, capture_forward, finish, runner_attributes, label_of, compiled=plan)


# -- the scheduler's count of running decodes, carried to the forward ----------------------------


_ABSENT: Any = object()


def counted_init_new(init_new: Any) -> Any:
    """``ForwardBatch.init_new`` (a classmethod, built from sglang's ``ScheduleBatch``) that
    also copies ``len(decoding_reqs)`` onto the batch it returns (:func:`mark_decode_rows`) and,
    while OpenTelemetry is on, the requests and the scheduler's context (:func:`mark_requests`).

    ``decoding_reqs`` is the scheduler's own list of the requests a batch runs as decodes; sglang
    reads it back when it processes the results. It is read on the thread that builds the batch,
    right before that thread calls ``forward``, overlap scheduler included. A release whose batch
    has no such field leaves the batch unmarked (MIXED steps then say ``ext=? dec=?``).
    """
    owner = getattr(init_new, "__self__", None)
    descriptor = vars(owner).get("init_new") if isinstance(owner, type) else None
    build = getattr(descriptor, "__func__", None)
    if not isinstance(descriptor, classmethod) or build is None:
        return init_new  # not the shape this was written for: leave it alone

    def init_new_counting_decodes(cls: Any, batch: Any, *args: Any, **kwargs: Any) -> Any:
        forward_batch = build(cls, batch, *args, **kwargs)
        try:
            decoding = getattr(batch, "decoding_reqs", _ABSENT)
            if decoding is not _ABSENT:
                setattr(forward_batch, DECODE_ROWS, 0 if decoding is None else len(decoding))
            if runtime.otel_sink() is not None:
                runner = args[0] if args else kwargs.get("model_runner")
                setattr(forward_batch, REQUESTS, _step_context(batch, runner))
        except Exception:
            runtime.warn_once("sglang-batch", "otel_stepspan: could not read sglang's ScheduleBatch")
        return forward_batch

    init_new_counting_decodes.__name__ = build.__name__
    init_new_counting_decodes.__qualname__ = build.__qualname__
    init_new_counting_decodes.__doc__ = build.__doc__
    return _ClassmethodWrapping(init_new_counting_decodes, descriptor)


# -- the scheduler's context and the requests of a batch ----------------------------------------


#: The scheduler of each thread (sglang runs one per scheduler process, or one per thread when
#: its data-parallel controller starts them as threads), by weak reference.
_schedulers: dict[int, "weakref.ref[Any]"] = {}


def remembered_scheduler(init: Any) -> Any:
    """``Scheduler.__init__`` that first remembers the scheduler for the thread building it,
    the thread that then runs its event loop and builds every batch."""

    def init_remembering_its_thread(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            _schedulers[threading.get_ident()] = weakref.ref(self)
        except Exception:
            pass
        return init(self, *args, **kwargs)

    return functools.update_wrapper(init_remembering_its_thread, init, updated=())


def _step_context(batch: Any, runner: Any) -> tuple[Any, Optional[int], Optional[int]]:
    """What :func:`mark_requests` takes, from sglang's scheduler: O(1) reads, plus one
    attribute read per row while sglang traces requests (the draft model's batches, whose steps
    link to nothing, skip that). A scheduler of another shape leaves its counts unknown."""
    ref = _schedulers.get(threading.get_ident())
    scheduler = ref() if ref is not None else None
    queued = kv_tokens = None
    if scheduler is not None:
        try:
            queued = len(scheduler.waiting_queue)
            kv_tokens = _kv_tokens_in_use(getattr(scheduler, "pool_stats_observer", None))
        except Exception:
            runtime.warn_once("sglang-scheduler", "otel_stepspan: could not read sglang's scheduler counts")
    rows = None
    if _tracing_requests() and getattr(runner, "is_draft_worker", False) is not True:
        rows = _request_rows(batch.reqs)
    return rows, queued, kv_tokens


def _kv_tokens_in_use(pool: Any) -> Optional[int]:
    """sglang's own ``#token`` (``PoolStats.full_num_used``): KV pool tokens that are neither
    free nor evictable radix-cache entries, i.e. held by requests. Host-side counters only (the
    allocator's free list length is tensor metadata). Unknown for hybrid SWA, SSM and HiSparse
    pools, which keep several counts."""
    if pool is None or pool.is_hybrid_swa or pool.is_hybrid_ssm or pool.enable_hisparse:
        return None
    free = pool.token_to_kv_pool_allocator.available_size()
    used = pool.max_total_num_tokens - free - pool.tree_cache.evictable_size()
    return used if type(used) is int and used >= 0 else None


def _tracing_requests() -> bool:
    """True when sglang traces requests in this process (``--enable-trace``)."""
    return getattr(sys.modules.get(TRACE_MODULE), "opentelemetry_initialized", False) is True


_remembered_trace = operator.attrgetter(REQUEST_TRACE)


def _request_rows(reqs: Any) -> list[Optional[RequestTrace]]:
    """Each row's :data:`RequestTrace`: one attribute read per row once every request has been
    seen (a C-level map), the trace context read the first time a request is."""
    try:
        return list(map(_remembered_trace, reqs))
    except AttributeError:
        return [_remember_trace(req) for req in reqs]


def _remember_trace(req: Any) -> Optional[RequestTrace]:
    known = getattr(req, REQUEST_TRACE, _ABSENT)
    if known is _ABSENT:
        known = request_trace(req)
        try:
            setattr(req, REQUEST_TRACE, known)
        except Exception:
            pass
    return known


def request_trace(req: Any) -> Optional[RequestTrace]:
    """The :data:`RequestTrace` of sglang's ``Req``: its id and the root span sglang's request
    tracing made for it (``time_stats.trace_ctx.root_span_context``, the ``Req <rid>`` span,
    whose parent is the client's ``traceparent`` when one came with the request); None when the
    request is not traced (``TraceNullContext``, trace level 0)."""
    from opentelemetry import trace as trace_api

    context = getattr(getattr(req, "time_stats", None), "trace_ctx", None)
    if getattr(context, "tracing_enable", False) is not True:
        return None
    root = getattr(context, "root_span_context", None)
    if root is None:
        return None
    span_context = trace_api.get_current_span(root).get_span_context()
    if not span_context.is_valid:
        return None
    return (str(req.rid), span_context.trace_id, span_context.span_id, int(span_context.trace_flags))


class _ClassmethodWrapping(classmethod):
    """A classmethod whose ``__wrapped__`` is the classmethod it replaced (what unpatching puts
    back); a plain classmethod's ``__wrapped__`` is read-only and names its own function."""

    def __init__(self, function: Callable[..., Any], replaced: Any) -> None:
        super().__init__(function)
        self._replaced = replaced

    @property
    def __wrapped__(self) -> Any:  # type: ignore[override]
        return self._replaced


# -- sglang's own step range: one range per step, ours -------------------------------------------


_NO_RANGE: Any = None


def step_name_without_range(build_step_span_name: Any) -> Any:
    """Stands in for ``build_step_span_name`` inside ``ModelRunner.forward``: our wrapper
    already names the step's range, so sglang's is dropped (an empty name, see
    :func:`range_unless_unnamed`), unless the user turned sglang's detailed annotations on
    (``start_profile(detailed_annotations=True)``): then sglang's own name, aggregates and
    ``forward_id`` included, goes on as an ``sglang[...]`` range inside the step's."""

    def annotations_only(forward_batch: Any, detailed_annotations: Any = None, **kwargs: Any) -> str:
        if detailed_annotations is None:
            toggles = sys.modules.get("sglang.srt.model_executor.step_span_utils")
            enabled = getattr(toggles, "detailed_annotations_enabled", None)
            detailed_annotations = enabled() if enabled is not None else False
        if not detailed_annotations:
            return ""
        name = build_step_span_name(forward_batch, True, **kwargs)
        return "sglang" + name[len("step"):] if name.startswith("step[") else name

    annotations_only.__wrapped__ = build_step_span_name
    return annotations_only


def range_unless_unnamed(profile_range: Any) -> Any:
    """Stands in for ``profile_range`` inside ``ModelRunner.forward``: no range for an empty name."""
    global _NO_RANGE
    if _NO_RANGE is None:
        import contextlib

        _NO_RANGE = contextlib.nullcontext()

    def profile_range_if_named(debug_name: str, *args: Any, **kwargs: Any) -> Any:
        if not debug_name:
            return _NO_RANGE
        return profile_range(debug_name, *args, **kwargs)

    profile_range_if_named.__wrapped__ = profile_range
    return profile_range_if_named


class _DraftStepName(str):
    """Our label for a draft replay, still carrying the batch it names: what
    :func:`draft_step_name` hands to :func:`draft_step_range` within one expression."""

    forward_batch: Any = None


def draft_step_name(build_step_span_name: Any) -> Any:
    """``build_step_span_name`` where sglang names a range itself around draft replays that
    bypass ``ModelRunner.forward`` (multi-layer EAGLE's draft-extend CUDA graph)."""

    def name_as_draft_step(forward_batch: Any, *args: Any, **kwargs: Any) -> str:
        name = _DraftStepName(describe(forward_batch, is_draft_worker=True).label)
        name.forward_batch = forward_batch
        return name

    name_as_draft_step.__wrapped__ = build_step_span_name
    return name_as_draft_step


class _DraftStep:
    """The draft step around a replay sglang wraps in ``profile_range(build_step_span_name(b))``:
    the span and the range, through the same runtime as every other step."""

    __slots__ = ("forward_batch", "opened")

    def __init__(self, forward_batch: Any) -> None:
        self.forward_batch = forward_batch
        self.opened: Any = None

    def __enter__(self) -> "_DraftStep":
        static = _replay_attributes(None)
        self.opened = runtime.begin(_capture_replay, finish, static, (None, self.forward_batch))
        return self

    def __exit__(self, kind: Any, error: Any, traceback: Any) -> bool:
        if self.opened is not None:
            runtime.end(self.opened, error)
        return False


def draft_step_range(profile_range: Any) -> Any:
    """``profile_range`` in the same module: a draft step for a name :func:`draft_step_name`
    made, sglang's own range for anything else."""

    def profile_range_or_draft_step(debug_name: Any, *args: Any, **kwargs: Any) -> Any:
        if type(debug_name) is _DraftStepName:
            return _DraftStep(debug_name.forward_batch)
        return profile_range(debug_name, *args, **kwargs)

    profile_range_or_draft_step.__wrapped__ = profile_range
    return profile_range_or_draft_step


# -- draft steps replayed from a CUDA graph --------------------------------------------------


def _capture_replay(graph_runner: Any, forward_batch: Any) -> Captured:
    return capture(forward_batch, True, None)


def _replay_attributes(graph_runner: Any) -> dict[str, AttributeValue]:
    runner = getattr(graph_runner, "model_runner", None)
    if runner is None:
        return engine_attributes("sglang", *_process_ranks())
    return _runner_facts(runner).attributes


def traced_replay(execute: Any) -> Any:
    """A draft CUDA-graph runner's ``execute(forward_batch, ...)`` with a ``draft`` step span.

    EAGLE v2 and frozen-KV MTP replay their draft forwards from these graphs without calling
    ``ModelRunner.forward``. A graph runner that a ``ModelRunner`` owns (its
    ``decode_cuda_graph_runner``) is replayed from inside that runner's traced forward: no
    second step then."""
    traced = runtime.wrap_method(execute, _capture_replay, finish, _replay_attributes, label_of)

    def execute_as_draft_step(self: Any, forward_batch: Any, *args: Any, **kwargs: Any) -> Any:
        owner = getattr(self, "model_runner", None)
        if owner is not None and getattr(owner, "decode_cuda_graph_runner", None) is self:
            return execute(self, forward_batch, *args, **kwargs)
        return traced(self, forward_batch, *args, **kwargs)

    execute_as_draft_step.__wrapped__ = execute
    execute_as_draft_step.__name__ = getattr(execute, "__name__", "execute")
    return execute_as_draft_step


# -- the instrumentor ------------------------------------------------------------------------


_NO_STEPS = "sglang's forwards get no step span (no label in the profiler, no OTel span)"
_NO_DRAFT_STEPS = "the draft forwards this runner replays from CUDA graphs get no step span"


def patch_points() -> tuple[PatchPoint, ...]:
    """Where the instrumentor patches sglang, and what each place is for."""
    points = [
        PatchPoint(MODULE, METHOD, traced_forward, _NO_STEPS, params=("self", "forward_batch")),
        PatchPoint(MODULE, STEP_NAME, step_name_without_range,
                   "the profiler shows sglang's own step range beside ours", since="0.5.11"),
        PatchPoint(MODULE, STEP_RANGE, range_unless_unnamed,
                   "the profiler shows sglang's own step range beside ours", since="0.5.11"),
        PatchPoint(BATCH_MODULE, INIT_NEW, counted_init_new,
                   "mixed steps say ext=? dec=?, and steps carry no request links"),
        PatchPoint(SCHEDULER_MODULE, SCHEDULER_INIT, remembered_scheduler,
                   "steps carry no request links and no scheduler queue counts"),
    ]
    points += [
        PatchPoint(module, dotted, traced_replay, _NO_DRAFT_STEPS, params=("self", "forward_batch"),
                   optional_module=True)
        for module, dotted in GRAPH_REPLAYS
    ]
    for module in NAMED_REPLAYS:
        points += [
            PatchPoint(module, STEP_NAME, draft_step_name, _NO_DRAFT_STEPS, optional_module=True),
            PatchPoint(module, STEP_RANGE, draft_step_range, _NO_DRAFT_STEPS, optional_module=True),
        ]
    return tuple(points)


class SGLangInstrumentor(EngineInstrumentor):
    """Step spans for sglang's ``ModelRunner.forward`` (target and draft runners alike); in
    code, also in the scheduler processes sglang spawns afterwards."""

    engine_module = "sglang"

    def instrumentation_dependencies(self) -> Collection[str]:
        return _instruments

    def patch_points(self) -> tuple[PatchPoint, ...]:
        return patch_points()


def is_instrumented() -> bool:
    """True when ``ModelRunner.forward`` currently carries the step span."""
    return is_patched(MODULE, METHOD)
