"""Sending encoded OTLP trace requests, configured by the standard ``OTEL_EXPORTER_OTLP_*`` variables.

The exporter process sends bytes it encoded itself (see :mod:`.encode`), so it talks to the
Collector directly rather than through the SDK's exporters, which only take SDK span objects.
What it reads, and how, follows the Python SDK's OTLP exporters, so one set of variables means
the same thing to an engine's own exporters and to ours: the traces-specific variable first,
then the general one; endpoint, protocol (``grpc``, the Python SDK's default, or
``http/protobuf``), headers (W3C baggage encoding), certificate and client certificate/key,
insecure, compression (``gzip``), timeout (in seconds, as the Python SDK reads it).

A send returns a :class:`Sent`: whether it worked, and if not whether trying again later may
work (the Collector or network is down or busy) or never will (refused: wrong token, bad
request). The caller decides how long to keep trying.
"""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from typing import Mapping, Optional
from urllib.parse import urlparse

from ..settings import ExportConfigError, otlp_protocol, otlp_setting

GRPC_METHOD = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
_DEFAULT_GRPC_ENDPOINT = "http://localhost:4317"
_DEFAULT_HTTP_ENDPOINT = "http://localhost:4318"
_RETRYABLE_HTTP = frozenset({408, 429, 502, 503, 504})


@dataclass(frozen=True)
class Sent:
    ok: bool
    retryable: bool = False
    reason: str = ""
    #: Seconds the server asked us to wait before trying again (gRPC RetryInfo, HTTP Retry-After).
    retry_after_s: Optional[float] = None
    #: Spans the server said it rejected although the request succeeded (OTLP partial success).
    rejected: int = 0


def _headers(environ: Mapping[str, str]) -> dict[str, str]:
    raw = otlp_setting(environ, "HEADERS")
    if not raw:
        return {}
    from opentelemetry.util.re import parse_env_headers

    return {key.lower(): value for key, value in parse_env_headers(raw, liberal=True).items()}


def _timeout_s(environ: Mapping[str, str]) -> float:
    raw = otlp_setting(environ, "TIMEOUT")
    try:
        return float(raw) if raw else 10.0
    except ValueError:
        raise ExportConfigError(f"OTEL_EXPORTER_OTLP_TIMEOUT={raw!r} is not a number of seconds") from None


def _gzip(environ: Mapping[str, str]) -> bool:
    compression = (otlp_setting(environ, "COMPRESSION") or "none").lower()
    if compression not in ("gzip", "none"):
        raise ExportConfigError(f"OTLP compression {compression!r} is not supported; use 'gzip' or 'none'")
    return compression == "gzip"


def _read(path: Optional[str], what: str) -> Optional[bytes]:
    if not path:
        return None
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except OSError as exc:
        raise ExportConfigError(f"cannot read the OTLP {what} {path!r}: {exc}") from None


class GrpcSender:
    """OTLP/gRPC: one channel, raw request bytes, the SDK's rules for insecure and credentials."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        import grpc

        self._grpc = grpc
        endpoint = otlp_setting(environ, "ENDPOINT") or _DEFAULT_GRPC_ENDPOINT
        parsed = urlparse(endpoint)
        if parsed.scheme in ("http", "https"):
            target = parsed.netloc
            insecure = parsed.scheme == "http"
        else:
            target = endpoint
            insecure = (otlp_setting(environ, "INSECURE") or "false").lower() == "true"
        self.endpoint = endpoint
        self.metadata = tuple(_headers(environ).items())
        self.timeout_s = _timeout_s(environ)
        compression = grpc.Compression.Gzip if _gzip(environ) else None
        # The exporter backs off between failed exports itself (up to 5 s). gRPC's channel has a
        # reconnect back-off of its own (1 s, growing to 120 s) under which every export fails at
        # once: after a Collector outage of a few seconds, that alone could delay the first
        # export by many seconds after the Collector was back. Bounded here to our own.
        options = (
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.min_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 5000),
        )
        if insecure:
            channel = grpc.insecure_channel(target, options=options, compression=compression)
        else:
            credentials = grpc.ssl_channel_credentials(
                root_certificates=_read(otlp_setting(environ, "CERTIFICATE"), "certificate"),
                private_key=_read(otlp_setting(environ, "CLIENT_KEY"), "client key"),
                certificate_chain=_read(otlp_setting(environ, "CLIENT_CERTIFICATE"), "client certificate"),
            )
            channel = grpc.secure_channel(target, credentials, options=options, compression=compression)
        self._channel = channel
        self._export = channel.unary_unary(GRPC_METHOD)  # bytes in, bytes out

    def send(self, request: bytes) -> Sent:
        grpc = self._grpc
        try:
            response = self._export(request, timeout=self.timeout_s, metadata=self.metadata)
        except grpc.RpcError as error:
            code = error.code() if callable(getattr(error, "code", None)) else None
            retryable = code in (
                grpc.StatusCode.CANCELLED,
                grpc.StatusCode.DEADLINE_EXCEEDED,
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                grpc.StatusCode.ABORTED,
                grpc.StatusCode.OUT_OF_RANGE,
                grpc.StatusCode.UNAVAILABLE,
                grpc.StatusCode.DATA_LOSS,
            )
            details = error.details() if callable(getattr(error, "details", None)) else ""
            name = code.name if code is not None else type(error).__name__
            return Sent(False, retryable, f"{name}: {details}", _grpc_retry_delay(error))
        return Sent(True, rejected=_rejected_spans(response))

    def close(self) -> None:
        self._channel.close()


def _grpc_retry_delay(error: object) -> Optional[float]:
    try:
        trailing = dict(error.trailing_metadata() or ())  # type: ignore[attr-defined]
        raw = trailing.get("google.rpc.retryinfo-bin")
        if raw is None:
            return None
        from google.rpc.error_details_pb2 import RetryInfo

        info = RetryInfo()
        info.ParseFromString(raw)
        return info.retry_delay.seconds + info.retry_delay.nanos / 1e9
    except Exception:
        return None


def _rejected_spans(response: Optional[bytes]) -> int:
    """``partial_success.rejected_spans`` of an ExportTraceServiceResponse (0 when absent)."""
    if not response:
        return 0
    try:
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse

        parsed = ExportTraceServiceResponse()
        parsed.ParseFromString(response)
        return int(parsed.partial_success.rejected_spans)
    except Exception:
        return 0


class HttpSender:
    """OTLP/HTTP with protobuf bodies, through one ``requests`` session."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        import requests

        self._requests = requests
        traces_endpoint = environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "").strip()
        if traces_endpoint:
            self.endpoint = traces_endpoint  # used as it is, per the specification
        else:
            base = environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip() or _DEFAULT_HTTP_ENDPOINT
            self.endpoint = base.rstrip("/") + "/v1/traces"
        self.timeout_s = _timeout_s(environ)
        self.gzip = _gzip(environ)
        self.headers = {"Content-Type": "application/x-protobuf", **_headers(environ)}
        if self.gzip:
            self.headers["Content-Encoding"] = "gzip"
        session = requests.Session()
        certificate = otlp_setting(environ, "CERTIFICATE")
        if certificate:
            # requests lets REQUESTS_CA_BUNDLE / CURL_CA_BUNDLE override a session's CA file: keep
            # the environment (proxies included) out of it so the OTLP certificate is the one used.
            _read(certificate, "certificate")
            session.trust_env = False
            session.verify = certificate
        client_certificate = otlp_setting(environ, "CLIENT_CERTIFICATE")
        client_key = otlp_setting(environ, "CLIENT_KEY")
        if client_certificate:
            session.cert = (client_certificate, client_key) if client_key else client_certificate
        self._session = session

    def send(self, request: bytes) -> Sent:
        body = gzip.compress(request) if self.gzip else request
        try:
            response = self._session.post(self.endpoint, data=body, headers=self.headers, timeout=self.timeout_s)
        except self._requests.exceptions.RequestException as error:
            # Refused connections, time-outs, TLS failures: the Collector may come back.
            return Sent(False, True, f"{type(error).__name__}: {error}")
        if 200 <= response.status_code < 300:
            return Sent(True, rejected=_rejected_spans(response.content))
        retry_after = None
        raw = response.headers.get("Retry-After")
        if raw and raw.strip().isdigit():
            retry_after = float(raw.strip())
        return Sent(
            False,
            response.status_code in _RETRYABLE_HTTP,
            f"HTTP {response.status_code}: {response.text[:200]}",
            retry_after,
        )

    def close(self) -> None:
        self._session.close()


def sender_from_environment(environ: Optional[Mapping[str, str]] = None) -> "GrpcSender | HttpSender":
    """The sender the variables ask for; raises :class:`ExportConfigError` when they ask for the
    impossible."""
    env = os.environ if environ is None else environ
    if otlp_protocol(env) == "grpc":
        return GrpcSender(env)
    return HttpSender(env)
