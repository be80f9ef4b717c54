"""Floods an OTLP/gRPC receiver with large trace exports for a while, as fast as it takes them.

    python otlp_flood.py HOST:PORT SECONDS [CONCURRENT]

One request of about 3.5 MiB (4,000 spans with many attributes; the receiver's default limit is
4 MiB) is serialised once and sent again and again, CONCURRENT calls at a time. Prints one JSON
line: exports accepted (ok), refused with a retryable status (refused: RESOURCE_EXHAUSTED or
UNAVAILABLE, what a collector under its memory limit answers), failed otherwise (other), and
the bytes sent.
"""

import json
import os
import sys
import threading
import time

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.resource.v1 import resource_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

METHOD = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
REFUSED = {grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE}


def request_bytes(spans: int = 4000) -> bytes:
    def attribute(key: str, value: str) -> common_pb2.KeyValue:
        return common_pb2.KeyValue(key=key, value=common_pb2.AnyValue(string_value=value))

    now = time.time_ns()
    scope = trace_pb2.ScopeSpans()
    for i in range(spans):
        scope.spans.append(
            trace_pb2.Span(
                trace_id=os.urandom(16),
                span_id=os.urandom(8),
                name=f"flood[{i % 7}]",
                start_time_unix_nano=now,
                end_time_unix_nano=now + 1000,
                attributes=[attribute(f"flood.key{k}", f"v{i}-{k}-" + "x" * 40) for k in range(12)],
            )
        )
    resource = resource_pb2.Resource(attributes=[attribute("service.name", "otlp-flood")])
    request = trace_service_pb2.ExportTraceServiceRequest(
        resource_spans=[trace_pb2.ResourceSpans(resource=resource, scope_spans=[scope])]
    )
    return request.SerializeToString()


def main() -> None:
    target, seconds = sys.argv[1], float(sys.argv[2])
    concurrent = int(sys.argv[3]) if len(sys.argv) > 3 else 4
    payload = request_bytes()
    channel = grpc.insecure_channel(target, options=[("grpc.max_send_message_length", 8 << 20)])
    export = channel.unary_unary(METHOD, request_serializer=None, response_deserializer=None)
    counts = {"ok": 0, "refused": 0, "other": 0, "bytes": 0}
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def worker() -> None:
        while time.monotonic() < deadline:
            try:
                export(payload, timeout=10)
                outcome = "ok"
            except grpc.RpcError as error:
                outcome = "refused" if error.code() in REFUSED else "other"
                if outcome == "other":
                    print(f"otlp_flood: {error.code()} {error.details()}", file=sys.stderr)
            with lock:
                counts[outcome] += 1
                counts["bytes"] += len(payload)

    threads = [threading.Thread(target=worker) for _ in range(concurrent)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    channel.close()
    print(json.dumps(counts), flush=True)


if __name__ == "__main__":
    main()
