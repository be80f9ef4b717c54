"""The reference engine: its scheduler batches like sglang (chunked prefill, MIXED steps with the
decodes appended as length-1 extends, IDLE when nothing has arrived, limits respected), its KV
cache computes the same tokens however requests are batched, a run is reproducible under a seed,
and every step span it produces through the sglang integration matches what the scheduler planned."""

from __future__ import annotations

import inspect
import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

import otel_stepspan
from otel_stepspan import runtime
from otel_stepspan.cli.main import main as cli_main
from otel_stepspan.otlp_json import OtlpJsonFileExporter, iter_spans, iter_step_spans

from otel_stepspan.engine import (
    Engine,
    EngineConfig,
    ForwardMode,
    ModelRunner,
    RequestSpec,
    Scheduler,
    SchedulerConfig,
    SteppedClock,
    WorkloadConfig,
    make_workload,
)
from otel_stepspan.engine.scheduler import Req
from otel_stepspan.integrations.sglang import describe


def spec(rid: int, prompt: int, output: int, arrival: float = 0.0) -> RequestSpec:
    return RequestSpec(rid, arrival, tuple((rid * 31 + i) % 97 for i in range(prompt)), output)


def small_engine(clock=None, **overrides) -> Engine:
    config = dict(max_running=8, token_budget=64, chunk_size=32, max_context=256)
    config.update(overrides)
    return Engine(EngineConfig(**config), clock=clock or SteppedClock())


def shape(steps):
    return [(s.mode, s.batch_size, s.extend_tokens, s.decode_seqs, s.prefill_seqs) for s in steps]


# -- scheduler ---------------------------------------------------------------------------------


def run_plans(scheduler: Scheduler, steps: int, token: int = 7):
    plans = []
    for _ in range(steps):
        plan = scheduler.schedule()
        plans.append(plan)
        scheduler.complete(plan, [token] * plan.batch_size)
    return plans


def test_a_long_prompt_is_prefilled_in_chunks_and_samples_only_after_the_last():
    scheduler = Scheduler(SchedulerConfig(max_running=4, token_budget=256, chunk_size=128))
    req = Req(spec(0, 300, 3))
    scheduler.add(req)
    plans = run_plans(scheduler, 2)
    assert [[(e.prefix_len, e.length) for e in p.extends] for p in plans] == [[(0, 128)], [(128, 128)]]
    assert req.output_ids == [] and req.first_token_s is None
    (last,) = run_plans(scheduler, 1)
    assert last.mode == "prefill" and [(e.prefix_len, e.length) for e in last.extends] == [(256, 44)]
    assert req.output_ids == [7] and req.chunks == 3
    assert [p.mode for p in run_plans(scheduler, 2)] == ["decode", "decode"]
    assert req.finished and scheduler.in_flight == 0 and scheduler.reserved == 0
    assert scheduler.schedule().mode == "idle"


def test_the_token_budget_also_cuts_chunks():
    scheduler = Scheduler(SchedulerConfig(max_running=4, token_budget=100, chunk_size=128))
    scheduler.add(Req(spec(0, 250, 1)))
    scheduler.add(Req(spec(1, 30, 1)))
    plans = run_plans(scheduler, 3)
    assert [[(e.req.rid, e.prefix_len, e.length) for e in p.extends] for p in plans] == [
        [(0, 0, 100)],
        [(0, 100, 100)],
        [(0, 200, 50), (1, 0, 30)],
    ]


def test_without_mixing_a_prefill_runs_alone_and_decodes_wait():
    scheduler = Scheduler(SchedulerConfig(max_running=4, token_budget=64, chunk_size=64, mixed=False))
    scheduler.add(Req(spec(0, 10, 5)))
    run_plans(scheduler, 1)
    scheduler.add(Req(spec(1, 10, 5)))
    assert [(p.mode, p.batch_size) for p in run_plans(scheduler, 2)] == [("prefill", 1), ("decode", 2)]


def test_nothing_arrived_means_an_idle_step():
    scheduler = Scheduler(SchedulerConfig())
    plan = scheduler.schedule()
    assert plan.mode == "idle" and plan.batch_size == 0 and plan.num_tokens == 0


def test_admission_waits_for_room_in_the_kv_cache():
    scheduler = Scheduler(SchedulerConfig(max_running=4, token_budget=64, chunk_size=64, kv_capacity=30))
    first, second = Req(spec(0, 10, 10)), Req(spec(1, 10, 10))
    scheduler.add(first)
    scheduler.add(second)
    plan = scheduler.schedule()
    assert [e.req for e in plan.extends] == [first]  # 20 + 20 tokens would not fit in 30
    scheduler.complete(plan, [1])
    while not first.finished:
        scheduler.complete(scheduler.schedule(), [1])
    assert [e.req for e in scheduler.schedule().extends] == [second]


@settings(max_examples=60, deadline=None)
@given(
    max_running=st.integers(1, 6),
    extra_budget=st.integers(0, 40),
    chunk_size=st.integers(1, 48),
    mixed=st.booleans(),
    lengths=st.lists(st.tuples(st.integers(1, 120), st.integers(1, 9)), min_size=1, max_size=12),
    arrivals=st.lists(st.integers(0, 6), min_size=12, max_size=12),
)
def test_every_plan_respects_the_limits_and_every_request_completes(
    max_running, extra_budget, chunk_size, mixed, lengths, arrivals
):
    config = SchedulerConfig(max_running, max_running + extra_budget, chunk_size, kv_capacity=200, mixed=mixed)
    scheduler = Scheduler(config)
    reqs = [Req(spec(i, p, o)) for i, (p, o) in enumerate(lengths)]
    arrive = sorted(zip(arrivals, range(len(reqs))))
    progress = {r.rid: 0 for r in reqs}
    step = 0
    while arrive or scheduler.in_flight:
        while arrive and arrive[0][0] <= step:
            scheduler.add(reqs[arrive.pop(0)[1]])
        plan = scheduler.schedule()
        assert plan.num_tokens <= config.token_budget
        assert plan.batch_size <= config.max_running
        assert scheduler.reserved <= config.kv_capacity
        assert len({id(r) for r in plan.reqs}) == plan.batch_size
        for extend in plan.extends:
            assert 1 <= extend.length <= chunk_size
            assert extend.prefix_len == progress[extend.req.rid]  # chunks continue where they stopped
            progress[extend.req.rid] += extend.length
        for req in plan.decodes:
            assert req.remaining_prompt == 0 and not req.finished
        expected = {(True, True): "mixed", (True, False): "prefill", (False, True): "decode", (False, False): "idle"}
        assert plan.mode == expected[bool(plan.extends), bool(plan.decodes)]
        if plan.mode == "idle":
            assert not scheduler.in_flight or not scheduler.running
        scheduler.complete(plan, [3] * plan.batch_size)
        step += 1
        assert step < 10_000
    assert all(len(r.output_ids) == r.spec.max_new_tokens and r.prefilled == r.prompt_len for r in reqs)
    assert scheduler.reserved == 0


# -- the ForwardBatch, as sglang builds it ----------------------------------------------------


def test_a_mixed_batch_has_the_running_decodes_as_trailing_length_1_extends():
    engine = small_engine()
    a, b = Req(spec(0, 5, 10)), Req(spec(1, 7, 10))
    engine.scheduler.add(a)
    engine.scheduler.add(b)
    stat, batch = engine.step(0.0)
    assert batch.forward_mode is ForwardMode.EXTEND and batch.extend_seq_lens_cpu == [5, 7]
    engine.scheduler.add(Req(spec(2, 40, 10)))
    first_outputs = [a.output_ids[0], b.output_ids[0]]
    stat, batch = engine.step(0.0)
    assert batch.forward_mode is ForwardMode.MIXED
    assert batch.batch_size == 3
    assert batch.extend_seq_lens_cpu == [32, 1, 1]
    assert batch.extend_num_tokens == 32 + 2
    assert batch.extend_prefix_lens_cpu == [0, 5, 7]
    assert batch.seq_lens_cpu.tolist() == [32, 6, 8]
    assert batch.input_ids.shape == (34,)
    assert batch.input_ids[-2:].tolist() == first_outputs  # each decode feeds its last token back
    assert batch.positions[-2:].tolist() == [5, 7]
    assert batch.forward_mode.is_extend()  # sglang's predicate: why the integration goes by name
    assert describe(batch).label == "step[mixed bs=3 ext=32 dec=2]"
    assert (stat.mode, stat.batch_size, stat.extend_tokens, stat.decode_seqs) == ("mixed", 3, 32, 2)


def test_decode_and_idle_batches_look_like_sglangs():
    engine = small_engine()
    idle_stat, idle = engine.step(0.0)
    assert idle.forward_mode is ForwardMode.IDLE and idle.batch_size == 0 and idle.input_ids.numel() == 0
    assert idle_stat.mode == "idle" and describe(idle).label == "step[idle]"
    engine.scheduler.add(Req(spec(0, 4, 5)))
    engine.scheduler.add(Req(spec(1, 6, 5)))
    engine.step(0.0)
    _, decode = engine.step(0.0)
    assert decode.forward_mode is ForwardMode.DECODE and decode.batch_size == 2
    assert decode.extend_seq_lens_cpu is None and decode.extend_num_tokens is None
    assert decode.seq_lens_cpu.tolist() == [5, 7]
    assert describe(decode).label == "step[decode bs=2]"


def test_the_runner_is_sglang_shaped_and_traced_by_the_sglang_integration():
    original = ModelRunner.forward.__wrapped__
    assert list(inspect.signature(original).parameters) == [
        "self",
        "forward_batch",
        "skip_attn_backend_init",
        "pp_proxy_tensors",
        "reinit_attn_backend",
        "split_forward_count",
    ]
    assert ModelRunner.forward.__module__ == original.__module__
    assert ModelRunner.forward is not original


# -- whole runs --------------------------------------------------------------------------------


def test_an_idle_engine_runs_idle_steps_until_requests_arrive():
    engine = small_engine()
    result = engine.run([spec(0, 20, 3, arrival=0.05), spec(1, 10, 2, arrival=0.3)])
    modes = [s.mode for s in result.steps]
    assert modes[0] == "idle"
    first_work = modes.index("prefill")
    assert set(modes[:first_work]) == {"idle"} and first_work >= 2
    assert "idle" in modes[first_work:]  # the gap before the second arrival
    assert all(s.batch_size == s.num_tokens == 0 for s in result.steps if s.mode == "idle")
    assert [r.output_len for r in result.requests] == [3, 2]


def test_a_run_is_reproducible_under_a_seed():
    config = WorkloadConfig(requests=12, rate=40.0, prompt_len=24, output_len=6, seed=5)
    assert make_workload(config) == make_workload(config)
    other_seed = WorkloadConfig(requests=12, rate=40.0, prompt_len=24, output_len=6, seed=6)
    assert make_workload(config) != make_workload(other_seed)
    engines = [small_engine(max_context=config.max_prompt_len() + config.max_output_len()) for _ in range(2)]
    runs = [engine.run(make_workload(config)) for engine in engines]
    assert shape(runs[0].steps) == shape(runs[1].steps)
    assert runs[0].outputs == runs[1].outputs
    assert {"idle", "prefill", "decode", "mixed"} <= {s.mode for s in runs[0].steps}
    runner = engines[0].runner  # and every KV slot and request row came back
    assert runner.token_to_kv_pool.available() == engines[0].config.kv_tokens()
    assert runner.req_to_token_pool.available() == engines[0].config.max_running


def test_workload_lengths_follow_their_distribution():
    for dist in ("exponential", "uniform", "fixed"):
        config = WorkloadConfig(requests=400, rate=10.0, prompt_len=50, output_len=8, length_dist=dist, seed=1)
        specs = make_workload(config)
        prompts = [s.prompt_len for s in specs]
        assert min(prompts) >= 1 and max(prompts) <= config.max_prompt_len()
        assert 40 <= sum(prompts) / len(prompts) <= 60, dist
        gaps = [b.arrival_s - a.arrival_s for a, b in zip(specs, specs[1:])]
        assert min(gaps) >= 0 and 0.08 <= sum(gaps) / len(gaps) <= 0.12  # Poisson at 10/s
    assert all(s.arrival_s == 0 for s in make_workload(WorkloadConfig(requests=5, rate=math.inf)))


def test_the_tokens_do_not_depend_on_how_requests_were_batched():
    """KV cache, masks and positions are right: chunked, mixed, batched serving computes exactly
    the tokens of serving each request alone with its whole prompt in one step."""
    workload = WorkloadConfig(requests=10, rate=200.0, prompt_len=20, output_len=8, seed=2)
    context = workload.max_prompt_len() + workload.max_output_len()
    alone = small_engine(max_running=1, token_budget=256, chunk_size=256, max_context=context)
    packed = small_engine(max_running=6, token_budget=24, chunk_size=8, max_context=context)
    alone, packed = alone.run(make_workload(workload)), packed.run(make_workload(workload))
    modes = {s.mode for s in packed.steps}
    assert {"mixed", "decode", "prefill"} <= modes
    assert any(r.prefill_chunks > 1 for r in packed.requests)
    assert "mixed" not in {s.mode for s in alone.steps}
    assert packed.outputs == alone.outputs
    assert all(len(packed.outputs[r.rid]) == r.output_len for r in packed.requests)


def test_every_step_span_matches_what_the_scheduler_planned(memory_spans):
    workload = WorkloadConfig(requests=10, rate=60.0, prompt_len=40, output_len=6, seed=3)
    engine = small_engine(max_context=workload.max_prompt_len() + workload.max_output_len())
    result = engine.run(make_workload(workload))
    spans = sorted(memory_spans.spans(), key=lambda s: s.attributes["forward.pass_id"])
    assert len(spans) == len(result.steps)
    assert [s.attributes["forward.pass_id"] for s in spans] == list(range(1, len(spans) + 1))
    for span, step in zip(spans, result.steps):
        attrs = span.attributes
        assert attrs["forward.pass_id"] == step.pass_id
        assert (
            attrs["forward.mode"],
            attrs["forward.batch_size"],
            attrs["forward.extend_tokens"],
            attrs["forward.decode_seqs"],
            attrs["forward.prefill_seqs"],
            attrs["forward.num_tokens"],
        ) == (
            step.mode, step.batch_size, step.extend_tokens, step.decode_seqs, step.prefill_seqs, step.num_tokens
        )
        assert span.name == attrs["forward.label"]
        assert attrs["engine.tp_rank"] == 0 and attrs["engine.pp_rank"] == 0
        # the scheduler's context, even with no request tracing; links only with it
        context = (attrs["scheduler.queued_requests"], attrs["scheduler.kv_tokens"])
        assert context == (step.queued_requests, step.kv_tokens)
        assert "forward.request_links" not in attrs and not span.links
    assert {"idle", "prefill", "decode", "mixed"} <= {s.attributes["forward.mode"] for s in spans}


# -- request tracing: requests <-> steps ---------------------------------------------------------


@pytest.fixture
def spans_file(tmp_path, monkeypatch):
    """The process's provider writes every span to an OTLP/JSON file, as the demo's does."""
    path = tmp_path / "spans.jsonl"
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(OtlpJsonFileExporter(path)))
    monkeypatch.setattr(trace, "_TRACER_PROVIDER", provider)
    runtime.refresh_settings()
    yield provider, path
    provider.shutdown()


def request_report(capsys, path, key) -> dict:
    assert cli_main(["request", key, "--file", str(path), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_every_requests_steps_found_by_otel_stepspan_request_are_what_the_scheduler_planned(spans_file, capsys):
    """The engine traces its requests: from the spans file, ``otel-stepspan request <trace id>``
    lists for each request exactly the steps the scheduler planned for it (their pass ids, the
    prompt chunks with their lengths, every decode), the time it queued before its first
    planned step, and its tokens: its prompt and one decode per output after the first."""
    provider, path = spans_file
    workload = WorkloadConfig(requests=10, rate=300.0, prompt_len=40, output_len=6, seed=3)
    config = EngineConfig(max_running=4, token_budget=48, chunk_size=24,
                          max_context=workload.max_prompt_len() + workload.max_output_len())
    engine = Engine(config, clock=SteppedClock(), request_tracer=provider.get_tracer("engine"))
    result = engine.run(make_workload(workload))
    assert otel_stepspan.flush(10.0)
    planned: dict[int, list[tuple[int, str, int]]] = {}
    for step in result.steps:
        for rid, work, tokens in step.work:
            planned.setdefault(rid, []).append((step.pass_id, work, tokens))
    steps = {s.attributes["forward.pass_id"]: s for s in iter_step_spans(path)}
    pass_of = {s.span_id: pass_id for pass_id, s in steps.items()}
    roots = {s.span_id: s for s in iter_spans(path) if s.name == "request"}
    assert len(roots) == len(result.requests) == workload.requests
    for request in result.requests:
        rid, trace_id, span_id, _ = request.trace
        root = roots[format(span_id, "016x")]
        assert (root.attributes["request.id"], root.trace_id) == (str(request.rid), format(trace_id, "032x"))
        assert root.parent_span_id == ""  # the root of the request's own trace
        report = request_report(capsys, path, format(trace_id, "032x"))
        mine = planned[request.rid]
        assert [(pass_of[s["span_id"]], s["work"], s["tokens"]) for s in report["steps"]] == mine
        assert report["request_id"] == rid == str(request.rid)
        assert report["queued_ms"] == round((steps[mine[0][0]].start_ns - root.start_ns) / 1e6, 6)
        phases = {p["work"]: (p["steps"], p["tokens"]) for p in report["phases"]}
        assert phases["prefill"] == (request.prefill_chunks, request.prompt_len)
        assert phases.get("decode", (0, 0)) == (request.output_len - 1, request.output_len - 1)
        assert report["tokens"] == request.prompt_len + request.output_len - 1
    # the run had what the links are about: chunked prompts, mixed steps, requests kept waiting
    assert any(r.prefill_chunks > 1 for r in result.requests)
    assert any(s.mode == "mixed" for s in result.steps)
    waited = [s for s in result.steps if s.queued_requests > 0]
    assert waited and all(steps[s.pass_id].attributes["scheduler.queued_requests"] == s.queued_requests for s in waited)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_the_engine_plans_the_same_steps_and_traces_them(memory_spans):
    workload = WorkloadConfig(requests=8, rate=80.0, prompt_len=40, output_len=6, seed=4)
    context = workload.max_prompt_len() + workload.max_output_len()
    cpu = small_engine(max_context=context).run(make_workload(workload))
    config = EngineConfig(max_running=8, token_budget=64, chunk_size=32, max_context=context, device="cuda")
    engine = Engine(config, clock=SteppedClock(), request_tracer=memory_spans.provider.get_tracer("engine"))
    assert engine.runner.model.lm_head.weight.is_cuda
    result = engine.run(make_workload(workload))
    assert shape(result.steps) == shape(cpu.steps)
    spans = memory_spans.spans()
    assert len(spans) == len(cpu.steps) + len(result.steps)
    on_cuda = spans[len(cpu.steps):]  # linked to its requests, with the KV count read from the device's pool
    assert all(len(s.links) == s.attributes["forward.batch_size"] for s in on_cuda)
    assert [s.attributes["scheduler.kv_tokens"] for s in on_cuda] == [s.kv_tokens for s in result.steps]
