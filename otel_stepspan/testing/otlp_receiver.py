"""A small OTLP trace receiver (gRPC and HTTP/protobuf) for tests, benchmarks and local debugging.

It speaks the real OTLP wire protocol, built on the protobuf service definitions of
``opentelemetry-proto``, so a test that reads spans from it proves they crossed a socket the way
they would to a Collector. It listens on 127.0.0.1 only, on a free port unless told otherwise.

Usage::

    with OtlpReceiver(protocol="grpc") as receiver:
        env = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint}
        ...                                    # run the instrumented program
        steps = receiver.wait_for_steps(10)
"""

from __future__ import annotations

import gzip
import threading
import time
from concurrent import futures
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Optional

from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from ..timeline import ROOT_NAME


def _any_value(value: Any) -> Any:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [_any_value(v) for v in value.array_value.values]
    return getattr(value, kind) if kind else None


@dataclass(frozen=True)
class ReceivedSpan:
    """One span as it arrived, flattened for assertions."""

    name: str
    kind: int
    trace_id: str
    span_id: str
    parent_span_id: str
    start_ns: int
    end_ns: int
    attributes: dict[str, Any]
    resource: dict[str, Any]
    scope_name: str
    scope_version: str
    status_code: int
    status_message: str
    events: tuple[tuple[str, dict[str, Any]], ...] = field(default=())
    #: (trace id, span id, attributes) of each span link.
    links: tuple[tuple[str, str, dict[str, Any]], ...] = field(default=())


def flatten(request: trace_service_pb2.ExportTraceServiceRequest) -> list[ReceivedSpan]:
    spans: list[ReceivedSpan] = []
    for resource_spans in request.resource_spans:
        resource = {kv.key: _any_value(kv.value) for kv in resource_spans.resource.attributes}
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                spans.append(
                    ReceivedSpan(
                        name=span.name,
                        kind=span.kind,
                        trace_id=span.trace_id.hex(),
                        span_id=span.span_id.hex(),
                        parent_span_id=span.parent_span_id.hex(),
                        start_ns=span.start_time_unix_nano,
                        end_ns=span.end_time_unix_nano,
                        attributes={kv.key: _any_value(kv.value) for kv in span.attributes},
                        resource=resource,
                        scope_name=scope_spans.scope.name,
                        scope_version=scope_spans.scope.version,
                        status_code=span.status.code,
                        status_message=span.status.message,
                        events=tuple(
                            (event.name, {kv.key: _any_value(kv.value) for kv in event.attributes})
                            for event in span.events
                        ),
                        links=tuple(
                            (link.trace_id.hex(), link.span_id.hex(), {kv.key: _any_value(kv.value) for kv in link.attributes})
                            for link in span.links
                        ),
                    )
                )
    return spans


class OtlpReceiver:
    """Collects OTLP trace exports. ``delay_s`` slows every export (a slow Collector);
    ``available=False`` answers UNAVAILABLE / 503 (a Collector that is down but listening);
    ``required_headers`` are checked on every request (auth); ``tls`` is (cert_pem, key_pem)."""

    def __init__(
        self,
        protocol: str = "grpc",
        *,
        port: int = 0,
        delay_s: float = 0.0,
        required_headers: Optional[dict[str, str]] = None,
        tls: Optional[tuple[bytes, bytes]] = None,
        keep_requests: bool = True,
    ) -> None:
        if protocol not in ("grpc", "http/protobuf"):
            raise ValueError(f"protocol must be 'grpc' or 'http/protobuf', not {protocol!r}")
        self.protocol = protocol
        self.delay_s = delay_s
        self.available = True
        self.required_headers = {k.lower(): v for k, v in (required_headers or {}).items()}
        self.tls = tls
        self.keep_requests = keep_requests
        self.requests: list[trace_service_pb2.ExportTraceServiceRequest] = []
        self.span_count = 0  # every span, timeline roots included
        self.step_count = 0  # step spans only (those with forward.mode)
        self.rejected = 0
        self._lock = threading.Condition()
        self._requested_port = port
        self.port = 0
        self._server: Any = None
        self._thread: Optional[threading.Thread] = None

    # -- shared --------------------------------------------------------------------------------

    def _accept(self, request: trace_service_pb2.ExportTraceServiceRequest, headers: dict[str, str]) -> str:
        """'ok', 'unauthenticated' or 'unavailable'."""
        for key, value in self.required_headers.items():
            if headers.get(key) != value:
                with self._lock:
                    self.rejected += 1
                return "unauthenticated"
        if not self.available:
            with self._lock:
                self.rejected += 1
            return "unavailable"
        if self.delay_s:
            time.sleep(self.delay_s)
        count = sum(len(ss.spans) for rs in request.resource_spans for ss in rs.scope_spans)
        steps = sum(
            1
            for rs in request.resource_spans
            for ss in rs.scope_spans
            for s in ss.spans
            if any(kv.key == "forward.mode" for kv in s.attributes)
        )
        with self._lock:
            if self.keep_requests:
                self.requests.append(request)
            self.span_count += count
            self.step_count += steps
            self._lock.notify_all()
        return "ok"

    @property
    def endpoint(self) -> str:
        scheme = "https" if self.tls else "http"
        return f"{scheme}://127.0.0.1:{self.port}"

    def spans(self) -> list[ReceivedSpan]:
        with self._lock:
            requests = list(self.requests)
        return [span for request in requests for span in flatten(request)]

    def steps(self) -> list[ReceivedSpan]:
        """The step spans (those with ``forward.mode``), without the timeline roots."""
        return [span for span in self.spans() if "forward.mode" in span.attributes]

    def timelines(self) -> list[ReceivedSpan]:
        """The timeline roots (see :mod:`otel_stepspan.timeline`)."""
        return [span for span in self.spans() if span.name == ROOT_NAME and "forward.mode" not in span.attributes]

    def wait_for_spans(self, count: int, timeout_s: float = 30.0) -> list[ReceivedSpan]:
        """Wait until at least ``count`` spans arrived (or the timeout passed); return them all."""
        deadline = time.monotonic() + timeout_s
        with self._lock:
            while self.span_count < count and time.monotonic() < deadline:
                self._lock.wait(min(0.1, max(0.0, deadline - time.monotonic())))
        return self.spans()

    def wait_until_quiet(self, quiet_s: float = 2.0, timeout_s: float = 60.0) -> int:
        """Wait until no span has arrived for ``quiet_s`` (exporter processes outlive their
        engines and deliver after them), or ``timeout_s`` passed; returns the span count."""
        deadline = time.monotonic() + timeout_s
        with self._lock:
            last, last_change = self.span_count, time.monotonic()
            while time.monotonic() < deadline and time.monotonic() - last_change < quiet_s:
                self._lock.wait(0.1)
                if self.span_count != last:
                    last, last_change = self.span_count, time.monotonic()
            return self.span_count

    def wait_for_steps(self, count: int, timeout_s: float = 30.0) -> list[ReceivedSpan]:
        """Wait until at least ``count`` step spans arrived (or the timeout passed); return the
        step spans."""
        deadline = time.monotonic() + timeout_s
        with self._lock:
            while self.step_count < count and time.monotonic() < deadline:
                self._lock.wait(min(0.1, max(0.0, deadline - time.monotonic())))
        return self.steps()

    # -- servers -------------------------------------------------------------------------------

    def start(self) -> "OtlpReceiver":
        if self.protocol == "grpc":
            self._start_grpc()
        else:
            self._start_http()
        return self

    def _start_grpc(self) -> None:
        import grpc

        receiver = self

        class Service(trace_service_pb2_grpc.TraceServiceServicer):
            def Export(self, request, context):  # noqa: N802 (protobuf service name)
                headers = {k.lower(): v for k, v in context.invocation_metadata()}
                verdict = receiver._accept(request, headers)
                if verdict == "unauthenticated":
                    context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong auth header")
                if verdict == "unavailable":
                    context.abort(grpc.StatusCode.UNAVAILABLE, "receiver is unavailable")
                return trace_service_pb2.ExportTraceServiceResponse()

        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Service(), server)
        address = f"127.0.0.1:{self._requested_port}"
        if self.tls:
            cert, key = self.tls
            credentials = grpc.ssl_server_credentials([(key, cert)])
            self.port = server.add_secure_port(address, credentials)
        else:
            self.port = server.add_insecure_port(address)
        server.start()
        self._server = server

    def _start_http(self) -> None:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server API)
                if self.path.rstrip("/") != "/v1/traces":
                    self.send_error(404)
                    return
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self.headers.get("Content-Encoding", "").lower() == "gzip":
                    body = gzip.decompress(body)
                request = trace_service_pb2.ExportTraceServiceRequest()
                try:
                    request.ParseFromString(body)
                except Exception:
                    self.send_error(400, "not an ExportTraceServiceRequest")
                    return
                headers = {k.lower(): v for k, v in self.headers.items()}
                verdict = receiver._accept(request, headers)
                code = {"ok": 200, "unauthenticated": 401, "unavailable": 503}[verdict]
                payload = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
                self.send_response(code)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args: Any) -> None:
                return None

        server = ThreadingHTTPServer(("127.0.0.1", self._requested_port), Handler)
        if self.tls:
            import ssl
            import tempfile

            cert, key = self.tls
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            with tempfile.NamedTemporaryFile(suffix=".pem") as cert_file, tempfile.NamedTemporaryFile(
                suffix=".pem"
            ) as key_file:
                cert_file.write(cert)
                cert_file.flush()
                key_file.write(key)
                key_file.flush()
                context.load_cert_chain(cert_file.name, key_file.name)
            server.socket = context.wrap_socket(server.socket, server_side=True)
        self.port = server.server_address[1]
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, name="otlp-http-receiver", daemon=True)
        self._thread.start()

    def stop(self, grace_s: Optional[float] = None) -> None:
        """Stop serving. With ``grace_s``, exports already received are answered first (a
        collector shutting down); without, they are cut off unanswered (a crash), and their
        senders count as lost spans that did arrive here."""
        if self._server is None:
            return
        if self.protocol == "grpc":
            self._server.stop(grace=grace_s).wait()
        else:
            self._server.shutdown()
            self._server.server_close()
        self._server = None

    def __enter__(self) -> "OtlpReceiver":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
