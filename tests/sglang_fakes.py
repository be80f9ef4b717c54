"""sglang-shaped stand-ins: a ForwardMode with sglang's member names, ForwardBatch-like objects,
GPU tensors that record any attempt to read their values, and a stand-in ``model_runner`` module
at sglang's real import path with the real ``ModelRunner.forward`` signature (0.5.13+)."""

from __future__ import annotations

import enum
import sys
import types
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from otel_stepspan.integrations.sglang import mark_decode_rows


class ForwardMode(enum.IntEnum):
    """sglang 0.5.23's members (values are auto() there and shift between releases; only names
    matter)."""

    EXTEND = enum.auto()
    DECODE = enum.auto()
    MIXED = enum.auto()
    IDLE = enum.auto()
    TARGET_VERIFY = enum.auto()
    DRAFT_EXTEND_V2 = enum.auto()
    PREBUILT = enum.auto()
    SPLIT_PREFILL = enum.auto()
    DLLM_EXTEND = enum.auto()

    # sglang's own predicate, which is why the adapter must not use it.
    def is_extend(self) -> bool:
        return self in (ForwardMode.EXTEND, ForwardMode.MIXED, ForwardMode.TARGET_VERIFY, ForwardMode.SPLIT_PREFILL)


class OldForwardMode(enum.IntEnum):
    """sglang 0.5.9's members, DRAFT_EXTEND included."""

    EXTEND = enum.auto()
    DECODE = enum.auto()
    MIXED = enum.auto()
    IDLE = enum.auto()
    TARGET_VERIFY = enum.auto()
    DRAFT_EXTEND = enum.auto()
    DRAFT_EXTEND_V2 = enum.auto()
    PREBUILT = enum.auto()
    SPLIT_PREFILL = enum.auto()
    DLLM_EXTEND = enum.auto()


from gpu_fakes import GPU_READS, GpuTensor  # noqa: F401  (re-exported for the sglang tests)


@dataclass
class EagleVerifyInput:
    draft_token_num: int
    spec_steps: int = 3
    topk: int = 1
    draft_token: Any = None


@dataclass
class ForwardBatch:
    """The fields of sglang's ForwardBatch the adapter may see, with sglang's types."""

    forward_mode: Any
    batch_size: int
    input_ids: Any = None
    seq_lens: Any = None
    seq_lens_cpu: Optional[torch.Tensor] = None
    seq_lens_sum: int = 0
    extend_num_tokens: Optional[int] = None
    extend_seq_lens: Any = None
    extend_prefix_lens: Any = None
    extend_seq_lens_cpu: Optional[list[int]] = None
    extend_prefix_lens_cpu: Optional[list[int]] = None
    positions: Any = None
    spec_info: Any = None
    global_num_tokens_cpu: Optional[list[int]] = None
    split_index: int = 0
    num_token_non_padded: Any = field(default_factory=lambda: GpuTensor())


def extend_batch(lens: list[int], prefix: Optional[list[int]] = None) -> ForwardBatch:
    tokens = sum(lens)
    return ForwardBatch(
        ForwardMode.EXTEND,
        len(lens),
        input_ids=GpuTensor(tokens),
        seq_lens=GpuTensor(len(lens)),
        extend_num_tokens=tokens,
        extend_seq_lens=GpuTensor(len(lens)),
        extend_seq_lens_cpu=list(lens),
        extend_prefix_lens_cpu=list(prefix or [0] * len(lens)),
        positions=GpuTensor(tokens),
    )


def decode_batch(bs: int) -> ForwardBatch:
    return ForwardBatch(
        ForwardMode.DECODE,
        bs,
        input_ids=GpuTensor(bs),
        seq_lens=GpuTensor(bs),
        seq_lens_cpu=torch.arange(bs) + 10,
        positions=GpuTensor(bs),
    )


def mixed_batch(prefill_lens: list[int], running_bs: int) -> ForwardBatch:
    """As sglang's mix_with_running builds it: decodes appended as length-1 extends."""
    lens = list(prefill_lens) + [1] * running_bs
    batch = extend_batch(lens)
    batch.forward_mode = ForwardMode.MIXED
    # what the instrumentor copies from the scheduler's ScheduleBatch.decoding_reqs
    mark_decode_rows(batch, running_bs)
    return batch


def verify_batch(bs: int, draft_token_num: int) -> ForwardBatch:
    return ForwardBatch(
        ForwardMode.TARGET_VERIFY,
        bs,
        input_ids=GpuTensor(bs * draft_token_num),
        seq_lens=GpuTensor(bs),
        spec_info=EagleVerifyInput(draft_token_num=draft_token_num, draft_token=GpuTensor(bs * draft_token_num)),
    )


MODULE = "sglang.srt.model_executor.model_runner"


class ModelRunner:
    """The attributes the adapter reads, and forward() with sglang 0.5.13+'s signature."""

    def __init__(self, is_draft_worker: bool = False, tp_rank: int = 0, pp_rank: int = 0) -> None:
        self.is_draft_worker = is_draft_worker
        self.tp_rank = tp_rank
        self.pp_rank = pp_rank
        self.forward_pass_id = 0
        self.seen: list[Any] = []

    def forward(
        self,
        forward_batch,
        skip_attn_backend_init=None,
        pp_proxy_tensors=None,
        reinit_attn_backend=False,
        split_forward_count=1,
    ):
        self.forward_pass_id += 1
        self.seen.append((forward_batch, skip_attn_backend_init, pp_proxy_tensors, split_forward_count))
        if getattr(forward_batch, "explode", None) is not None:
            raise forward_batch.explode
        return ("output", self.forward_pass_id)


def install_model_runner_module() -> types.ModuleType:
    """Put a fresh stand-in module at sglang's import path; returns it."""
    for name in ("sglang", "sglang.srt", "sglang.srt.model_executor"):
        sys.modules.setdefault(name, types.ModuleType(name))
    module = types.ModuleType(MODULE)
    runner_class = type("ModelRunner", (ModelRunner,), {"forward": ModelRunner.forward, "__module__": MODULE})
    module.ModelRunner = runner_class
    sys.modules[MODULE] = module
    return module


def remove_model_runner_module() -> None:
    for name in (MODULE, "sglang.srt.model_executor", "sglang.srt", "sglang"):
        sys.modules.pop(name, None)


# -- sglang's scheduler side: requests traced by sglang, the scheduler, its KV pool --------------


class TraceReqContext:
    """The part of sglang's ``TraceReqContext`` a scheduler-side copy has: ``root_span_context``,
    the OpenTelemetry context of the request's root span (rebuilt from the carrier the tokenizer
    process sent). ``reads`` counts how often it is read."""

    def __init__(self, trace_id: int, span_id: int, trace_flags: int = 1) -> None:
        from opentelemetry import trace

        self.tracing_enable = True
        span = trace.NonRecordingSpan(trace.SpanContext(trace_id, span_id, True, trace.TraceFlags(trace_flags)))
        self._root = trace.set_span_in_context(span)
        self.reads = 0

    @property
    def root_span_context(self) -> Any:
        self.reads += 1
        return self._root


@dataclass
class TraceNullContext:
    """sglang's stand-in for an untraced request: every attribute is itself."""

    tracing_enable: bool = False

    def __getattr__(self, name: str) -> Any:
        return self


@dataclass
class ReqTimeStats:
    trace_ctx: Any = field(default_factory=TraceNullContext)


class Req:
    def __init__(self, rid: str, trace_ctx: Any = None) -> None:
        self.rid = rid
        self.time_stats = ReqTimeStats(trace_ctx if trace_ctx is not None else TraceNullContext())


@dataclass
class ScheduleBatch:
    reqs: list
    decoding_reqs: Optional[list] = None


class TokenToKVPoolAllocator:
    """sglang's ``available_size()`` is ``len()`` of its free list on the device: tensor
    metadata, no synchronisation; here a count."""

    def __init__(self, free: int) -> None:
        self.free = free

    def available_size(self) -> int:
        return self.free


@dataclass
class RadixCache:
    evictable_size_: int

    def evictable_size(self) -> int:
        return self.evictable_size_


@dataclass
class PoolStatsObserver:
    """sglang 0.5.23's ``SchedulerPoolStatsObserver``: the references its ``#token`` is made of."""

    token_to_kv_pool_allocator: Any
    tree_cache: Any
    max_total_num_tokens: int
    is_hybrid_swa: bool = False
    is_hybrid_ssm: bool = False
    enable_hisparse: bool = False


class Scheduler:
    def __init__(self, waiting: int, free: int, evictable: int, total: int = 4096) -> None:
        self.waiting_queue = [Req(f"waiting-{i}") for i in range(waiting)]
        self.pool_stats_observer = PoolStatsObserver(TokenToKVPoolAllocator(free), RadixCache(evictable), total)
