"""A small reference inference engine that batches like sglang, for demos and tests.

Usage::

    python -m otel_stepspan.engine.demo            # or: otel-stepspan demo
    # writes trace.json (Perfetto) and spans.jsonl (OTLP/JSON), prints a per-mode summary

Continuous batching with chunked prefill and mixed prefill/decode steps, a small seeded
transformer with a paged KV cache, CPU or CUDA. Its ``ModelRunner.forward`` is shaped like
sglang's and carries the step span through the sglang integration itself. This package only
hands names on.
"""

from .batch import ForwardBatch, ForwardMode
from .engine import Engine, EngineConfig, EngineResult, RequestStat, SteppedClock, StepStat
from .runner import ModelRunner
from .scheduler import Scheduler, SchedulerConfig, StepPlan
from .workload import RequestSpec, WorkloadConfig, make_workload

__all__ = [
    "Engine",
    "EngineConfig",
    "EngineResult",
    "ForwardBatch",
    "ForwardMode",
    "ModelRunner",
    "RequestSpec",
    "RequestStat",
    "Scheduler",
    "SchedulerConfig",
    "StepPlan",
    "StepStat",
    "SteppedClock",
    "WorkloadConfig",
    "make_workload",
]
