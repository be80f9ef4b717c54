"""Steps at a steady pace, each labelled by its index (bs=i), for outage and signal tests.

    python paced_steps.py SECONDS RATE [--forever] [--stop-after N] [--report-every K]
                          [--provider sglang|console ENDPOINT]

``--stop-after N`` runs N steps, prints ``done N``, then idles until killed; ``--report-every K``
prints ``steps I`` after every K-th step (a test that kills the program knows what ran when).
Prints 'ready' once the first step ran, and at the end one JSON line with the step count and
every counter of ``otel_stepspan.stats()``, so a test can check that received + reported lost
(+ still pending in the exporter) == steps.
"""

import json
import sys
import time

from otel_stepspan import StepInfo, stats, step_span


def _option(name: str) -> int:
    return int(sys.argv[sys.argv.index(name) + 1]) if name in sys.argv else 0


def set_up_provider(kind: str, endpoint: str) -> None:
    """A tracer provider set up by the "engine" before its first step: ``sglang`` as sglang
    0.5.23's ``--enable-trace`` builds it (gRPC, insecure, batches of 64 every 500 ms);
    ``console``, one whose spans go somewhere else than OTLP."""
    from opentelemetry import trace
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SimpleSpanProcessor

    provider = TracerProvider(resource=Resource.create({"service.name": f"{kind}-provider"}))
    if kind == "sglang":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter(endpoint=endpoint, insecure=True)
        provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=500, max_export_batch_size=64))
    else:
        provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter(out=sys.stderr)))
    trace.set_tracer_provider(provider)


def main() -> None:
    seconds, rate = float(sys.argv[1]), float(sys.argv[2])
    if "--provider" in sys.argv:
        at = sys.argv.index("--provider")
        set_up_provider(sys.argv[at + 1], sys.argv[at + 2])
    forever = "--forever" in sys.argv
    stop_after, report_every = _option("--stop-after"), _option("--report-every")
    interval = 1.0 / rate
    started = time.monotonic()
    steps = 0
    next_at = started
    while forever or time.monotonic() - started < seconds:
        steps += 1
        with step_span(StepInfo("decode", steps, 0, steps, 0, steps, pass_id=steps)):
            pass
        if steps == 1:
            print("ready", flush=True)
        if report_every and steps % report_every == 0:
            print(f"steps {steps}", flush=True)
        if steps == stop_after:
            print(f"done {steps}", flush=True)
            while True:
                time.sleep(3600)
        next_at += interval
        delay = next_at - time.monotonic()
        if delay > 0:
            time.sleep(delay)
    import otel_stepspan

    otel_stepspan.flush(20)
    print(json.dumps({"steps": steps, **stats()}), flush=True)


if __name__ == "__main__":
    main()
