"""An instrumented program configured only through OTEL_* variables (used by test_otlp_wire).

    python steps.py [N] [--spawn-worker] [--own-provider ENDPOINT]
"""

import multiprocessing
import os
import sys

from otel_stepspan import StepInfo, step_span


def run_steps(n: int, first_bs: int) -> None:
    for i in range(n):
        with step_span(StepInfo.from_counts(prefill_seqs=0, extend_tokens=0, decode_seqs=first_bs + i)):
            pass


def worker(n: int) -> None:
    run_steps(n, 100)


if __name__ == "__main__":
    args = sys.argv[1:]
    n = int(args[0]) if args and args[0].isdigit() else 3
    if "--own-provider" in args:
        from opentelemetry import trace
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        endpoint = args[args.index("--own-provider") + 1]
        provider = TracerProvider(resource=Resource.create({"service.name": "engine-own-provider"}))
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint, insecure=True)))
        trace.set_tracer_provider(provider)
    run_steps(n, 1)
    if "--spawn-worker" in args:
        context = multiprocessing.get_context("spawn")
        process = context.Process(target=worker, args=(n,))
        process.start()
        process.join(60)
        print("worker exit", process.exitcode, flush=True)
    print("pid", os.getpid(), flush=True)
