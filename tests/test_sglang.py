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
    assert SGLangInstrumentor().instrumentation_dependencies() == ("sglang >= 0.5.0, < 0.6",)


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
