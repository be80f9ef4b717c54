"""A small client for Jaeger's query API v3 (``/api/v3/*``), standard library only.

What the API really does was recorded from Jaeger v2.13.0 (tests/data/jaeger_v3/README.txt):

- ``GET /api/v3/traces`` takes ``query.service_name``, ``query.start_time_min`` and
  ``query.start_time_max`` (both required, RFC 3339 with nanoseconds), ``query.num_traces``,
  ``query.duration_min`` / ``query.duration_max`` (Go durations) and answers
  ``{"result": {"resourceSpans": [...]}}`` in OTLP/JSON (served as text/plain).
- The search depth is spelled ``query.num_traces`` there and is effectively required (without it
  memstore answers 500 "search depth must be greater than 0 ..."); newer Jaeger spells it
  ``query.search_depth`` and still reads ``query.num_traces``. If an answer complains about the
  search depth, the request is repeated once with the other spelling.
- ``query.attributes`` (a JSON map) is read by newer releases only; 2.13 ignores it. It is sent
  anyway, and the caller filters again.
- No match is a 404 ``{"error": {"httpCode": 404, "message": "No traces found"}}``, not an empty
  result: here it is an empty list.
"""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.parse
import urllib.request
from datetime import datetime, timezone
from typing import Any, Mapping, Optional

DEFAULT_URL = "http://127.0.0.1:16686"

#: Services Jaeger reports about itself (its own query traces); never step spans.
JAEGER_OWN_SERVICES = ("jaeger", "jaeger-all-in-one", "jaeger-query", "jaeger-collector")

_DEPTH_SPELLINGS = ("query.num_traces", "query.search_depth")


class JaegerError(Exception):
    """Jaeger could not be asked, or did not answer usefully; the message says what to do."""


def rfc3339_ns(unix_ns: int) -> str:
    """``2026-11-24T07:20:17.000000000Z``: RFC 3339 in UTC with all nine digits."""
    seconds, nanos = divmod(unix_ns, 1_000_000_000)
    stamp = datetime.fromtimestamp(seconds, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")
    return f"{stamp}.{nanos:09d}Z"


def is_jaeger_own(service: str) -> bool:
    return service in JAEGER_OWN_SERVICES or service.startswith("jaeger-")


class JaegerClient:
    def __init__(self, base_url: str = DEFAULT_URL, timeout_s: float = 10.0) -> None:
        base = base_url.strip().rstrip("/")
        if "://" not in base:
            base = "http://" + base
        self.base_url = base
        self.timeout_s = timeout_s
        #: Every URL asked, in order (the CLI's --verbose prints them; tests read them).
        self.requested: list[str] = []

    # -- endpoints -----------------------------------------------------------------------------

    def services(self) -> list[str]:
        status, body = self._get("/api/v3/services", {})
        if status == 404:
            return []
        self._raise_for(status, body, "/api/v3/services")
        services = body.get("services") if isinstance(body, Mapping) else None
        if not isinstance(services, list):
            raise JaegerError(f"Jaeger at {self.base_url} answered /api/v3/services without a services list")
        return [s for s in services if isinstance(s, str)]

    def find_traces(
        self,
        service: str,
        start_min_ns: int,
        start_max_ns: int,
        *,
        search_depth: int,
        attributes: Optional[Mapping[str, str]] = None,
        duration_min: Optional[str] = None,
        duration_max: Optional[str] = None,
    ) -> list[Mapping[str, Any]]:
        """The OTLP/JSON documents of the traces that match; ``[]`` when Jaeger finds none."""
        params: dict[str, str] = {
            "query.service_name": service,
            "query.start_time_min": rfc3339_ns(start_min_ns),
            "query.start_time_max": rfc3339_ns(start_max_ns),
        }
        if attributes:
            params["query.attributes"] = json.dumps(dict(attributes), separators=(",", ":"))
        if duration_min:
            params["query.duration_min"] = duration_min
        if duration_max:
            params["query.duration_max"] = duration_max
        depth_spellings = list(_DEPTH_SPELLINGS)
        for attempt, spelling in enumerate(depth_spellings):
            asked = dict(params)
            asked[spelling] = str(search_depth)
            status, body = self._get("/api/v3/traces", asked)
            if status == 404:
                return []
            if status >= 400 and attempt == 0 and _complains_about_depth(body):
                continue
            self._raise_for(status, body, "/api/v3/traces")
            return [body] if isinstance(body, Mapping) else list(body)
        raise AssertionError("unreachable")  # pragma: no cover

    def get_trace(self, trace_id: str) -> list[Mapping[str, Any]]:
        """The OTLP/JSON documents of one trace; ``[]`` when Jaeger does not have it."""
        path = f"/api/v3/traces/{urllib.parse.quote(trace_id)}"
        status, body = self._get(path, {})
        if status == 404:
            return []
        self._raise_for(status, body, path)
        return [body] if isinstance(body, Mapping) else list(body)

    # -- transport -----------------------------------------------------------------------------

    def _get(self, path: str, params: Mapping[str, str]) -> tuple[int, Any]:
        url = self.base_url + path
        if params:
            url += "?" + urllib.parse.urlencode(params)
        self.requested.append(url)
        request = urllib.request.Request(url, headers={"Accept": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                status, raw = response.status, response.read()
        except urllib.error.HTTPError as exc:
            status, raw = exc.code, exc.read() or b""
        except urllib.error.URLError as exc:
            raise JaegerError(self._connection_message(exc.reason)) from None
        except (socket.timeout, TimeoutError):
            raise JaegerError(
                f"Jaeger at {self.base_url} did not answer within {self.timeout_s:g}s (--timeout)"
            ) from None
        except (ConnectionError, OSError) as exc:
            raise JaegerError(self._connection_message(exc)) from None
        return status, self._decode(raw, status, url)

    def _connection_message(self, reason: object) -> str:
        if isinstance(reason, (socket.timeout, TimeoutError)):
            return f"Jaeger at {self.base_url} did not answer within {self.timeout_s:g}s (--timeout)"
        if isinstance(reason, ConnectionRefusedError):
            return (
                f"cannot connect to Jaeger at {self.base_url}: connection refused. "
                "Is Jaeger running? Start it with `docker compose up -d` (or "
                "`python scripts/backends.py run`), or point --jaeger at it."
            )
        return f"cannot reach Jaeger at {self.base_url}: {reason}"

    def _decode(self, raw: bytes, status: int, url: str) -> Any:
        text = raw.decode("utf-8", errors="replace").strip()
        if not text:
            return {}
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            pass
        # A streamed answer (one JSON object a line) is also accepted.
        try:
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError:
            preview = text[:200].replace("\n", " ")
            raise JaegerError(
                f"{url} answered HTTP {status} with a body that is not JSON "
                f"(is --jaeger the Jaeger query port, 16686?): {preview!r}"
            ) from None

    def _raise_for(self, status: int, body: Any, path: str) -> None:
        if status < 400:
            return
        message = _error_message(body) or "no error message"
        raise JaegerError(f"Jaeger {path} answered HTTP {status}: {message}")


def _error_message(body: Any) -> Optional[str]:
    if isinstance(body, Mapping):
        error = body.get("error")
        if isinstance(error, Mapping) and isinstance(error.get("message"), str):
            return error["message"]
        if isinstance(error, str):
            return error
    return None


def _complains_about_depth(body: Any) -> bool:
    message = (_error_message(body) or "").lower()
    return any(word in message for word in ("search depth", "search_depth", "num_traces", "searchdepth"))
