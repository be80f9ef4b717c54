"""``otel-stepspan search`` and ``stats`` against a replayed Jaeger and a local spans file.

The fake Jaeger (http.server on 127.0.0.1, port 0) answers with real Jaeger v2.13 responses
recorded in tests/data/jaeger_v3/ (see its README.txt): like the real one it ignores
``query.attributes``, needs ``query.num_traces``, answers text/plain, and says 404 when nothing
matches. Recorded timestamps are moved to "a few seconds ago" so that the CLI's default time
window (the last hour) applies to them; nothing else in a body is changed.
"""

from __future__ import annotations

import json
import math
import socket
import threading
import time
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from otel_stepspan.cli.main import main
from otel_stepspan.quantiles import percentile
from otel_stepspan.otlp_json import iter_step_spans

RECORDINGS = Path(__file__).parent / "data" / "jaeger_v3"
SERVICE = "otel-stepspan-recording"


def recording(name: str) -> dict:
    return json.loads((RECORDINGS / f"{name}.json").read_text())


def _latest_ns(body) -> int:
    return max(s.end_ns for s in iter_step_spans(body))


def _shift_times(value, delta: int):
    """Every *TimeUnixNano in a body, moved by delta ns, keeping its JSON type."""
    if isinstance(value, dict):
        return {
            k: (type(v)(int(v) + delta) if k.endswith("TimeUnixNano") else _shift_times(v, delta))
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [_shift_times(v, delta) for v in value]
    return value


class FakeJaeger:
    """Replays recordings; ``traces`` decides the answer to each /api/v3/traces request."""

    def __init__(self, traces=None, services=None):
        self.requests: list[tuple[str, dict[str, list[str]]]] = []
        base = recording("v3_traces_by_service")["body"]
        self.delta = time.time_ns() - 5_000_000_000 - _latest_ns(base)
        self.traces = traces or self.like_jaeger_2_13
        self.services = services or (lambda: (200, recording("v3_services")["body"]))
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server's name)
                parts = urlsplit(self.path)
                query = parse_qs(parts.query, keep_blank_values=True)
                fake.requests.append((parts.path, query))
                if parts.path == "/api/v3/services":
                    status, body = fake.services()
                elif parts.path == "/api/v3/traces":
                    status, body = fake.traces(query)
                else:
                    status, body = 404, {"error": {"httpCode": 404, "message": "404 page not found"}}
                raw = (body if isinstance(body, str) else json.dumps(body)).encode()
                self.send_response(status)
                self.send_header("Content-Type", "text/plain; charset=utf-8")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def recorded(self, name: str):
        """A recording as Jaeger sent it: status and body (raw text for errors)."""
        rec = recording(name)
        if rec["status"] != 200:
            return rec["status"], rec["raw"]
        return rec["status"], _shift_times(rec["body"], self.delta)

    def like_jaeger_2_13(self, query):
        """What Jaeger 2.13 with memstore answers (every case recorded)."""
        if "query.start_time_min" not in query or "query.start_time_max" not in query:
            return self.recorded("v3_traces_missing_time_400")
        if "query.num_traces" not in query:
            return self.recorded("v3_traces_without_num_traces_500")
        if query["query.service_name"] != [SERVICE]:
            return self.recorded("v3_traces_no_match_404")
        if "query.duration_min" in query:
            return self.recorded("v3_traces_duration_min_10ms")
        if query["query.num_traces"] == ["2"]:
            return self.recorded("v3_traces_num_traces_2")
        return self.recorded("v3_traces_attributes_param_ignored" if "query.attributes" in query else "v3_traces_by_service")

    def traces_requests(self):
        return [q for path, q in self.requests if path == "/api/v3/traces"]

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _parse_rfc3339_ns(text: str) -> int:
    assert text.endswith("Z") and len(text.split(".")[1]) == 10, text  # 9 digits + Z
    stamp, frac = text[:-1].split(".")
    seconds = datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S").replace(tzinfo=timezone.utc).timestamp()
    return int(seconds) * 1_000_000_000 + int(frac)


# -- search against Jaeger -------------------------------------------------------------------


def test_search_decode_sends_the_verified_parameters_and_filters_client_side(capsys):
    with FakeJaeger() as jaeger:
        before = time.time_ns()
        code, out, err = run_cli(
            capsys, "search", "--jaeger", jaeger.url, "--mode", "decode", "--since", "15m", "--json"
        )
        after = time.time_ns()
    assert code == 0, err
    # Jaeger was asked which services exist (no --service), then for decode steps of that one.
    assert [p for p, _ in jaeger.requests] == ["/api/v3/services", "/api/v3/traces"]
    (query,) = jaeger.traces_requests()
    assert query["query.service_name"] == [SERVICE]
    assert json.loads(query["query.attributes"][0]) == {"forward.mode": "decode"}
    assert query["query.num_traces"] == ["1000"]
    start_min = _parse_rfc3339_ns(query["query.start_time_min"][0])
    start_max = _parse_rfc3339_ns(query["query.start_time_max"][0])
    assert before <= start_max <= after
    assert start_max - start_min == 15 * 60 * 1_000_000_000
    # Jaeger 2.13 ignored the attribute and sent all 6 steps: only the 3 decodes are printed,
    # oldest first.
    records = [json.loads(line) for line in out.splitlines()]
    assert [r["label"] for r in records] == ["step[decode bs=4]", "step[decode bs=8]", "step[decode bs=16]"]
    assert [r["batch_size"] for r in records] == [4, 8, 16]
    assert records[0]["trace_id"] == "273d429133b94ea418f5a897972bc97e"
    assert records[0]["duration_ms"] == pytest.approx(5.043565)
    assert all(r["service"] == SERVICE for r in records)


def test_search_table_columns_and_order(capsys):
    with FakeJaeger() as jaeger:
        code, out, err = run_cli(capsys, "search", "--jaeger", jaeger.url, "--service", SERVICE)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split() == ["TIME", "LABEL", "DURATION_MS", "SERVICE", "TRACE_ID"]
    rows = lines[1:]
    assert len(rows) == 6
    labels_in_order = [
        "step[decode bs=4]", "step[decode bs=8]", "step[decode bs=16]",
        "step[prefill bs=2 toks=512]", "step[mixed bs=3 ext=100 dec=2]", "step[idle]",
    ]
    assert [next(l for l in labels_in_order if l in row) for row in rows] == labels_in_order
    first = rows[0]
    assert " 5.044 " in first and first.endswith("273d429133b94ea418f5a897972bc97e")
    stamp = first.split()[0]
    parsed = datetime.fromisoformat(stamp)
    assert parsed.utcoffset() is not None and len(stamp.split(".")[1].split("+")[0].split("-")[0]) == 3
    # the services endpoint was not needed: --service was given
    assert [p for p, _ in jaeger.requests] == ["/api/v3/traces"]


def test_search_batch_size_and_duration_filters(capsys):
    with FakeJaeger() as jaeger:
        code, out, err = run_cli(
            capsys, "search", "--jaeger", jaeger.url, "--service", SERVICE,
            "--min-bs", "3", "--max-bs", "8", "--json",
        )
        assert code == 0, err
        assert sorted(json.loads(l)["label"] for l in out.splitlines()) == [
            "step[decode bs=4]", "step[decode bs=8]", "step[mixed bs=3 ext=100 dec=2]",
        ]
        code, out, err = run_cli(
            capsys, "search", "--jaeger", jaeger.url, "--service", SERVICE,
            "--min-duration", "10ms", "--max-duration", "0.02s", "--json",
        )
    assert code == 0, err
    query = jaeger.traces_requests()[-1]
    # Go durations, exact: 10ms and 20ms in nanoseconds
    assert query["query.duration_min"] == ["10000000ns"]
    assert query["query.duration_max"] == ["20000000ns"]
    # the recorded answer to duration_min=10ms holds idle (22.6ms), mixed (15.2ms), prefill
    # (13.6ms); the max is applied here
    assert sorted(json.loads(l)["label"] for l in out.splitlines()) == [
        "step[mixed bs=3 ext=100 dec=2]", "step[prefill bs=2 toks=512]",
    ]


def test_search_several_modes_ask_once_per_mode_and_limit_keeps_the_newest(capsys):
    with FakeJaeger() as jaeger:
        code, out, err = run_cli(
            capsys, "search", "--jaeger", jaeger.url, "--service", SERVICE,
            "--mode", "decode,prefill", "--mode", "idle", "--limit", "2", "--json",
        )
    assert code == 0, err
    asked = [json.loads(q["query.attributes"][0])["forward.mode"] for q in jaeger.traces_requests()]
    assert asked == ["decode", "prefill", "idle"]
    # 5 matches, each reported once although every answer held all 6; the 2 most recent shown
    assert [json.loads(l)["label"] for l in out.splitlines()] == ["step[prefill bs=2 toks=512]", "step[idle]"]


def test_search_no_match_is_404_and_exit_0(capsys):
    with FakeJaeger() as jaeger:
        code, out, err = run_cli(capsys, "search", "--jaeger", jaeger.url, "--service", "no-such-service")
    assert code == 0
    assert out == ""
    assert "no matching steps" in err
    assert jaeger.traces_requests()[0]["query.service_name"] == ["no-such-service"]


def test_search_filters_leave_nothing(capsys):
    with FakeJaeger() as jaeger:
        code, out, err = run_cli(capsys, "search", "--jaeger", jaeger.url, "--mode", "verify")
    assert (code, out) == (0, "")
    assert "no matching steps" in err


def test_search_retries_once_with_the_newer_depth_spelling(capsys):
    """A Jaeger that wants query.search_depth (and complains otherwise) is asked again."""

    def newer(query):
        if "query.search_depth" not in query:
            return 400, {"error": {"httpCode": 400, "message": "malformed parameter query.search_depth"}}
        return 200, fake.recorded("v3_traces_by_service")[1]

    fake = FakeJaeger(traces=newer)
    with fake:
        code, out, err = run_cli(capsys, "search", "--jaeger", fake.url, "--service", SERVICE, "--limit", "0", "--json")
    assert code == 0, err
    first, second = fake.traces_requests()
    assert "query.num_traces" in first and "query.search_depth" not in first
    assert second["query.search_depth"] == ["1000"] and "query.num_traces" not in second
    assert len(out.splitlines()) == 6


def test_other_jaeger_errors_are_reported_with_its_message(capsys):
    def broken(query):
        return recording("v3_traces_missing_time_400")["status"], recording("v3_traces_missing_time_400")["raw"]

    with FakeJaeger(traces=broken) as jaeger:
        code, out, err = run_cli(capsys, "search", "--jaeger", jaeger.url, "--service", SERVICE)
    assert code == 2 and out == ""
    assert "HTTP 400" in err and "query.start_time_min and query.start_time_max are required" in err
    assert len(jaeger.traces_requests()) == 1  # not a depth complaint: no retry


def test_default_services_leave_out_jaegers_own(capsys):
    services = lambda: (200, {"services": ["jaeger", "jaeger-all-in-one", SERVICE, "other"]})  # noqa: E731
    with FakeJaeger(services=services) as jaeger:
        code, out, err = run_cli(capsys, "search", "--jaeger", jaeger.url, "--json")
    assert code == 0, err
    asked = [q["query.service_name"][0] for q in jaeger.traces_requests()]
    assert asked == [SERVICE, "other"]
    assert len(out.splitlines()) == 6  # "other" answered 404


def test_non_json_body_is_a_clear_error(capsys):
    with FakeJaeger(traces=lambda q: (200, "<html>not jaeger</html>")) as jaeger:
        code, out, err = run_cli(capsys, "search", "--jaeger", jaeger.url, "--service", SERVICE)
    assert code == 2
    assert "not JSON" in err and "16686" in err


def test_connection_refused_is_a_clear_error_and_exit_2(capsys):
    with socket.socket() as sock:  # a port that was free a moment ago: nothing listens there
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    code, out, err = run_cli(capsys, "search", "--jaeger", f"http://127.0.0.1:{port}", "--mode", "decode")
    assert code == 2 and out == ""
    assert "connection refused" in err
    assert "Is Jaeger running?" in err and "docker compose up" in err


def test_timeout_is_a_clear_error(capsys):
    with socket.socket() as server:  # accepts, never answers
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        port = server.getsockname()[1]
        code, out, err = run_cli(
            capsys, "search", "--jaeger", f"http://127.0.0.1:{port}", "--service", "x", "--timeout", "0.3"
        )
    assert code == 2
    assert "did not answer within 0.3s" in err


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["--min-duration", "5"], "not a duration"),
        (["--min-duration", "5 parsecs"], "not a duration"),
        (["--min-bs", "9", "--max-bs", "3"], "--min-bs is larger than --max-bs"),
        (["--min-duration", "2s", "--max-duration", "1s"], "longer than --max-duration"),
    ],
)
def test_bad_flags_are_usage_errors(capsys, argv, needle):
    code, out, err = run_cli(capsys, "search", "--jaeger", "http://127.0.0.1:9", *argv)
    assert code == 2
    assert needle in err


def test_duration_parsing():
    from otel_stepspan.cli._filters import parse_duration

    assert parse_duration("5ms") == 5_000_000
    assert parse_duration("250us") == 250_000
    assert parse_duration("250µs") == 250_000
    assert parse_duration("1.5s") == 1_500_000_000
    assert parse_duration("2m") == 120_000_000_000
    assert parse_duration("1h") == 3_600_000_000_000
    assert parse_duration("42ns") == 42


# -- a local spans file ------------------------------------------------------------------------


def _steps_file(tmp_path: Path, durations_ms, mode="decode", bs=4, tokens=None, start_ns=None, service="svc", first_id=1):
    """An OTLP/JSON lines file of steps one after the other, written with string int64s on one
    line and number int64s on the next (both spellings occur in the wild)."""
    start = start_ns if start_ns is not None else time.time_ns() - 60_000_000_000
    spans = []
    for i, ms in enumerate(durations_ms):
        s = start + i * 1_000_000_000
        e = s + int(round(ms * 1_000_000))
        spans.append(
            {
                "traceId": f"{i + first_id:032x}",
                "spanId": f"{i + first_id:016x}",
                "name": f"step[{mode} bs={bs}]",
                "kind": 1,
                "startTimeUnixNano": str(s) if i % 2 == 0 else s,
                "endTimeUnixNano": str(e) if i % 2 == 0 else e,
                "attributes": [
                    {"key": "forward.mode", "value": {"stringValue": mode}},
                    {"key": "forward.batch_size", "value": {"intValue": str(bs)}},
                    {"key": "forward.num_tokens", "value": {"intValue": str(tokens if tokens is not None else bs)}},
                    {"key": "forward.label", "value": {"stringValue": f"step[{mode} bs={bs}]"}},
                ],
            }
        )
    lines = []
    for chunk in range(0, len(spans), 10):
        doc = {
            "resourceSpans": [
                {
                    "resource": {"attributes": [{"key": "service.name", "value": {"stringValue": service}}]},
                    "scopeSpans": [{"scope": {"name": "otel_stepspan"}, "spans": spans[chunk : chunk + 10]}],
                }
            ]
        }
        lines.append(json.dumps(doc))
    return lines


def test_search_in_a_file_and_the_window_only_when_asked(tmp_path, capsys):
    old = time.time_ns() - 2 * 3600 * 1_000_000_000  # two hours ago
    path = tmp_path / "spans.jsonl"
    path.write_text("\n".join(_steps_file(tmp_path, [1.0, 2.0, 3.0], start_ns=old)) + "\n")
    code, out, err = run_cli(capsys, "search", "--file", str(path), "--json", "--min-duration", "1500us")
    assert code == 0, err
    assert [json.loads(l)["duration_ms"] for l in out.splitlines()] == [2.0, 3.0]
    code, out, err = run_cli(capsys, "search", "--file", str(path), "--since", "1h")
    assert (code, out) == (0, "") and "no matching steps" in err


def test_missing_file_is_a_clear_error(tmp_path, capsys):
    code, out, err = run_cli(capsys, "search", "--file", str(tmp_path / "nope.jsonl"))
    assert code == 2 and "no such spans file" in err


# -- stats ------------------------------------------------------------------------------------


def test_percentile_is_linear_interpolation():
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 0.5) == pytest.approx(50.5)
    assert percentile(values, 0.9) == pytest.approx(90.1)
    assert percentile(values, 0.99) == pytest.approx(99.01)
    assert percentile([7.0], 0.99) == 7.0
    assert math.isnan(percentile([], 0.5))


def test_stats_on_known_durations(tmp_path, capsys):
    path = tmp_path / "spans.jsonl"
    decode = _steps_file(tmp_path, range(1, 101), mode="decode", bs=4, service="svc")  # 1..100 ms
    prefill = _steps_file(
        tmp_path, [10.0, 30.0], mode="prefill", bs=2, tokens=1000,
        start_ns=time.time_ns() - 30_000_000_000, service="svc", first_id=1000,
    )
    path.write_text("\n".join(decode + prefill) + "\n")
    code, out, err = run_cli(capsys, "stats", "--file", str(path), "--json")
    assert code == 0, err
    rows = {r["mode"]: r for r in map(json.loads, out.splitlines())}
    assert list(rows) == ["decode", "prefill", "all"]
    d, p, total = rows["decode"], rows["prefill"], rows["all"]
    assert d["steps"] == 100
    assert d["p50_ms"] == pytest.approx(50.5)
    assert d["p90_ms"] == pytest.approx(90.1)
    assert d["p99_ms"] == pytest.approx(99.01)
    assert d["mean_batch_size"] == 4
    # 400 tokens over 5050 ms
    assert d["tokens_per_s"] == pytest.approx(400 / 5.050, rel=1e-6)
    assert p["steps"] == 2 and p["p50_ms"] == pytest.approx(20.0)
    assert p["tokens_per_s"] == pytest.approx(2000 / 0.040, rel=1e-6)
    assert d["time_share"] == pytest.approx(5050 / 5090, abs=1e-6)
    assert p["time_share"] == pytest.approx(40 / 5090, abs=1e-6)
    assert total["steps"] == 102 and total["time_share"] == pytest.approx(1.0)

    code, out, err = run_cli(capsys, "stats", "--file", str(path), "--mode", "prefill")
    assert code == 0, err
    header, prefill_row, all_row = out.splitlines()
    assert header.split() == ["MODE", "STEPS", "P50_MS", "P90_MS", "P99_MS", "MEAN_BS", "TOKENS/S", "TIME_SHARE"]
    assert prefill_row.split() == ["prefill", "2", "20.000", "28.000", "29.800", "2.0", "50000.0", "100.0%"]
    assert all_row.split()[0:2] == ["all", "2"]


def test_stats_from_jaeger_recording(capsys):
    with FakeJaeger() as jaeger:
        code, out, err = run_cli(capsys, "stats", "--jaeger", jaeger.url, "--json")
    assert code == 0, err
    (query,) = jaeger.traces_requests()
    assert query["query.num_traces"] == ["5000"] and "query.attributes" not in query
    rows = {r["mode"]: r for r in map(json.loads, out.splitlines())}
    assert list(rows) == ["idle", "decode", "prefill", "mixed", "all"]
    assert rows["decode"]["steps"] == 3
    assert rows["decode"]["p50_ms"] == pytest.approx(7.195693)
    assert rows["decode"]["mean_batch_size"] == pytest.approx(28 / 3)
    assert rows["mixed"]["tokens_per_s"] == pytest.approx(102 / 0.015168421)
    assert rows["idle"]["tokens_per_s"] == 0


def test_stats_plot(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    path = tmp_path / "spans.jsonl"
    path.write_text("\n".join(_steps_file(tmp_path, [1.0, 2.0, 3.0])) + "\n")
    image = tmp_path / "out" / "steps.png"
    image.parent.mkdir()
    code, out, err = run_cli(capsys, "stats", "--file", str(path), "--plot", str(image))
    assert code == 0, err
    assert image.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"wrote {image}" in err


def test_stats_plot_without_matplotlib(tmp_path, capsys, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    path = tmp_path / "spans.jsonl"
    path.write_text("\n".join(_steps_file(tmp_path, [1.0])) + "\n")
    code, out, err = run_cli(capsys, "stats", "--file", str(path), "--plot", str(tmp_path / "x.png"))
    assert code == 2
    assert "pip install 'otel_stepspan[plot]'" in err
    assert "decode" in out  # the table was still printed


def test_help_explains_every_flag_with_examples(capsys):
    for command in ("search", "stats", "run"):
        with pytest.raises(SystemExit):
            from otel_stepspan.cli.main import build_parser

            build_parser().parse_args([command, "--help"])
        out = capsys.readouterr().out
        assert "examples:" in out
        for action in build_parser()._subparsers._group_actions[0].choices[command]._actions:
            if action.option_strings and action.dest != "help":
                assert action.help, f"{command} {action.option_strings} has no help"
    assert main(["search", "--help"]) == 0
    assert "query.num_traces" in capsys.readouterr().out
