"""The ground truth of the vLLM tests: what vLLM's own scheduler scheduled, step by step.

A vLLM general plugin (entry point group ``vllm.general_plugins``, declared by the
``scheduler_record-1.0.dist-info`` folder beside this file, found because the folder is on
``PYTHONPATH``). vLLM loads general plugins in every one of its processes, the engine core
included, whether otel_stepspan is there or not. This module never imports otel_stepspan: the
record is independent of the adapter under test.

With ``SCHEDULER_RECORD_DIR`` set, ``Scheduler.schedule`` is wrapped: after each call, one JSON
line goes to ``<dir>/schedule-<pid>.jsonl`` with the scheduled requests and, for each, the facts
that decide what the forward computes for it, read from vLLM's own ``Request`` objects:

    {"total": T, "queued": Q, "kv_tokens": K,
     "reqs": [[req_id, scheduled, spec, computed_before, prompt_len, num_tokens,
               is_new, output_tokens_in_output, traceparent], ...]}

``computed_before`` is the request's ``num_computed_tokens`` before this step (the scheduler has
already advanced it by ``scheduled`` when ``schedule`` returns); ``num_tokens`` counts its prompt
and output tokens so far. ``output_tokens_in_output`` is what the ``SchedulerOutput`` itself says
(``NewRequestData.num_computed_tokens`` / ``CachedRequestData.num_computed_tokens``), kept to
check the two views agree. ``traceparent`` is the one the request carries in its
``trace_headers`` (None without).

The scheduler context after the call, counted here request by request: ``queued`` the requests
the scheduler holds that wait (status waiting or preempted), ``kv_tokens`` the KV cache blocks the
requests hold (vLLM's null block left out) times the scheduler's block size.

Every execute_model call in vLLM follows one ``schedule`` call, so the lines are the steps. A
driver whose scheduler runs in its own process may put ``{"mark": name}`` lines between them
(:func:`mark`).
"""

from __future__ import annotations

import json
import os

#: Request statuses of vLLM (``vllm.v1.request.RequestStatus``) that wait for the scheduler.
WAITING_STATUSES = ("WAITING", "WAITING_FOR_STRUCTURED_OUTPUT_GRAMMAR", "WAITING_FOR_REMOTE_KVS",
                    "WAITING_FOR_STREAMING_REQ", "PREEMPTED")


def _queued(scheduler) -> int:
    return sum(1 for request in scheduler.requests.values() if request.status.name in WAITING_STATUSES)


def _kv_tokens(scheduler) -> int:
    (manager,) = scheduler.kv_cache_manager.coordinator.single_type_managers
    blocks = sum(1 for held in manager.req_to_blocks.values() for block in held if not block.is_null)
    return blocks * scheduler.block_size


def _record_line(scheduler, output) -> str:
    new_ids = {r.req_id: r.num_computed_tokens for r in output.scheduled_new_reqs}
    cached = output.scheduled_cached_reqs
    cached_computed = dict(zip(cached.req_ids, cached.num_computed_tokens))
    spec = output.scheduled_spec_decode_tokens
    rows = []
    for req_id, scheduled in output.num_scheduled_tokens.items():
        request = scheduler.requests[req_id]
        in_output = new_ids[req_id] if req_id in new_ids else cached_computed.get(req_id)
        rows.append(
            [
                req_id,
                scheduled,
                len(spec.get(req_id, ())),
                request.num_computed_tokens - scheduled,
                request.num_prompt_tokens,
                request.num_tokens,
                req_id in new_ids,
                in_output,
                (request.trace_headers or {}).get("traceparent"),
            ]
        )
    return json.dumps({"total": output.total_num_scheduled_tokens, "queued": _queued(scheduler),
                       "kv_tokens": _kv_tokens(scheduler), "reqs": rows})


def _path() -> str:
    return os.path.join(os.environ["SCHEDULER_RECORD_DIR"], f"schedule-{os.getpid()}.jsonl")


def _append(line: str) -> None:
    with open(_path(), "a") as handle:
        handle.write(line + "\n")


def mark(name: str) -> None:
    """A boundary between the steps before and after, named ``name``."""
    _append(json.dumps({"mark": name}))


def register() -> None:
    if not os.environ.get("SCHEDULER_RECORD_DIR"):
        return
    from vllm.v1.core.sched.scheduler import Scheduler

    original = Scheduler.schedule
    if getattr(original, "_records_schedule", False):
        return

    def schedule(self, *args, **kwargs):
        output = original(self, *args, **kwargs)
        _append(_record_line(self, output))
        return output

    schedule._records_schedule = True
    Scheduler.schedule = schedule
