"""sglang integration: a step span around every ``ModelRunner.forward``.

Usage::

    from otel_stepspan.integrations.sglang import SGLangInstrumentor
    SGLangInstrumentor().instrument()
    # or, with no code change: opentelemetry-instrument python -m sglang.launch_server ...

sglang is never imported by this module: ``ForwardBatch`` is read by duck typing, and the patch
is applied when sglang itself imports ``model_runner`` (a post-import hook), so processes that
never load a model pay nothing.

Reading a batch happens in two halves. :func:`capture` runs on the engine thread at entry to
``forward`` (before sglang pads or rewrites the batch): a few attribute reads and no arithmetic,
O(1) whatever the batch size. :func:`finish` turns that capture into a :class:`StepInfo` later,
on the sink's thread. Neither ever touches a value on the GPU: only Python ints, the ``*_cpu``
mirrors and the spec-decoding config are read.
"""

from __future__ import annotations

import enum
import logging
import sys
import weakref
from typing import Any, Collection, NamedTuple, Optional

from .. import runtime
from ..step import AttributeValue, StepInfo, engine_attributes, make_step
from ._instrumentor import BaseInstrumentor, is_patched, patch_when_imported, unpatch
from ._read import as_count, cpu_int_list

logger = logging.getLogger("otel_stepspan")

MODULE = "sglang.srt.model_executor.model_runner"
METHOD = "ModelRunner.forward"
_instruments = ("sglang >= 0.5.0, < 0.6",)

# sglang mode names with a name of their own in the contract. Everything else keeps its own name,
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


class Captured(NamedTuple):
    """What the engine thread keeps of a ``ForwardBatch``: references and Python ints only."""

    forward_mode: Any
    batch_size: Any
    extend_seq_lens_cpu: Any
    extend_num_tokens: Any
    spec_info: Any
    is_draft_worker: bool
    pass_id: Optional[int]


_tuple_new = tuple.__new__


def capture(forward_batch: Any, is_draft_worker: bool = False, pass_id: Optional[int] = None) -> Captured:
    """The engine-thread half of describing a batch: attribute reads, nothing computed. One
    tuple made directly, without the NamedTuple's Python-level constructor: this runs every step."""
    return _tuple_new(
        Captured,
        (
            getattr(forward_batch, "forward_mode", None),
            getattr(forward_batch, "batch_size", None),
            getattr(forward_batch, "extend_seq_lens_cpu", None),
            getattr(forward_batch, "extend_num_tokens", None),
            getattr(forward_batch, "spec_info", None),
            is_draft_worker,
            pass_id,
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
    """The contract's mode for sglang's ``ForwardMode``, by the member's *name*.

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
    from ..step import normalize_mode

    return normalize_mode(name)


def _tokens_per_request(spec_info: Any) -> Optional[int]:
    """Query width of a verify step: EAGLE's ``draft_token_num`` (a Python int), or
    ``num_tokens_per_req`` where a release fills that instead (-1 there means "not set")."""
    if spec_info is None:
        return None
    for name in ("draft_token_num", "num_tokens_per_req"):
        width = as_count(getattr(spec_info, name, None))
        if width:
            return width
    return None


def finish(captured: Captured) -> StepInfo:
    """The off-thread half: counts from the captured CPU values (CONTRACT §1)."""
    mode = "draft" if captured.is_draft_worker else mode_name(captured.forward_mode)
    bs = as_count(captured.batch_size)
    pass_id = captured.pass_id
    if mode == "idle":
        # Under DP attention an idle rank runs a padded dummy batch: nothing real is computed.
        return make_step("idle", 0, 0, 0, 0, 0, pass_id)
    if mode == "decode":
        return make_step("decode", bs, 0, bs, 0, bs, pass_id)
    lens = cpu_int_list(captured.extend_seq_lens_cpu)
    total = as_count(captured.extend_num_tokens)
    if total is None and lens is not None:
        total = sum(lens)
    if mode == "mixed":
        # sglang appends each running decode to the extend batch as a length-1 extend, so the
        # decodes are the length-1 entries and the prefill part is the rest.
        if lens is None:
            return make_step("mixed", bs, None, None, None, total, pass_id)
        decodes = sum(1 for n in lens if n == 1)
        all_tokens = sum(lens)
        return make_step("mixed", bs, all_tokens - decodes, decodes, len(lens) - decodes, all_tokens, pass_id)
    if mode == "verify":
        per_seq = _tokens_per_request(captured.spec_info)
        toks = bs * per_seq if bs is not None and per_seq is not None else None
        return make_step("verify", bs, 0, bs, 0, toks, pass_id)
    if mode == "prefill":
        return make_step("prefill", bs, total, 0, bs, total, pass_id)
    # draft, draft_extend and engine modes of their own: report what the batch says.
    return make_step(mode, bs, total if lens is not None else 0, 0, 0, total, pass_id)


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


def _capture_for(engine_name: str) -> Any:
    """The engine-thread capture of ``ModelRunner.forward`` for runners named ``engine_name``."""

    def capture_forward(runner: Any, forward_batch: Any) -> Captured:
        counter = getattr(runner, "forward_pass_id", None)
        facts = _facts_by_runner.get(id(runner))
        if facts is None or facts.runner() is not runner:
            facts = _runner_facts(runner, engine_name)
        # sglang increments forward_pass_id first thing in forward(): this step's id is the next.
        return capture(forward_batch, facts.is_draft_worker, counter + 1 if type(counter) is int else None)

    return capture_forward


_labels: dict[tuple, str] = {}


def label_of(captured: Captured) -> str:
    """The label alone, for the profiler's range on the engine thread. Steps with no
    per-sequence list (decode, idle, most verify steps) repeat a handful of shapes: their label
    is remembered by (mode member, batch size, draft), at most 4096 of them."""
    forward_mode, bs, lens, _, spec_info, is_draft, _ = captured
    if lens is None and spec_info is None and type(bs) is int and isinstance(forward_mode, enum.Enum):
        key = (id(forward_mode), bs, is_draft)
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

    def runner_attributes(runner: Any) -> dict[str, AttributeValue]:
        return _runner_facts(runner, engine_name).attributes

    return runtime.wrap_method(forward, _capture_for(engine_name), finish, runner_attributes, label_of)


class SGLangInstrumentor(BaseInstrumentor):
    """Step spans for sglang's ``ModelRunner.forward`` (target and draft runners alike)."""

    def instrumentation_dependencies(self) -> Collection[str]:
        return _instruments

    def _instrument(self, **kwargs: Any) -> None:
        patch_when_imported(MODULE, METHOD, traced_forward)

    def _uninstrument(self, **kwargs: Any) -> None:
        unpatch(MODULE, METHOD)


def is_instrumented() -> bool:
    """True when ``ModelRunner.forward`` currently carries the step span."""
    return is_patched(MODULE, METHOD)
