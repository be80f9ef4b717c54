"""Ground truth for the real-engine tests: what sglang's scheduler scheduled, forward by forward.

Imported at start-up by every Python process of the engine under test (this directory is on
``PYTHONPATH``; under ``otel-stepspan run`` its bootstrap chains to this file). In the scheduler
process it records, for every ``TpModelWorker.forward_batch_generation(batch)``, the scheduler's
own ``ScheduleBatch`` as it stands when the worker gets it: mode, rows, each row's request id and
extend length, and, for a MIXED batch, how many rows it had before ``mix_with_running`` appended
the running decodes (read from ``batch.reqs`` there); and the scheduler around it, through the
scheduler ``Scheduler.run_batch`` was called on: its waiting queue's length and the KV tokens in
use by sglang's own account (``pool_stats_observer.get_pool_stats()``, the ``#token`` of its
logs). Nothing here reads what otel_stepspan reads (``decoding_reqs``, ``ForwardBatch``, the
requests' trace contexts) nor imports otel_stepspan.

One JSON line per forward goes to ``$SGLANG_TRUTH_DIR/truth-<pid>.jsonl``, flushed at once, so
a scheduler killed by ``Engine.shutdown()`` loses none.
"""

import json
import os
import time

_DIR = os.environ.get("SGLANG_TRUTH_DIR")
_PROMPT_ROWS = "_truth_prompt_rows"
_running = {}  # "scheduler": the scheduler whose run_batch is running


def _record_mixing(mix_with_running):
    def mix_with_running_recorded(self, running_batch, *args, **kwargs):
        setattr(self, _PROMPT_ROWS, len(self.reqs))
        return mix_with_running(self, running_batch, *args, **kwargs)

    return mix_with_running_recorded


def _record_scheduler(run_batch):
    def run_batch_recorded(self, *args, **kwargs):
        _running["scheduler"] = self
        return run_batch(self, *args, **kwargs)

    return run_batch_recorded


def _scheduler_context():
    scheduler = _running.get("scheduler")
    if scheduler is None:
        return {"queued": None, "kv_used": None}
    used, _ = scheduler.pool_stats_observer.get_pool_stats().get_kv_token_stats()
    return {"queued": len(scheduler.waiting_queue), "kv_used": used}


def _parallel_ranks():
    from sglang.srt.runtime_context import get_parallel

    parallel = get_parallel()
    return {
        "tp_rank": parallel.tp_rank,
        "dp_rank": getattr(parallel, "attn_dp_rank", getattr(parallel, "dp_rank", None)),
        "pp_rank": parallel.pp_rank,
    }


def _record_forwards(forward_batch_generation):
    out = []

    def forward_batch_generation_recorded(self, batch, *args, **kwargs):
        if batch is None:
            return forward_batch_generation(self, batch, *args, **kwargs)
        mode = batch.forward_mode.name
        record = {
            "mode": mode,
            "rows": len(batch.reqs),
            "rids": [req.rid for req in batch.reqs],
            "extend_lens": list(batch.extend_lens) if mode in ("EXTEND", "MIXED") else None,
            "prefix_lens": list(batch.prefix_lens) if mode in ("EXTEND", "MIXED") else None,
            "prompt_rows": getattr(batch, _PROMPT_ROWS, None) if mode == "MIXED" else None,
            "is_draft": bool(getattr(self, "is_draft_worker", False)),
        }
        record.update(_scheduler_context())
        result = forward_batch_generation(self, batch, *args, **kwargs)
        record["ended_ns"] = time.time_ns()  # after the forward (and its step span) ended
        record["pass_id"] = self.model_runner.forward_pass_id
        record.update(_parallel_ranks())
        if not out:
            out.append(open(os.path.join(_DIR, "truth-%d.jsonl" % os.getpid()), "a", buffering=1))
        out[0].write(json.dumps(record) + "\n")
        out[0].flush()
        return result

    return forward_batch_generation_recorded


def _install():
    import wrapt

    def on_schedule_batch(module):
        cls = module.ScheduleBatch
        cls.mix_with_running = _record_mixing(cls.mix_with_running)

    def on_tp_worker(module):
        cls = module.TpModelWorker
        cls.forward_batch_generation = _record_forwards(cls.forward_batch_generation)

    def on_scheduler(module):
        cls = module.Scheduler
        cls.run_batch = _record_scheduler(cls.run_batch)

    wrapt.register_post_import_hook(on_schedule_batch, "sglang.srt.managers.schedule_batch")
    wrapt.register_post_import_hook(on_tp_worker, "sglang.srt.managers.tp_worker")
    wrapt.register_post_import_hook(on_scheduler, "sglang.srt.managers.scheduler")


if _DIR:
    _install()
