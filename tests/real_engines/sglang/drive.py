"""Run a real sglang ``Engine`` through the workloads the real-engine tests check.

Run by ``tests/test_real_sglang.py`` with the sglang environment's python, the checkout and this
folder's ``truth`` (ground-truth hook) and ``stand_in`` on ``PYTHONPATH``; with
``otel_stepspan/cli/_bootstrap`` first there too when the run is instrumented, as
``otel-stepspan run`` does it. Writes the generated token ids per request to ``--out``.

Each request's sglang id (``rid``) is its workload name. With ``--trace-endpoint``, sglang traces
requests (``enable_trace``, spans to that OTLP endpoint) and every request comes with a client's
W3C ``traceparent`` (``external_trace_header``, as an HTTP client's header would): a fresh trace
id per request, written with its name and prompt length to ``--requests-out``.

Workloads, in one engine session (each request is greedy, ``ignore_eos``):
  1. two prompts at once: a prefill of two rows, then decodes;
  2. a prompt longer than ``chunked_prefill_size``: a chunked prefill, with a short prompt sent
     with it that waits in the scheduler's queue while the chunks take each step's token budget;
  3. a long request decoding while two more join it (``enable_mixed_chunk``): a new prompt, and
     one identical to a finished one, all but its last token cached in the radix tree (it extends
     by one token, like the decodes it is mixed with).

With ``--busy-seconds``, short requests then follow one another for that long (rid ``busy-N``).
Before ``Engine.shutdown()`` the driver writes the time (``time.time_ns()``) to ``shutdown-ns``
beside ``--out``.
"""

import argparse
import asyncio
import json
import os
import time

CHUNK = 32


def prompt(start, length):
    return [(start + 7 * i) % 500 + 3 for i in range(length)]


#: Every request of the workloads, by name: (prompt token ids, max_new_tokens).
REQUESTS = {
    "pair_a": (prompt(1, 24), 6),
    "pair_b": (prompt(100, 17), 6),
    "chunked": (prompt(300, 2 * CHUNK + 16), 4),
    "behind_chunked": (prompt(400, 6), 3),
    "running": (prompt(11, 12), 40),
    "joining": (prompt(200, 20), 4),
    "joining_cached": (prompt(1, 24), 4),  # pair_a's prompt: in the radix cache by then
}
#: name -> the client's trace context, when requests are traced (``--trace-endpoint``)
CLIENT_TRACES = {}


def request_args(name, **extra):
    """What ``async_generate`` gets for the request ``name``: its prompt, its sampling, its
    sglang id, and the client's traceparent when requests are traced."""
    input_ids, max_new_tokens = REQUESTS[name]
    args = dict(
        input_ids=input_ids,
        sampling_params={"max_new_tokens": max_new_tokens, "temperature": 0, "ignore_eos": True},
        rid=name,
        **extra,
    )
    if name in CLIENT_TRACES:
        trace = CLIENT_TRACES[name]
        args["external_trace_header"] = {"traceparent": "00-%s-%s-01" % (trace["trace_id"], trace["span_id"])}
    return args


async def generate(engine, name, outputs):
    out = await engine.async_generate(**request_args(name))
    outputs[name] = out["output_ids"]


async def join_running(engine, outputs):
    """A long request decodes; once it has produced tokens, two requests join it."""
    stream = await engine.async_generate(**request_args("running", stream=True))
    joined = None
    async for chunk in stream:
        outputs["running"] = chunk["output_ids"]
        if joined is None and len(chunk["output_ids"]) >= 3:
            joined = asyncio.ensure_future(asyncio.gather(
                generate(engine, "joining", outputs),
                generate(engine, "joining_cached", outputs),
            ))
    await joined


async def keep_busy(engine, seconds, outputs):
    """Short requests one after another for ``seconds``: the last seconds of a script that
    shuts the engine down right after its last request."""
    deadline, index = time.monotonic() + seconds, 0
    while time.monotonic() < deadline:
        sampling = {"max_new_tokens": 8, "temperature": 0, "ignore_eos": True}
        out = await engine.async_generate(input_ids=prompt(50 + index, 10), sampling_params=sampling, rid=f"busy-{index}")
        outputs[f"busy-{index}"] = out["output_ids"]
        index += 1


async def workloads(engine, short, busy_seconds=0.0):
    outputs = {}
    await asyncio.gather(generate(engine, "pair_a", outputs), generate(engine, "pair_b", outputs))
    if not short:
        await asyncio.gather(generate(engine, "chunked", outputs), generate(engine, "behind_chunked", outputs))
        await join_running(engine, outputs)
    if busy_seconds:
        await keep_busy(engine, busy_seconds, outputs)
    return outputs


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--overlap", choices=("on", "off"), default="on")
    parser.add_argument("--profile-dir")
    parser.add_argument("--annotations", action="store_true")
    parser.add_argument("--short", action="store_true", help="workload 1 only")
    parser.add_argument("--busy-seconds", type=float, default=0.0,
                        help="then short requests one after another for this long")
    parser.add_argument("--wait-for", help="before shutting down, wait until this file exists")
    parser.add_argument("--trace-endpoint", help="sglang traces requests, spans to this OTLP/gRPC host:port")
    parser.add_argument("--requests-out", help="with --trace-endpoint: each request's client trace context")
    args = parser.parse_args()

    from sglang.srt.entrypoints.engine import Engine

    tracing = {}
    if args.trace_endpoint:
        tracing = dict(enable_trace=True, otlp_traces_endpoint=args.trace_endpoint)
        for name in REQUESTS:
            CLIENT_TRACES[name] = {"trace_id": os.urandom(16).hex(), "span_id": os.urandom(8).hex()}
        with open(args.requests_out, "w") as handle:
            requests = {name: dict(CLIENT_TRACES[name], prompt_len=len(ids)) for name, (ids, _) in REQUESTS.items()}
            json.dump(requests, handle)

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
        **tracing,
    )
    if args.profile_dir:
        engine.start_profile(
            output_dir=args.profile_dir,
            activities=["CPU"],
            with_stack=False,
            record_shapes=False,
            detailed_annotations=args.annotations,
        )
    outputs = engine.loop.run_until_complete(workloads(engine, args.short, args.busy_seconds))
    if args.profile_dir:
        engine.stop_profile()
    with open(args.out, "w") as handle:
        json.dump(outputs, handle)
    if args.wait_for:
        deadline = time.monotonic() + 120
        while not os.path.exists(args.wait_for) and time.monotonic() < deadline:
            time.sleep(0.05)
    with open(os.path.join(os.path.dirname(os.path.abspath(args.out)), "shutdown-ns"), "w") as handle:
        handle.write(str(time.time_ns()))  # sglang SIGKILLs its scheduler process from here on
    engine.shutdown()


if __name__ == "__main__":
    main()
