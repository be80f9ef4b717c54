"""Model Runner V2 against vLLM's real classes, where it cannot run: V2 needs Triton, which has no
CPU backend, so vLLM's CPU build falls back to the V1 runner for every real step.

Run with the vLLM environment's python (otel_stepspan on ``PYTHONPATH``); prints one JSON object.
What is real here: vLLM's ``GPUModelRunner`` of ``vllm.v1.worker.gpu.model_runner`` and the CPU
build's subclass of it, patched by ``VLLMInstrumentor().instrument()`` when vLLM imports them;
``SchedulerOutput``, ``NewRequestData`` and ``CachedRequestData`` built by their own
constructors (the dummy output exactly as V2's ``_dummy_run`` builds it); and vLLM's own
``compute_iteration_details`` on the same objects. The runner instance has no state (no model,
no device), so the real ``execute_model`` fails at its first use of that state: the span must
carry the label of the step and the error, and the error must reach the caller unchanged.
"""

from __future__ import annotations

import inspect
import json
import sys

from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import otel_stepspan
from otel_stepspan.integrations.vllm import VLLMInstrumentor


def scheduler_outputs() -> dict[str, object]:
    from vllm.v1.core.sched.output import CachedRequestData, NewRequestData, SchedulerOutput

    def new(req_id: str, prompt_len: int) -> NewRequestData:
        return NewRequestData(
            req_id=req_id, prompt_token_ids=list(range(3, 3 + prompt_len)), mm_features=[], sampling_params=None,
            pooling_params=None, block_ids=([0],), num_computed_tokens=0, lora_request=None,
        )

    def output(tokens: dict[str, int], new_reqs: list, cached: CachedRequestData, spec: dict) -> SchedulerOutput:
        return SchedulerOutput(
            scheduled_new_reqs=new_reqs, scheduled_cached_reqs=cached, num_scheduled_tokens=tokens,
            total_num_scheduled_tokens=sum(tokens.values()), scheduled_spec_decode_tokens=spec,
            scheduled_encoder_inputs={}, finished_req_ids=set(), free_encoder_mm_hashes=[],
        )

    # A new prompt, the second chunk of a long one, a decode, and a request resumed after
    # preemption recomputing 127 tokens (prompt and output so far).
    mixed = output(
        {"fresh": 40, "long": 64, "d0": 1, "resumed": 127},
        [new("fresh", 40)],
        CachedRequestData(
            req_ids=["long", "d0", "resumed"], resumed_req_ids={"resumed"}, new_token_ids=[], all_token_ids={},
            new_block_ids=[None, None, None], num_computed_tokens=[64, 70, 0], num_output_tokens=[0, 9, 21],
        ),
        {},
    )
    verify = output(
        {"d0": 4, "d1": 1},
        [],
        CachedRequestData(
            req_ids=["d0", "d1"], resumed_req_ids=set(), new_token_ids=[], all_token_ids={},
            new_block_ids=[None, None], num_computed_tokens=[71, 33], num_output_tokens=[10, 4],
        ),
        {"d0": [7, 8, 9]},
    )
    dummy = SchedulerOutput.make_empty()  # as GPUModelRunner._dummy_run (V2) makes it
    dummy.total_num_scheduled_tokens = 8
    dummy.num_scheduled_tokens = {f"_dummy_req_{i}": 2 for i in range(4)}
    return {"mixed": mixed, "verify": verify, "dummy": dummy}


def main() -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    VLLMInstrumentor().instrument()

    from vllm.v1.utils import compute_iteration_details
    from vllm.v1.worker.cpu.model_runner import CPUModelRunner
    from vllm.v1.worker.gpu.model_runner import GPUModelRunner

    patched = {
        name: getattr(GPUModelRunner, name) is not getattr(GPUModelRunner, name).__wrapped__
        and getattr(CPUModelRunner, name) is getattr(GPUModelRunner, name)
        for name in ("execute_model", "sample_tokens")
    }
    parameters = list(inspect.signature(GPUModelRunner.execute_model.__wrapped__).parameters)
    runner = object.__new__(CPUModelRunner)  # no model, no device: the real method fails early
    outputs = scheduler_outputs()
    calls = {}
    for name, args, kwargs in (
        ("mixed", (outputs["mixed"],), {}),
        ("verify", (), {"scheduler_output": outputs["verify"]}),
        ("dummy", (outputs["dummy"], None, True), {}),  # positionally, as a caller may
        ("dummy_kw", (outputs["dummy"],), {"dummy_run": True, "skip_attn_for_dummy_run": False}),
    ):
        try:
            runner.execute_model(*args, **kwargs)
            calls[name] = None
        except Exception as exc:  # the engine's own error, which must reach us unchanged
            calls[name] = type(exc).__name__
    otel_stepspan.flush(10)
    spans = [
        {
            "name": span.name,
            "status": span.status.status_code.name,
            "exception": [e.attributes.get("exception.type") for e in span.events if e.name == "exception"],
            "attributes": {k: v for k, v in span.attributes.items() if k.startswith("forward.")},
        }
        for span in exporter.get_finished_spans()
    ]
    details = {}
    for name in ("mixed", "verify"):
        d = compute_iteration_details(outputs[name])
        details[name] = [d.num_ctx_requests, d.num_ctx_tokens, d.num_generation_requests, d.num_generation_tokens]
    json.dump(
        {"patched": patched, "parameters": parameters, "calls": calls, "spans": spans,
         "vllm_iteration_details": details},
        sys.stdout,
    )


if __name__ == "__main__":
    main()
