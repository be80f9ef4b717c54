"""Continuous batching for the reference engine: which tokens each step computes.

The policy is sglang's, reduced to what shapes a step:

- every running request decodes one token per step, as long as it runs;
- the rest of the step's token budget goes to prompts: first to prompts already being prefilled
  (a chunked prefill continues where it stopped), then to newly admitted requests, oldest first;
- a prompt longer than ``chunk_size`` (or than what is left of the budget) is split across steps
  (chunked prefill); its first output token is sampled by the step that computes its last chunk;
- with ``mixed`` on (sglang's ``--enable-mixed-chunk``), prefill chunks and the running decodes go
  into one MIXED step, the decodes *appended* as length-1 extends exactly as sglang's
  ``mix_with_running`` does; with it off, a step with prompt work is a pure EXTEND and the
  decodes wait;
- admission stops at ``max_running`` requests (prefilling and decoding together) and when the
  KV cache could not hold the request's prompt and all its output;
- when nothing is runnable (no request has arrived yet) the step is IDLE.

Pure Python, no torch: the plan says which request computes which tokens; the engine turns it
into a :class:`~otel_stepspan.engine.batch.ForwardBatch`.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from .workload import RequestSpec

IDLE, PREFILL, DECODE, MIXED = "idle", "prefill", "decode", "mixed"


@dataclass(frozen=True)
class SchedulerConfig:
    max_running: int = 16
    token_budget: int = 256
    chunk_size: int = 128
    kv_capacity: Optional[int] = None  # tokens; None: unbounded
    mixed: bool = True

    def __post_init__(self) -> None:
        for name in ("max_running", "token_budget", "chunk_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.token_budget < self.max_running:
            # A full batch of decodes must fit in one step, or running requests would starve.
            raise ValueError("token_budget must be >= max_running")


@dataclass(eq=False)
class Req:
    """A request inside the engine: its spec plus how far it has got."""

    spec: RequestSpec
    prefilled: int = 0  # prompt tokens whose KV is cached
    output_ids: list[int] = field(default_factory=list)
    chunks: int = 0  # steps that computed part of the prompt
    admitted_s: Optional[float] = None
    first_token_s: Optional[float] = None
    finished_s: Optional[float] = None
    req_pool_idx: Optional[int] = None  # the engine's KV bookkeeping slot
    #: With request tracing: (request id, trace id, span id, trace flags) of the request's span,
    #: what each batch the request is in carries for its row (``mark_requests``).
    trace: Optional[tuple[str, int, int, int]] = None
    span: Any = None  # the request's span itself, ended when the request finishes

    @property
    def rid(self) -> int:
        return self.spec.rid

    @property
    def prompt_len(self) -> int:
        return self.spec.prompt_len

    @property
    def remaining_prompt(self) -> int:
        return self.prompt_len - self.prefilled

    @property
    def kv_need(self) -> int:
        """Tokens of KV cache reserved at admission: its prompt and its outputs (one to spare:
        the last output is sampled but never fed back)."""
        return self.prompt_len + self.spec.max_new_tokens

    @property
    def cached_len(self) -> int:
        """Tokens whose KV is in the cache now."""
        return self.prefilled + max(0, len(self.output_ids) - 1)

    @property
    def finished(self) -> bool:
        return len(self.output_ids) >= self.spec.max_new_tokens


@dataclass(frozen=True)
class Extend:
    """``length`` prompt tokens of ``req``, starting after its ``prefix_len`` cached ones."""

    req: Req
    prefix_len: int
    length: int

    @property
    def completes_prompt(self) -> bool:
        return self.prefix_len + self.length == self.req.prompt_len


@dataclass(frozen=True)
class StepPlan:
    """What one step computes. Batch order: the extends, then the decodes."""

    mode: str
    extends: tuple[Extend, ...] = ()
    decodes: tuple[Req, ...] = ()

    @property
    def batch_size(self) -> int:
        return len(self.extends) + len(self.decodes)

    @property
    def extend_tokens(self) -> int:
        return sum(e.length for e in self.extends)

    @property
    def prefill_seqs(self) -> int:
        return len(self.extends)

    @property
    def decode_seqs(self) -> int:
        return len(self.decodes)

    @property
    def num_tokens(self) -> int:
        return self.extend_tokens + self.decode_seqs

    @property
    def reqs(self) -> list[Req]:
        return [e.req for e in self.extends] + list(self.decodes)

    @property
    def extend_seq_lens(self) -> list[int]:
        """Per sequence, tokens computed: sglang's ``extend_lens`` after ``mix_with_running``."""
        return [e.length for e in self.extends] + [1] * len(self.decodes)

    @property
    def prefix_lens(self) -> list[int]:
        return [e.prefix_len for e in self.extends] + [r.cached_len for r in self.decodes]

    @property
    def work(self) -> tuple[tuple[int, str, int], ...]:
        """What the step computes for each request, in batch order: (request id, ``prefill``
        and its chunk's length, or ``decode`` and 1)."""
        return tuple((e.req.rid, "prefill", e.length) for e in self.extends) + tuple(
            (r.rid, "decode", 1) for r in self.decodes
        )


IDLE_PLAN = StepPlan(IDLE)


class Scheduler:
    """Holds the waiting, prefilling and running requests; plans one step at a time."""

    def __init__(self, config: SchedulerConfig) -> None:
        self.config = config
        self.waiting: deque[Req] = deque()
        self.prefilling: list[Req] = []
        self.running: list[Req] = []
        self.reserved = 0  # KV tokens promised to admitted requests

    def add(self, req: Req) -> None:
        """A request has arrived."""
        self.waiting.append(req)

    @property
    def in_flight(self) -> int:
        return len(self.waiting) + len(self.prefilling) + len(self.running)

    def _can_admit(self, req: Req) -> bool:
        config = self.config
        if len(self.running) + len(self.prefilling) >= config.max_running:
            return False
        return config.kv_capacity is None or self.reserved + req.kv_need <= config.kv_capacity

    def _has_prompt_work(self) -> bool:
        return bool(self.prefilling) or (bool(self.waiting) and self._can_admit(self.waiting[0]))

    def schedule(self, now: float = 0.0) -> StepPlan:
        """The next step. Admits waiting requests (oldest first) as the budget allows."""
        config = self.config
        decodes = tuple(self.running)
        if decodes and not config.mixed and self._has_prompt_work():
            decodes = ()  # sglang without mixed chunk: a prefill batch runs alone
        budget = config.token_budget - len(decodes)
        extends: list[Extend] = []
        for req in self.prefilling:
            if budget <= 0:
                break
            n = min(req.remaining_prompt, config.chunk_size, budget)
            extends.append(Extend(req, req.prefilled, n))
            budget -= n
        while budget > 0 and self.waiting and self._can_admit(self.waiting[0]):
            req = self.waiting.popleft()
            req.admitted_s = now
            self.prefilling.append(req)
            self.reserved += req.kv_need
            n = min(req.remaining_prompt, config.chunk_size, budget)
            extends.append(Extend(req, 0, n))
            budget -= n
        if extends and decodes:
            return StepPlan(MIXED, tuple(extends), decodes)
        if extends:
            return StepPlan(PREFILL, tuple(extends))
        if decodes:
            return StepPlan(DECODE, (), decodes)
        return IDLE_PLAN

    def complete(self, plan: StepPlan, next_tokens: Sequence[int], now: float = 0.0) -> list[Req]:
        """Apply a finished step: ``next_tokens[i]`` is what sequence ``i`` of the batch sampled
        (ignored for a prompt chunk that is not its last). Returns the requests that finished."""
        if len(next_tokens) != plan.batch_size:
            raise ValueError(f"{len(next_tokens)} sampled tokens for a batch of {plan.batch_size}")
        finished: list[Req] = []
        for extend, token in zip(plan.extends, next_tokens):
            req = extend.req
            req.prefilled += extend.length
            req.chunks += 1
            if req.remaining_prompt == 0:
                req.output_ids.append(int(token))
                req.first_token_s = now
                self.prefilling.remove(req)
                if req.finished:
                    finished.append(req)
                else:
                    self.running.append(req)
        for req, token in zip(plan.decodes, next_tokens[len(plan.extends):]):
            req.output_ids.append(int(token))
            if req.finished:
                self.running.remove(req)
                finished.append(req)
        for req in finished:
            req.finished_s = now
            self.reserved -= req.kv_need
        return finished
