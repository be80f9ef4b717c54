"""The sglang adapter: every mode's counts from sglang-shaped batches, never a GPU read, and the
instrumentor around a stand-in ModelRunner at sglang's real import path."""

from __future__ import annotations

import importlib
import os
import sys
import textwrap

import pytest
import torch
from opentelemetry.trace import SpanKind, StatusCode

import sglang_fakes as fakes
from otel_stepspan import StepInfo
from otel_stepspan.step import RequestLink
from otel_stepspan.integrations import sglang
from otel_stepspan.integrations.sglang import SGLangInstrumentor, describe


@pytest.fixture(autouse=True)
def no_gpu_reads():
    fakes.GPU_READS.clear()
    yield
    assert fakes.GPU_READS == [], f"the adapter read GPU values: {fakes.GPU_READS}"


def test_prefill_counts_prompt_tokens():
    info = describe(fakes.extend_batch([300, 212]))
    assert info == StepInfo("prefill", 2, 512, 0, 2, 512)
    assert info.label == "step[prefill bs=2 toks=512]"


def test_decode_counts_every_sequence():
    info = describe(fakes.decode_batch(4))
    assert info == StepInfo("decode", 4, 0, 4, 0, 4)
    assert info.label == "step[decode bs=4]"


def test_mixed_separates_the_appended_decodes_from_the_prefill_part():
    batch = fakes.mixed_batch([200, 56], running_bs=6)
    # sglang's own bookkeeping makes the naive count zero: bs == len(extend_seq_lens).
    assert batch.batch_size - len(batch.extend_seq_lens_cpu) == 0
    assert batch.forward_mode.is_extend()  # ...and is_extend() would call it a prefill
    info = describe(batch)
    assert info == StepInfo("mixed", 8, 256, 6, 2, 262)
    assert info.label == "step[mixed bs=8 ext=256 dec=6]"


def test_mixed_with_cpu_tensor_mirror():
    batch = fakes.mixed_batch([10], running_bs=3)
    batch.extend_seq_lens_cpu = torch.tensor(batch.extend_seq_lens_cpu)
    assert describe(batch).label == "step[mixed bs=4 ext=10 dec=3]"


def test_verify_counts_draft_tokens_per_request():
    info = describe(fakes.verify_batch(bs=3, draft_token_num=4))
    assert info.mode == "verify"
    assert info.label == "step[verify bs=3 toks=12]"
    assert info.num_tokens == 12 and info.extend_tokens == 0


def test_verify_reads_num_tokens_per_req_when_draft_token_num_is_missing():
    batch = fakes.verify_batch(bs=2, draft_token_num=4)
    batch.spec_info = type("SpecInput", (), {"num_tokens_per_req": 5})()
    assert describe(batch).label == "step[verify bs=2 toks=10]"


def test_draft_runner_steps_are_draft_whatever_mode_they_borrow():
    for batch in (fakes.extend_batch([7, 9]), fakes.decode_batch(2)):
        info = describe(batch, is_draft_worker=True)
        assert info.mode == "draft"
        assert info.label == "step[draft bs=2]"


def test_idle_stays_idle_with_a_padded_batch_size():
    batch = fakes.ForwardBatch(fakes.ForwardMode.IDLE, batch_size=8, input_ids=fakes.GpuTensor(8))
    info = describe(batch)
    assert info.label == "step[idle]"
    assert info.attributes()["forward.batch_size"] == 0


@pytest.mark.parametrize(
    "mode, expected",
    [
        (fakes.ForwardMode.SPLIT_PREFILL, "step[split_prefill bs=2]"),
        (fakes.ForwardMode.DLLM_EXTEND, "step[dllm_extend bs=2]"),
        (fakes.ForwardMode.PREBUILT, "step[prebuilt bs=2]"),
        (fakes.ForwardMode.DRAFT_EXTEND_V2, "step[draft_extend bs=2]"),
        (fakes.OldForwardMode.DRAFT_EXTEND, "step[draft_extend bs=2]"),
    ],
)
def test_other_modes_keep_their_own_name(mode, expected):
    batch = fakes.extend_batch([3, 4])
    batch.forward_mode = mode
    info = describe(batch)
    assert info.label == expected
    assert info.attributes()["forward.extend_tokens"] == 7


def test_missing_cpu_mirrors_degrade_the_label():
    batch = fakes.extend_batch([5, 6])
    batch.extend_num_tokens = None
    batch.extend_seq_lens_cpu = None  # sglang's gpu_only path: lengths only on the GPU
    assert describe(batch).label == "step[prefill bs=2 toks=?]"
    mixed = fakes.mixed_batch([5], 2)
    mixed.extend_seq_lens_cpu = None
    assert describe(mixed).label == "step[mixed bs=3 ext=? dec=2]"


def test_gpu_tensors_where_ints_belong_are_never_read():
    batch = fakes.extend_batch([5, 6])
    batch.extend_num_tokens = fakes.GpuTensor()
    batch.batch_size = fakes.GpuTensor()
    batch.extend_seq_lens_cpu = fakes.GpuTensor(2)
    assert describe(batch).label == "step[prefill bs=? toks=?]"


def test_unreadable_batch_is_an_unknown_step():
    class Hostile:
        def __getattr__(self, name):
            raise RuntimeError("no")

    assert describe(Hostile()).label == "step[unknown bs=?]"
    assert describe(None).label == "step[unknown bs=?]"


# -- the instrumentor ----------------------------------------------------------------------------


@pytest.fixture
def runner_module():
    module = fakes.install_model_runner_module()
    yield module
    SGLangInstrumentor().uninstrument()
    fakes.remove_model_runner_module()


def test_instrumentor_traces_forward_and_passes_everything_through(runner_module, memory_spans):
    SGLangInstrumentor().instrument(skip_dep_check=True)
    assert sglang.is_instrumented()
    runner = runner_module.ModelRunner(tp_rank=1, pp_rank=0)
    batch = fakes.decode_batch(3)
    result = runner.forward(batch, skip_attn_backend_init=True, split_forward_count=2)
    assert result == ("output", 1)
    assert runner.seen == [(batch, True, None, 2)]
    runner.forward(forward_batch=fakes.extend_batch([4, 4]))
    spans = memory_spans.spans()
    assert [s.name for s in spans] == ["step[decode bs=3]", "step[prefill bs=2 toks=8]"]
    first = spans[0]
    assert first.kind == SpanKind.INTERNAL
    assert first.instrumentation_scope.name == "otel_stepspan"
    assert dict(first.attributes) == {
        "forward.mode": "decode",
        "forward.batch_size": 3,
        "forward.extend_tokens": 0,
        "forward.decode_seqs": 3,
        "forward.prefill_seqs": 0,
        "forward.num_tokens": 3,
        "forward.label": "step[decode bs=3]",
        "forward.pass_id": 1,
        "engine.name": "sglang",
        "engine.tp_rank": 1,
        "engine.pp_rank": 0,
        "process.pid": os.getpid(),
    }
    assert spans[1].attributes["forward.pass_id"] == 2


def test_draft_runner_spans_are_draft(runner_module, memory_spans):
    SGLangInstrumentor().instrument(skip_dep_check=True)
    runner_module.ModelRunner(is_draft_worker=True).forward(fakes.decode_batch(5))
    assert [s.name for s in memory_spans.spans()] == ["step[draft bs=5]"]


def test_exception_marks_span_error_and_propagates_the_same_object(runner_module, memory_spans):
    SGLangInstrumentor().instrument(skip_dep_check=True)
    batch = fakes.decode_batch(2)
    boom = RuntimeError("CUDA out of memory")
    batch.explode = boom
    with pytest.raises(RuntimeError) as raised:
        runner_module.ModelRunner().forward(batch)
    assert raised.value is boom
    (span,) = memory_spans.spans()
    assert span.status.status_code == StatusCode.ERROR
    assert "CUDA out of memory" in span.status.description
    (event,) = span.events
    assert event.name == "exception"
    assert event.attributes["exception.type"] == "RuntimeError"
    assert event.attributes["exception.message"] == "CUDA out of memory"


def test_uninstrument_restores_the_original_method(runner_module, memory_spans):
    original = runner_module.ModelRunner.__dict__["forward"]
    SGLangInstrumentor().instrument(skip_dep_check=True)
    assert runner_module.ModelRunner.__dict__["forward"] is not original
    SGLangInstrumentor().uninstrument()
    assert runner_module.ModelRunner.__dict__["forward"] is original
    assert not sglang.is_instrumented()
    runner_module.ModelRunner().forward(fakes.decode_batch(1))
    assert memory_spans.spans() == []


def test_patch_applies_when_sglang_imports_model_runner_later(tmp_path, monkeypatch, memory_spans):
    """opentelemetry-instrument runs instrumentors before the engine imports its runner."""
    package = tmp_path / "sglang" / "srt" / "model_executor"
    package.mkdir(parents=True)
    for folder in (tmp_path / "sglang", tmp_path / "sglang" / "srt", package):
        (folder / "__init__.py").write_text("")
    (package / "model_runner.py").write_text(
        textwrap.dedent(
            """
            from sglang_fakes import ModelRunner as _Base

            class ModelRunner(_Base):
                forward = _Base.forward
            """
        )
    )
    fakes.remove_model_runner_module()
    monkeypatch.syspath_prepend(str(tmp_path))
    SGLangInstrumentor().instrument(skip_dep_check=True)
    try:
        assert fakes.MODULE not in sys.modules
        module = importlib.import_module(fakes.MODULE)
        assert sglang.is_instrumented()
        module.ModelRunner().forward(fakes.mixed_batch([30], 2))
        assert [s.name for s in memory_spans.spans()] == ["step[mixed bs=3 ext=30 dec=2]"]
    finally:
        SGLangInstrumentor().uninstrument()
        fakes.remove_model_runner_module()


def test_entry_point_is_registered_for_opentelemetry_instrument():
    from importlib.metadata import entry_points

    found = {ep.name: ep.value for ep in entry_points(group="opentelemetry_instrumentor")}
    assert found.get("sglang") == "otel_stepspan.integrations.sglang:SGLangInstrumentor"
    assert SGLangInstrumentor().instrumentation_dependencies() == ("sglang >= 0.5.21, < 0.5.24",)


# -- counting decodes from what the scheduler knows ------------------------------------------


def test_a_fully_cached_prompt_in_a_mixed_step_is_prompt_work():
    """sglang's log: #new-seq: 2, #new-token: 21, #running-req: 1. The cached prompt extends by
    one token, like the decode after it; only the scheduler's count tells them apart."""
    batch = fakes.mixed_batch([20, 1], running_bs=1)
    info = describe(batch)
    assert info == StepInfo("mixed", 3, 21, 1, 2, 22)
    assert info.label == "step[mixed bs=3 ext=21 dec=1]"


def test_mixed_without_the_schedulers_count_says_so():
    batch = fakes.mixed_batch([20, 1], running_bs=1)
    delattr(batch, sglang.DECODE_ROWS)
    info = describe(batch)
    assert info.label == "step[mixed bs=3 ext=? dec=?]"
    assert info.num_tokens == 22


def test_an_extend_batch_of_decodes_is_a_decode_step():
    """DP attention's convert_decode_to_extend: EXTEND, one token per row, every row a decode."""
    batch = fakes.extend_batch([1, 1, 1, 1])
    sglang.mark_decode_rows(batch, 4)
    assert describe(batch) == StepInfo("decode", 4, 0, 4, 0, 4)
    batch.extend_seq_lens_cpu = None  # the lengths only on the GPU: every row is still a decode
    assert describe(batch) == StepInfo("decode", 4, 0, 4, 0, 4)


def test_init_new_copies_the_schedulers_decoding_reqs_and_unpatches_cleanly(monkeypatch):
    import types

    class ForwardBatch:
        @classmethod
        def init_new(cls, batch, model_runner):
            made = cls()
            made.built_from = (batch, model_runner)
            return made

    module = types.ModuleType(sglang.BATCH_MODULE)
    module.ForwardBatch = ForwardBatch
    original = ForwardBatch.__dict__["init_new"]
    monkeypatch.setitem(sys.modules, sglang.BATCH_MODULE, module)
    SGLangInstrumentor().instrument(skip_dep_check=True)
    try:
        schedule_batch = type("ScheduleBatch", (), {"decoding_reqs": ["a", "b"]})()
        made = ForwardBatch.init_new(schedule_batch, "runner")
        assert isinstance(made, ForwardBatch) and made.built_from == (schedule_batch, "runner")
        assert getattr(made, sglang.DECODE_ROWS) == 2
        schedule_batch.decoding_reqs = None
        assert getattr(ForwardBatch.init_new(schedule_batch, "runner"), sglang.DECODE_ROWS) == 0
        older = type("ModelWorkerBatch", (), {})()  # a release whose batch has no such field
        assert not hasattr(ForwardBatch.init_new(older, "runner"), sglang.DECODE_ROWS)
    finally:
        SGLangInstrumentor().uninstrument()
    assert ForwardBatch.__dict__["init_new"] is original


# -- requests <-> steps, and the scheduler's context ----------------------------------------------

TRACE_A, TRACE_B, TRACE_C = 0xA1 << 64 | 1, 0xB2 << 64 | 2, 0xC3
ROW_A, ROW_B, ROW_C = ("a", TRACE_A, 0x11, 1), ("b", TRACE_B, 0x22, 1), ("c", TRACE_C, 0x33, 0)


def link(row, work, tokens):
    return RequestLink(*row, work, tokens)


def test_a_mixed_step_links_each_traced_request_with_what_it_did_for_it():
    """Prompt rows first (a chunk of 20, a cached prompt's last token), then the running decodes;
    an untraced request's row links to nothing."""
    batch = fakes.mixed_batch([20, 1], running_bs=2)
    sglang.mark_requests(batch, [ROW_A, ROW_B, None, ROW_C], queued_requests=5, kv_tokens=640)
    info = describe(batch)
    assert info.label == "step[mixed bs=4 ext=21 dec=2]"
    assert info.links == (link(ROW_A, "prefill", 20), link(ROW_B, "prefill", 1), link(ROW_C, "decode", 1))
    assert (info.queued_requests, info.kv_tokens) == (5, 640)
    assert info.attributes()["scheduler.queued_requests"] == 5 and info.attributes()["scheduler.kv_tokens"] == 640


@pytest.mark.parametrize(
    "make, expected",
    [
        (lambda: fakes.decode_batch(2), [("decode", 1), ("decode", 1)]),
        (lambda: fakes.extend_batch([30, 7]), [("prefill", 30), ("prefill", 7)]),
        # DP attention's converted decode batch: every length-1 row is a decode
        (lambda: _marked(fakes.extend_batch([1, 1]), 2), [("decode", 1), ("decode", 1)]),
        (lambda: fakes.verify_batch(2, 4), [("verify", 4), ("verify", 4)]),
        (lambda: _ragged_verify([3, 5]), [("verify", 3), ("verify", 5)]),
        (lambda: _split(fakes.extend_batch([9, 4]), 0), [("prefill", 9), ("prefill", 4)]),
        (lambda: _split(fakes.extend_batch([9, 4]), 1), [("prefill", 0), ("prefill", 0)]),
        # a release without decoding_reqs: a MIXED batch's rows by what they compute
        (lambda: _unmarked(fakes.mixed_batch([12], 1)), [("prefill", 12), ("decode", 1)]),
    ],
)
def test_every_kind_of_step_says_what_it_did_for_each_request(make, expected):
    batch = make()
    sglang.mark_requests(batch, [ROW_A, ROW_B])
    assert describe(batch).links == tuple(link(row, *work) for row, work in zip((ROW_A, ROW_B), expected))


def _marked(batch, decodes):
    sglang.mark_decode_rows(batch, decodes)
    return batch


def _unmarked(batch):
    delattr(batch, sglang.DECODE_ROWS)
    return batch


def _split(batch, index):
    batch.forward_mode = fakes.ForwardMode.SPLIT_PREFILL
    batch.split_index = index
    return batch


def _ragged_verify(lens):
    batch = fakes.verify_batch(len(lens), 1)
    batch.spec_info.ragged_verify_layout = type(
        "RaggedVerifyLayout", (), {"verify_lens_cpu": list(lens), "total_verify_tokens": sum(lens)}
    )()
    return batch


def test_draft_and_idle_steps_link_to_nothing():
    draft = fakes.decode_batch(2)
    sglang.mark_requests(draft, [ROW_A, ROW_B], queued_requests=1)
    info = describe(draft, is_draft_worker=True)
    assert info.mode == "draft" and info.links is None and info.queued_requests == 1
    idle = fakes.ForwardBatch(fakes.ForwardMode.IDLE, 4)
    sglang.mark_requests(idle, [], queued_requests=0, kv_tokens=0)
    assert describe(idle).links == ()


def test_an_engine_that_does_not_trace_requests_gives_no_links_but_its_scheduler_context():
    batch = fakes.decode_batch(3)
    sglang.mark_requests(batch, None, queued_requests=2, kv_tokens=96)
    info = describe(batch)
    assert info.links is None and (info.queued_requests, info.kv_tokens) == (2, 96)
    unmarked = describe(fakes.decode_batch(3))
    assert unmarked == StepInfo("decode", 3, 0, 3, 0, 3)
    assert (unmarked.links, unmarked.queued_requests, unmarked.kv_tokens) == (None, None, None)


@pytest.fixture
def scheduler_modules(monkeypatch):
    """sglang's batch, scheduler and tracing modules at their import paths, the instrumentor on."""
    import types

    class ForwardBatch:
        @classmethod
        def init_new(cls, batch, model_runner):
            return cls()

    batch_module = types.ModuleType(sglang.BATCH_MODULE)
    batch_module.ForwardBatch = ForwardBatch
    scheduler_module = types.ModuleType(sglang.SCHEDULER_MODULE)
    scheduler_module.Scheduler = type("Scheduler", (fakes.Scheduler,), {"__init__": fakes.Scheduler.__init__})
    trace_module = types.ModuleType(sglang.TRACE_MODULE)
    trace_module.opentelemetry_initialized = True
    for module in (batch_module, scheduler_module, trace_module):
        monkeypatch.setitem(sys.modules, module.__name__, module)
    init = scheduler_module.Scheduler.__dict__["__init__"]
    SGLangInstrumentor().instrument(skip_dep_check=True)
    yield types.SimpleNamespace(ForwardBatch=ForwardBatch, Scheduler=scheduler_module.Scheduler, trace=trace_module)
    SGLangInstrumentor().uninstrument()
    assert scheduler_module.Scheduler.__dict__["__init__"] is init


def test_init_new_carries_the_requests_and_the_schedulers_context_while_otel_is_on(scheduler_modules, memory_spans):
    m = scheduler_modules
    scheduler = m.Scheduler(waiting=3, free=1000, evictable=96, total=4096)  # built on this thread
    traced_a, traced_c = fakes.TraceReqContext(TRACE_A, 0x11), fakes.TraceReqContext(TRACE_C, 0x33, trace_flags=0)
    reqs = [fakes.Req("a", traced_a), fakes.Req("untraced"), fakes.Req("c", traced_c)]
    schedule_batch = fakes.ScheduleBatch(reqs, decoding_reqs=reqs[2:])
    runner = fakes.ModelRunner()
    made = m.ForwardBatch.init_new(schedule_batch, runner)
    # sglang's "#token": 4096 - 1000 free - 96 evictable; "#queue-req": 3
    assert getattr(made, sglang.REQUESTS) == ([ROW_A, None, ROW_C], 3, 3000)
    assert getattr(made, sglang.DECODE_ROWS) == 1
    m.ForwardBatch.init_new(schedule_batch, runner)
    assert traced_a.reads == traced_c.reads == 1  # a request's trace context is read once
    draft = m.ForwardBatch.init_new(schedule_batch, fakes.ModelRunner(is_draft_worker=True))
    assert getattr(draft, sglang.REQUESTS) == (None, 3, 3000)
    m.trace.opentelemetry_initialized = False  # sglang without --enable-trace
    assert getattr(m.ForwardBatch.init_new(schedule_batch, runner), sglang.REQUESTS) == (None, 3, 3000)
    del scheduler  # remembered weakly: gone with the scheduler
    assert getattr(m.ForwardBatch.init_new(schedule_batch, runner), sglang.REQUESTS) == (None, None, None)


def test_the_kv_count_is_unknown_for_pools_that_keep_several(scheduler_modules, memory_spans):
    m = scheduler_modules
    scheduler = m.Scheduler(waiting=0, free=10, evictable=0)
    scheduler.pool_stats_observer.is_hybrid_swa = True
    made = m.ForwardBatch.init_new(fakes.ScheduleBatch([]), fakes.ModelRunner())
    assert getattr(made, sglang.REQUESTS) == ([], 0, None)


def test_init_new_adds_nothing_while_otel_is_off(scheduler_modules):
    m = scheduler_modules
    scheduler = m.Scheduler(waiting=1, free=10, evictable=0)
    made = m.ForwardBatch.init_new(fakes.ScheduleBatch([fakes.Req("a")], decoding_reqs=[]), fakes.ModelRunner())
    assert scheduler.waiting_queue
    assert getattr(made, sglang.DECODE_ROWS) == 0 and not hasattr(made, sglang.REQUESTS)


def test_the_step_span_links_to_the_requests_it_computed(runner_module, memory_spans):
    SGLangInstrumentor().instrument(skip_dep_check=True)
    batch = fakes.mixed_batch([20], running_bs=1)
    sglang.mark_requests(batch, [ROW_A, ROW_B], queued_requests=4, kv_tokens=512)
    runner_module.ModelRunner().forward(batch)
    (span,) = memory_spans.spans()
    assert span.attributes["forward.request_links"] == 2
    assert (span.attributes["scheduler.queued_requests"], span.attributes["scheduler.kv_tokens"]) == (4, 512)
    got = [(l.context.trace_id, l.context.span_id, int(l.context.trace_flags), dict(l.attributes)) for l in span.links]
    assert got == [
        (TRACE_A, 0x11, 1, {"request.id": "a", "forward.request.work": "prefill", "forward.request.tokens": 20}),
        (TRACE_B, 0x22, 1, {"request.id": "b", "forward.request.work": "decode", "forward.request.tokens": 1}),
    ]


def test_malformed_request_marks_cost_the_links_not_the_step():
    batch = fakes.decode_batch(2)
    setattr(batch, sglang.REQUESTS, ("not", "a", "context", "at all"))
    assert describe(batch) == StepInfo("decode", 2, 0, 2, 0, 2) and describe(batch).links is None
    sglang.mark_requests(batch, [("a", 1, 2)], queued_requests=1)  # a row of the wrong shape
    assert describe(batch) == StepInfo("decode", 2, 0, 2, 0, 2) and describe(batch).links is None
