"""Run a real sglang ``Engine`` through the workloads the real-engine tests check.

Run by ``tests/test_real_sglang.py`` with the sglang environment's python, the checkout and this
folder's ``truth`` (ground-truth hook) and ``stand_in`` on ``PYTHONPATH``; with
``otel_stepspan/cli/_bootstrap`` first there too when the run is instrumented, as
``otel-stepspan run`` does it. Writes the generated token ids per request to ``--out``.

Workloads, in one engine session (each request is greedy, ``ignore_eos``):
  1. two prompts at once: a prefill of two rows, then decodes;
  2. a prompt longer than ``chunked_prefill_size``: a chunked prefill;
  3. a long request decoding while two more join it (``enable_mixed_chunk``): a new prompt, and
     one identical to a finished one, all but its last token cached in the radix tree (it extends
     by one token, like the decodes it is mixed with).
"""

import argparse
import asyncio
import json
import os
import time

CHUNK = 32


def prompt(start, length):
    return [(start + 7 * i) % 500 + 3 for i in range(length)]


async def generate(engine, name, input_ids, max_new_tokens, outputs):
    out = await engine.async_generate(
        input_ids=input_ids,
        sampling_params={"max_new_tokens": max_new_tokens, "temperature": 0, "ignore_eos": True},
    )
    outputs[name] = out["output_ids"]


async def join_running(engine, outputs, cached_prompt):
    """A long request decodes; once it has produced tokens, two requests join it."""
    stream = await engine.async_generate(
        input_ids=prompt(11, 12),
        sampling_params={"max_new_tokens": 40, "temperature": 0, "ignore_eos": True},
        stream=True,
    )
    joined = None
    async for chunk in stream:
        outputs["running"] = chunk["output_ids"]
        if joined is None and len(chunk["output_ids"]) >= 3:
            joined = asyncio.ensure_future(asyncio.gather(
                generate(engine, "joining", prompt(200, 20), 4, outputs),
                generate(engine, "joining_cached", cached_prompt, 4, outputs),
            ))
    await joined


async def workloads(engine, short):
    outputs = {}
    first = prompt(1, 24)
    await asyncio.gather(
        generate(engine, "pair_a", first, 6, outputs),
        generate(engine, "pair_b", prompt(100, 17), 6, outputs),
    )
    if short:
        return outputs
    await generate(engine, "chunked", prompt(300, 2 * CHUNK + 16), 4, outputs)
    await join_running(engine, outputs, first)
    return outputs


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--overlap", choices=("on", "off"), default="on")
    parser.add_argument("--profile-dir")
    parser.add_argument("--annotations", action="store_true")
    parser.add_argument("--short", action="store_true", help="workload 1 only")
    parser.add_argument("--wait-for", help="before shutting down, wait until this file exists")
    args = parser.parse_args()

    from sglang.srt.entrypoints.engine import Engine

    engine = Engine(
        model_path=args.model,
        device="cpu",
        attention_backend="torch_native",
        skip_tokenizer_init=True,
        disable_cuda_graph=True,
        enable_mixed_chunk=True,
        chunked_prefill_size=CHUNK,
        disable_overlap_schedule=args.overlap == "off",
        max_total_tokens=4096,
        random_seed=0,
        log_level="warning",
    )
    if args.profile_dir:
        engine.start_profile(
            output_dir=args.profile_dir,
            activities=["CPU"],
            with_stack=False,
            record_shapes=False,
            detailed_annotations=args.annotations,
        )
    outputs = engine.loop.run_until_complete(workloads(engine, args.short))
    if args.profile_dir:
        engine.stop_profile()
    with open(args.out, "w") as handle:
        json.dump(outputs, handle)
    if args.wait_for:
        deadline = time.monotonic() + 120
        while not os.path.exists(args.wait_for) and time.monotonic() < deadline:
            time.sleep(0.05)
    engine.shutdown()


if __name__ == "__main__":
    main()
