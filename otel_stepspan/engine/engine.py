"""The reference engine's loop: admit what has arrived, schedule, run one forward, sample, repeat.

One iteration is one step: the scheduler's plan becomes a :class:`ForwardBatch` (allocating KV
slots as sglang's ``prepare_for_extend`` / ``prepare_for_decode`` do), the runner's ``forward``
runs it (and carries the step span), greedy sampling picks each sequence's next token, and the
scheduler moves requests along. When nothing is runnable the engine runs an IDLE step and waits a
little for the next arrival, so idle time shows up as steps too.

Timing uses a clock object (``now()``, ``sleep(s)``): the wall clock by default, a simulated one
in tests, which makes a whole run reproducible step for step.

Given a ``request_tracer`` (an OpenTelemetry tracer), the engine traces requests as an inference
server does: one SERVER span per request, the root of its own trace, from its arrival to its last
token, with its ``request.id``. Every batch then carries, per row, the trace context of the
request it computes (``mark_requests``, as the sglang instrumentor writes it from sglang's own
request tracing), so that each step span links to the requests it computed. Every batch also
carries the scheduler's context: requests waiting, KV cache tokens in use.
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Optional, Protocol, Sequence

import torch

from ..integrations.sglang import mark_decode_rows, mark_requests
from .batch import ForwardBatch, ForwardMode, idle_batch
from .model import ModelConfig
from .runner import ModelRunner
from .scheduler import DECODE, IDLE, MIXED, PREFILL, Req, Scheduler, SchedulerConfig, StepPlan
from .workload import RequestSpec

FORWARD_MODES = {
    IDLE: ForwardMode.IDLE,
    PREFILL: ForwardMode.EXTEND,
    DECODE: ForwardMode.DECODE,
    MIXED: ForwardMode.MIXED,
}

#: The KV cache never grows past this many token slots (128 MB with the default model),
#: whatever the flags; admission waits for room instead.
MAX_KV_TOKENS = 1 << 15


class Clock(Protocol):
    def now(self) -> float: ...

    def sleep(self, seconds: float) -> None: ...


class WallClock:
    def now(self) -> float:
        return time.perf_counter()

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


class SteppedClock:
    """A simulated clock: every reading advances it by ``tick_s``; sleeping advances it at once."""

    def __init__(self, tick_s: float = 0.002) -> None:
        self.t = 0.0
        self.tick_s = tick_s

    def now(self) -> float:
        self.t += self.tick_s
        return self.t

    def sleep(self, seconds: float) -> None:
        self.t += max(0.0, seconds)


def resolve_device(name: str) -> torch.device:
    """``cpu``, ``cuda`` (or ``cuda:N``), or ``auto``: CUDA when available."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("CUDA is not available on this machine")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device {name!r}: use cpu, cuda or auto")
    return device


@dataclass(frozen=True)
class EngineConfig:
    max_running: int = 16
    token_budget: int = 256
    chunk_size: int = 128
    mixed: bool = True
    device: str = "cpu"
    vocab_size: int = 512
    max_context: int = 1024
    model_seed: int = 0
    idle_sleep_s: float = 0.01  # how long an idle engine waits before looking for arrivals again

    def kv_tokens(self) -> int:
        return min(self.max_running * self.max_context, max(self.max_context, MAX_KV_TOKENS))


@dataclass(frozen=True)
class StepStat:
    """One step as the scheduler planned it (the ground truth the spans are checked against)."""

    pass_id: int
    mode: str
    batch_size: int
    extend_tokens: int
    decode_seqs: int
    prefill_seqs: int
    num_tokens: int
    start_s: float  # since the engine started
    duration_s: float  # the runner.forward call, as the step span measures it
    #: Per row, what the step computed for its request: (request id, prefill|decode, tokens).
    work: tuple[tuple[int, str, int], ...] = ()
    queued_requests: int = 0  # admitted no further than the waiting queue when the step ran
    kv_tokens: int = 0  # KV cache slots in use during the step, its own new tokens included


@dataclass(frozen=True)
class RequestStat:
    rid: int
    prompt_len: int
    output_len: int
    prefill_chunks: int
    arrival_s: float
    first_token_s: float
    finished_s: float
    #: With request tracing: (request id, trace id, span id, trace flags) of the request's span.
    trace: Optional[tuple[str, int, int, int]] = None

    @property
    def ttft_s(self) -> float:
        return self.first_token_s - self.arrival_s

    @property
    def latency_s(self) -> float:
        return self.finished_s - self.arrival_s


@dataclass
class EngineResult:
    steps: list[StepStat]
    requests: list[RequestStat]
    wall_s: float
    #: The generated token ids, by request id. They stay here: no span ever sees them.
    outputs: dict[int, list[int]]


OnStep = Callable[[StepStat, int], None]  # (the step, requests finished so far)


class Engine:
    def __init__(self, config: EngineConfig, clock: Optional[Clock] = None, request_tracer: Any = None) -> None:
        self.config = config
        self.device = resolve_device(config.device)
        self.clock = clock or WallClock()
        self.request_tracer = request_tracer
        kv_tokens = config.kv_tokens()
        self.scheduler = Scheduler(
            SchedulerConfig(
                max_running=config.max_running,
                token_budget=config.token_budget,
                chunk_size=config.chunk_size,
                kv_capacity=kv_tokens,
                mixed=config.mixed,
            )
        )
        model_config = ModelConfig(vocab_size=config.vocab_size, max_context=config.max_context, seed=config.model_seed)
        self.runner = ModelRunner(model_config, self.device, kv_tokens=kv_tokens, max_running=config.max_running)
        self.finished: list[Req] = []

    # -- building a batch ------------------------------------------------------------------

    def build_batch(self, plan: StepPlan) -> ForwardBatch:
        """The ForwardBatch of ``plan``, allocating the KV slots its new tokens go to."""
        if plan.mode == IDLE:
            return idle_batch(self.device)
        runner = self.runner
        rows: list[int] = []
        input_ids: list[int] = []
        positions: list[int] = []
        token_rows: list[int] = []
        for extend in plan.extends:
            req = extend.req
            if req.req_pool_idx is None:
                req.req_pool_idx = runner.req_to_token_pool.alloc()
            rows.append(req.req_pool_idx)
            end = extend.prefix_len + extend.length
            input_ids.extend(req.spec.prompt_ids[extend.prefix_len:end])
            positions.extend(range(extend.prefix_len, end))
            token_rows.extend([req.req_pool_idx] * extend.length)
        for req in plan.decodes:
            rows.append(req.req_pool_idx)
            input_ids.append(req.output_ids[-1])
            positions.append(req.cached_len)
            token_rows.append(req.req_pool_idx)
        device = self.device

        def on_device(values: list[int]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.int64, device=device)

        out_cache_loc = runner.token_to_kv_pool.alloc(len(input_ids))
        positions_t = on_device(positions)
        runner.req_to_token_pool.req_to_token[on_device(token_rows), positions_t] = out_cache_loc
        prefix_lens = plan.prefix_lens
        extend_lens = plan.extend_seq_lens
        seq_lens = [p + n for p, n in zip(prefix_lens, extend_lens)]
        seq_lens_cpu = torch.tensor(seq_lens, dtype=torch.int64)
        batch = ForwardBatch(
            forward_mode=FORWARD_MODES[plan.mode],
            batch_size=plan.batch_size,
            input_ids=on_device(input_ids),
            req_pool_indices=on_device(rows),
            seq_lens=seq_lens_cpu if device.type == "cpu" else seq_lens_cpu.to(device),
            seq_lens_cpu=seq_lens_cpu,
            out_cache_loc=out_cache_loc,
            positions=positions_t,
            seq_lens_sum=sum(seq_lens),
        )
        if plan.mode != DECODE:
            # sglang's prepare_for_extend, and for MIXED its mix_with_running: the running
            # decodes follow the prompt chunks as length-1 extends.
            starts = [0]
            for n in extend_lens[:-1]:
                starts.append(starts[-1] + n)
            batch.extend_num_tokens = sum(extend_lens)
            batch.extend_seq_lens_cpu = extend_lens
            batch.extend_prefix_lens_cpu = prefix_lens
            batch.extend_seq_lens = on_device(extend_lens)
            batch.extend_prefix_lens = on_device(prefix_lens)
            batch.extend_start_loc = on_device(starts)
            # What sglang's scheduler knows and its ForwardBatch does not carry: how many of
            # the trailing length-1 rows are running decodes (a fully cached prompt is one too).
            mark_decode_rows(batch, len(plan.decodes))
        return batch

    def _release(self, req: Req) -> None:
        runner = self.runner
        row = req.req_pool_idx
        if row is None:
            return
        runner.token_to_kv_pool.free(runner.req_to_token_pool.req_to_token[row, : req.cached_len].clone())
        runner.req_to_token_pool.free(row)
        req.req_pool_idx = None

    # -- the loop --------------------------------------------------------------------------

    def step(self, now: float, t0: float = 0.0) -> tuple[StepStat, ForwardBatch]:
        """One iteration: plan, build the batch, ``runner.forward``, sample, move requests along.

        ``now`` is the engine time the plan is made at, ``t0`` the clock reading engine time
        counts from.
        """
        clock, scheduler, runner = self.clock, self.scheduler, self.runner
        plan = scheduler.schedule(now)
        batch = self.build_batch(plan)
        # The step's requests and the scheduler's context, marked on the batch for its step span
        # (as the sglang instrumentor marks sglang's) and kept for the step's stats.
        queued, kv_tokens = len(scheduler.waiting), self.kv_tokens_in_use()
        mark_requests(batch, [req.trace for req in plan.reqs] if self.request_tracer is not None else None,
                      queued, kv_tokens)
        start = clock.now()
        output = runner.forward(batch)
        duration = clock.now() - start
        if plan.mode != IDLE:
            next_tokens = output.logits.argmax(dim=-1).tolist()
            finished = scheduler.complete(plan, next_tokens, clock.now() - t0)
            for req in finished:
                self._release(req)
                self._end_request_span(req)
            self.finished.extend(finished)
        stat = StepStat(
            runner.forward_pass_id,
            plan.mode,
            plan.batch_size,
            plan.extend_tokens,
            plan.decode_seqs,
            plan.prefill_seqs,
            plan.num_tokens,
            start - t0,
            duration,
            plan.work,
            queued,
            kv_tokens,
        )
        return stat, batch

    def kv_tokens_in_use(self) -> int:
        pool = self.runner.token_to_kv_pool
        return pool.size - pool.available()

    # -- request tracing ---------------------------------------------------------------------

    def _start_request_span(self, req: Req) -> None:
        """The request's SERVER span, the root of its trace, from now (its arrival)."""
        tracer = self.request_tracer
        if tracer is None:
            return
        from opentelemetry.context import Context
        from opentelemetry.trace import SpanKind

        span = tracer.start_span(
            "request", context=Context(), kind=SpanKind.SERVER, attributes={"request.id": str(req.rid)},
            start_time=time.time_ns(),
        )
        context = span.get_span_context()
        req.span = span
        if context.is_valid:  # a disabled SDK's spans have no trace to link to
            req.trace = (str(req.rid), context.trace_id, context.span_id, int(context.trace_flags))

    @staticmethod
    def _end_request_span(req: Req) -> None:
        if req.span is not None:
            counts = {"request.prompt_tokens": req.prompt_len, "request.output_tokens": len(req.output_ids)}
            req.span.set_attributes(counts)
            req.span.end(end_time=time.time_ns())

    def run(self, specs: Sequence[RequestSpec], on_step: Optional[OnStep] = None) -> EngineResult:
        """Serve ``specs`` (arrival times relative to now) to completion."""
        clock, scheduler = self.clock, self.scheduler
        limit = self.config.max_context
        for spec in specs:
            if spec.prompt_len < 1 or spec.max_new_tokens < 1:
                raise ValueError(f"request {spec.rid} has an empty prompt or no output")
            if spec.prompt_len + spec.max_new_tokens > limit:
                raise ValueError(
                    f"request {spec.rid} needs {spec.prompt_len + spec.max_new_tokens} tokens of context; "
                    f"max_context is {limit}"
                )
        pending = deque(sorted(specs, key=lambda s: (s.arrival_s, s.rid)))
        first_done = len(self.finished)
        steps: list[StepStat] = []
        t0 = clock.now()
        while pending or scheduler.in_flight:
            now = clock.now() - t0
            while pending and pending[0].arrival_s <= now:
                req = Req(pending.popleft())
                self._start_request_span(req)
                scheduler.add(req)
            stat, _ = self.step(now, t0)
            steps.append(stat)
            if on_step is not None:
                on_step(stat, len(self.finished) - first_done)
            if stat.mode == IDLE:
                if not pending:
                    raise RuntimeError("the scheduler is stuck: requests wait but none can be admitted")
                wait = pending[0].arrival_s - (clock.now() - t0)
                clock.sleep(min(max(wait, 0.0), self.config.idle_sleep_s))
        wall = clock.now() - t0
        done = sorted(self.finished[first_done:], key=lambda r: r.rid)
        requests = [
            RequestStat(
                r.rid,
                r.prompt_len,
                len(r.output_ids),
                r.chunks,
                r.spec.arrival_s,
                r.first_token_s if r.first_token_s is not None else math.nan,
                r.finished_s if r.finished_s is not None else math.nan,
                r.trace,
            )
            for r in done
        ]
        return EngineResult(steps, requests, wall, {r.rid: list(r.output_ids) for r in done})
