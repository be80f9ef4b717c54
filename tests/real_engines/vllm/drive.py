"""Drive vLLM's CPU build through the workloads of the real-engine tests, as a user's script would.

Run with the vLLM environment's python (otel_stepspan and ``scheduler_record`` on
``PYTHONPATH``)::

    python drive.py --model DIR --out result.json [--instrument] [--phases basic]

``--phases`` is a comma-separated list, run in order, each with its own engine (``LLM``):

- ``basic``: prompts of 17 to 200 tokens with a 96-token budget: prefills, chunked prefills,
  mixed and decode steps (and, with vLLM's default engine-core process, idle steps);
- ``off-on``: the ``basic`` workload twice on one engine, first with no instrumentation in the
  process at all, then after ``VLLMInstrumentor().instrument()``, under the torch profiler
  (needs ``VLLM_ENABLE_V1_MULTIPROCESSING=0``, so that the steps run in this process);
- ``preemption``: a KV cache of 9 blocks for 8 prompts of 120-127 tokens that each generate 150,
  with a 128-token budget: requests are preempted and recomputed;
- ``ngram``: prompts that repeat themselves, with ngram speculative decoding (verify steps).

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


def generate(llm, phase: str) -> list[list[int]]:
    from vllm import SamplingParams

    requests = workload(phase)
    prompts = [{"prompt_token_ids": prompt} for prompt, _ in requests]
    params = [SamplingParams(max_tokens=m, temperature=0, ignore_eos=True, detokenize=False) for _, m in requests]
    return [list(result.outputs[0].token_ids) for result in llm.generate(prompts, params, use_tqdm=False)]


def mark(phase: str) -> None:
    """A phase boundary in the scheduler record, where the scheduler runs in this process."""
    if os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") == "0":
        import scheduler_record

        scheduler_record.mark(phase)


def run_phase(model: str, phase: str, profile_path: str | None) -> dict[str, list[list[int]]]:
    from vllm import LLM

    llm = LLM(model=model, **COMMON, **ENGINES[phase])
    try:
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
    args = parser.parse_args()
    if args.instrument:
        from otel_stepspan.integrations.vllm import VLLMInstrumentor

        VLLMInstrumentor().instrument()
    outputs: dict[str, list[list[int]]] = {}
    for phase in args.phases.split(","):
        outputs.update(run_phase(args.model, phase, args.profile))
    with open(args.out, "w") as handle:
        json.dump({"pid": os.getpid(), "outputs": outputs}, handle)


if __name__ == "__main__":
    main()
