"""Drive vLLM's CPU build through the workloads of the real-engine tests, as a user's script would.

Run with the vLLM environment's python (otel_stepspan and ``scheduler_record`` on
``PYTHONPATH``)::

    python drive.py --model DIR --out result.json [--instrument] [--phases basic]
                    [--traceparents] [--otlp-traces-endpoint ENDPOINT]

``--phases`` is a comma-separated list, run in order, each with its own engine (``LLM``):

- ``basic``: prompts of 17 to 200 tokens with a 96-token budget: prefills, chunked prefills,
  mixed and decode steps (and, with vLLM's default engine-core process, idle steps);
- ``off-on``: the ``basic`` workload twice on one engine, first with no instrumentation in the
  process at all, then after ``VLLMInstrumentor().instrument()``, under the torch profiler
  (needs ``VLLM_ENABLE_V1_MULTIPROCESSING=0``, so that the steps run in this process);
- ``preemption``: a KV cache of 9 blocks for 8 prompts of 120-127 tokens that each generate 150,
  with a 128-token budget: requests are preempted and recomputed;
- ``ngram``: prompts that repeat themselves, with ngram speculative decoding (verify steps).

With ``--traceparents`` the requests go in through vLLM's engine API
(``LLMEngine.add_request(..., trace_headers=...)``) as a traced client would send them: each with
a W3C ``traceparent`` of fresh random ids, but every third with none, and the second one not
sampled (flags ``00``); the headers sent are written to ``--out`` by request id. With
``--otlp-traces-endpoint ENDPOINT`` (implying ``--traceparents``) every engine also traces
requests, as vLLM's option of that name does.

With ``--instrument`` the script calls ``VLLMInstrumentor().instrument()`` first thing, as the
documentation tells users to. Where the scheduler runs in this process, a ``{"mark": phase}`` line
goes into the scheduler record before each phase. The generated token ids of every phase are
written to ``--out``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import secrets

VOCAB = 512  # tiny_model.VOCAB_SIZE

#: Engine settings of each phase; every phase also gets COMMON.
COMMON = dict(
    skip_tokenizer_init=True,
    dtype="float32",
    enforce_eager=True,
    max_model_len=1024,
    enable_prefix_caching=False,
    seed=0,
    kv_cache_memory_bytes=64 << 20,
    disable_log_stats=True,
)
ENGINES = {
    "basic": dict(max_num_batched_tokens=96, max_num_seqs=4),
    "preemption": dict(max_num_batched_tokens=128, max_num_seqs=8, num_gpu_blocks_override=9),
    "ngram": dict(
        max_num_batched_tokens=96,
        max_num_seqs=4,
        speculative_config={"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 4,
                            "prompt_lookup_min": 2},
    ),
}
ENGINES["off-on"] = ENGINES["basic"]


def _tokens(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(3, VOCAB) for _ in range(n)]


def workload(phase: str) -> list[tuple[list[int], int]]:
    """(prompt token ids, tokens to generate) of each request of a phase."""
    if phase in ("basic", "off-on"):
        rng = random.Random(7)
        return [(_tokens(rng, n), m) for n, m in zip((40, 90, 200, 17, 150, 60), (12, 30, 8, 25, 16, 20))]
    if phase == "preemption":
        rng = random.Random(11)
        return [(_tokens(rng, 120 + i), 150) for i in range(8)]
    if phase == "ngram":
        rng = random.Random(13)
        requests = []
        for n, m in ((6, 40), (9, 32), (5, 48), (12, 24)):
            motif = _tokens(rng, n)
            requests.append((motif * 5 + _tokens(rng, 3) + motif, m))
        return requests
    raise SystemExit(f"unknown phase {phase!r}")


def sampling_params(max_tokens: int):
    from vllm import SamplingParams

    return SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True, detokenize=False)


def generate(llm, phase: str) -> list[list[int]]:
    requests = workload(phase)
    prompts = [{"prompt_token_ids": prompt} for prompt, _ in requests]
    params = [sampling_params(m) for _, m in requests]
    return [list(result.outputs[0].token_ids) for result in llm.generate(prompts, params, use_tqdm=False)]


def traceparent(index: int) -> str | None:
    """The ``traceparent`` a client sends with request ``index``: none for every third."""
    if index % 3 == 2:
        return None
    return f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-{'00' if index == 1 else '01'}"


def generate_traced(llm, phase: str, headers: dict[str, str | None]) -> list[list[int]]:
    """The phase's requests through vLLM's engine API, each with its trace headers; ``headers``
    gets the ``traceparent`` sent with each request id."""
    engine = llm.llm_engine
    ids = []
    for index, (prompt, max_tokens) in enumerate(workload(phase)):
        request_id = f"{phase}-{index}"
        headers[request_id] = traceparent(index)
        trace_headers = {"traceparent": headers[request_id]} if headers[request_id] else None
        engine.add_request(request_id, {"prompt_token_ids": prompt}, sampling_params(max_tokens),
                           trace_headers=trace_headers)
        ids.append(request_id)
    outputs: dict[str, list[int]] = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                outputs[output.request_id] = list(output.outputs[0].token_ids)
    return [outputs[request_id] for request_id in ids]


def mark(phase: str) -> None:
    """A phase boundary in the scheduler record, where the scheduler runs in this process."""
    if os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") == "0":
        import scheduler_record

        scheduler_record.mark(phase)


def run_phase(model: str, phase: str, profile_path: str | None, trace: str | None,
              headers: dict[str, str | None] | None) -> dict[str, list[list[int]]]:
    from vllm import LLM

    # vLLM's request spans are made from its request stats: with stats off, a traced request
    # fails vLLM's output processing when it finishes (vLLM 0.32, LLMEngine).
    tracing = {"otlp_traces_endpoint": trace, "disable_log_stats": False} if trace else {}
    llm = LLM(model=model, **{**COMMON, **ENGINES[phase], **tracing})
    try:
        if headers is not None:
            mark(phase)
            return {phase: generate_traced(llm, phase, headers)}
        if phase != "off-on":
            mark(phase)
            return {phase: generate(llm, phase)}
        mark("off")
        off = generate(llm, phase)
        from otel_stepspan.integrations.vllm import VLLMInstrumentor

        VLLMInstrumentor().instrument()
        mark("on")
        import torch

        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
            on = generate(llm, phase)
        if profile_path:
            profiler.export_chrome_trace(profile_path)
        return {"off": off, "on": on}
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--phases", default="basic")
    parser.add_argument("--instrument", action="store_true", help="VLLMInstrumentor().instrument() first")
    parser.add_argument("--profile", help="chrome trace of the off-on phase's instrumented run")
    parser.add_argument("--traceparents", action="store_true", help="requests carry trace headers")
    parser.add_argument("--otlp-traces-endpoint", metavar="ENDPOINT", help="engines trace requests to ENDPOINT")
    args = parser.parse_args()
    send_headers = bool(args.traceparents or args.otlp_traces_endpoint)
    if send_headers and "off-on" in args.phases.split(","):
        raise SystemExit("--traceparents and --otlp-traces-endpoint do not go with the off-on phase")
    if args.instrument:
        from otel_stepspan.integrations.vllm import VLLMInstrumentor

        VLLMInstrumentor().instrument()
    outputs: dict[str, list[list[int]]] = {}
    headers: dict[str, str | None] | None = {} if send_headers else None
    for phase in args.phases.split(","):
        outputs.update(run_phase(args.model, phase, args.profile, args.otlp_traces_endpoint, headers))
    with open(args.out, "w") as handle:
        json.dump({"pid": os.getpid(), "outputs": outputs, "traceparents": headers or {}}, handle)


if __name__ == "__main__":
    main()
