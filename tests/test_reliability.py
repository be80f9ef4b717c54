"""Reliability: collector outages, signals, fork and spawn workers, TLS and auth headers.
Every program runs as a subprocess configured only through OTEL_* variables and exports to a real
OTLP receiver on 127.0.0.1."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from otel_stepspan.testing.otlp_receiver import OtlpReceiver

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import backends  # noqa: E402

PROGRAMS = Path(__file__).parent / "programs"


def env_for(endpoint: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env.update(
        {
            "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
            "OTEL_BSP_SCHEDULE_DELAY": "100",
            "OTEL_EXPORTER_OTLP_TIMEOUT": "2",
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.update(extra)
    return env


def free_port() -> int:
    """A port for a receiver started after its program: one outside the kernel's ephemeral
    range, so that no connection (the program's own retries included) takes it meanwhile."""
    return backends.free_port()


def wait_for_line(process: subprocess.Popen, text: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if text in line:
            return
        if not line and process.poll() is not None:
            break
    raise AssertionError(f"program never printed {text!r}: {process.stderr.read()}")


def _run_through_outages(extra_env: dict[str, str]) -> tuple[dict, list, list, str]:
    """The paced program (9 s at 200 steps/s) against a collector that is down at start for
    1.5 s, up for 2.5 s, down for 1.5 s, then back: (summary, spans, outage windows, stderr)."""
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    program = subprocess.Popen(
        [sys.executable, str(PROGRAMS / "paced_steps.py"), "9", "200"],
        env=env_for(endpoint, **extra_env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    receivers = []
    outages = []  # (collector gone, collector back), wall-clock ns
    try:
        wait_for_line(program, "ready")
        gone = time.time_ns()  # down at start
        time.sleep(1.5)
        for stay_up, stay_down in ((2.5, 1.5), (None, None)):
            receivers.append(OtlpReceiver("grpc", port=port).start())
            outages.append((gone, time.time_ns()))
            if stay_up is None:
                break
            time.sleep(stay_up)
            # The collector goes away mid-run (shutting down: what it received it answers, so
            # that "arrived" and "counted exported" can be held equal)...
            receivers[-1].stop(grace_s=2.0)
            gone = time.time_ns()
            time.sleep(stay_down)  # ... and comes back
        out, err = program.communicate(timeout=90)
    finally:
        if program.poll() is None:
            program.kill()
        for receiver in receivers:
            receiver.stop()
    assert program.returncode == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    spans = [span for receiver in receivers for span in receiver.steps()]
    return summary, spans, outages, err


def test_collector_outages_lose_nothing_and_recovery_delivers_every_step():
    """Down at start, up, down mid-run, back: the program never stops stepping, and what the
    exporter queued while the collector was away is delivered once it is back: every step
    arrives, exactly once."""
    summary, spans, outages, err = _run_through_outages({})
    indices = sorted(s.attributes["forward.batch_size"] for s in spans)
    assert indices == list(range(1, summary["steps"] + 1))  # every step, once
    assert summary["steps"] >= 1000
    assert summary["exported"] == summary["steps"]
    assert summary["dropped"] == summary["export_failed"] == summary["export_queue_full"] == 0
    assert summary["exporter_pending"] == 0
    assert "otel_stepspan: lost" not in err
    print(f"\noutages survived: {len(outages)}, steps run: {summary['steps']}, received: {len(spans)}, lost: 0")


def test_outages_longer_than_the_export_queue_lose_only_what_it_refused_and_count_it():
    """With an export queue of 64 spans, 1.5 s outages at 200 steps/s overflow it: the spans it
    refused are counted exactly (received + counted lost == steps), none is lost while the
    collector is up, and the losses are reported in one line per interval, not per span."""
    summary, spans, outages, err = _run_through_outages(
        {"OTEL_BSP_MAX_QUEUE_SIZE": "64", "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "32"}
    )
    arrived = {s.attributes["forward.batch_size"]: s.start_ns for s in spans}
    assert len(arrived) == len(spans)  # no duplicates
    lost_and_counted = summary["dropped"] + summary["export_failed"] + summary["export_queue_full"]
    assert lost_and_counted > 0  # the outages really cost spans...
    # ... every one of them counted: what arrived plus what was reported lost is every step.
    assert len(spans) == summary["exported"]
    assert summary["exported"] + lost_and_counted == summary["steps"] >= 1000
    assert summary["exporter_pending"] == 0

    # Outside the outage windows nothing is lost. A window is widened by what is in flight when
    # the collector goes (one export batch, its retries up to the 2 s timeout) and by the
    # exporter's back-off after it returns.
    def in_outage(start_ns: int) -> bool:
        return any(gone - 2.5e9 <= start_ns <= back + 3e9 for gone, back in outages)

    stamps = sorted(arrived.values())
    first_step_ns = stamps[0] - (min(arrived) - 1) * 5e6  # steps are 5 ms apart
    expected_ns = {i: first_step_ns + (i - 1) * 5e6 for i in range(1, summary["steps"] + 1)}
    lost_outside = [i for i, t in expected_ns.items() if not in_outage(t) and i not in arrived]
    assert lost_outside == []
    assert any(not in_outage(t) for t in arrived.values()), "nothing arrived outside the outages"
    assert "Queue full" not in err  # no per-span warning
    assert 1 <= err.count("otel_stepspan: lost") <= 3  # one line per interval, not per step
    print(
        f"\noutages survived: {len(outages)}, steps run: {summary['steps']}, received: {len(spans)}, "
        f"lost and reported: {lost_and_counted}, lost outside the outage windows: {len(lost_outside)}"
    )


def test_sigterm_flushes_pending_spans_then_dies_of_the_signal():
    with OtlpReceiver("grpc") as receiver:
        program = subprocess.Popen(
            [sys.executable, str(PROGRAMS / "paced_steps.py"), "0", "100", "--forever"],
            env=env_for(receiver.endpoint, OTEL_BSP_SCHEDULE_DELAY="60000"),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        wait_for_line(program, "ready")
        time.sleep(1.0)
        assert receiver.step_count == 0  # nothing exported yet: all pending in the process
        program.send_signal(signal.SIGTERM)
        program.wait(timeout=60)
        assert program.returncode == -signal.SIGTERM
        spans = receiver.wait_for_steps(50, timeout_s=5)
    indices = sorted(s.attributes["forward.batch_size"] for s in spans)
    assert len(indices) >= 50
    assert indices == list(range(1, len(indices) + 1))  # every step up to the signal, once


def test_exit_with_the_collector_gone_is_bounded_and_every_span_accounted_for():
    """The program exits at once; its exporter keeps trying for OTEL_STEPSPAN_EXPORTER_LINGER
    seconds, then gives up, says how many spans it could not deliver, and exits too."""
    env = env_for(f"http://127.0.0.1:{free_port()}", OTEL_STEPSPAN_EXPORTER_LINGER="2")
    started = time.monotonic()
    # subprocess.run returns once the exporter, which shares the program's stderr, has exited
    # too; a hang here would hit the timeout and fail the test.
    result = subprocess.run(
        [sys.executable, str(PROGRAMS / "paced_steps.py"), "0.5", "200"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert time.monotonic() - started < 60
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["exported"] == 0
    still_queued = summary["exporter_pending"]
    assert still_queued + summary["export_failed"] + summary["dropped"] + summary["export_queue_full"] == (
        summary["steps"]
    )
    given_up = [line for line in result.stderr.splitlines() if "could not be delivered" in line]
    assert len(given_up) == 1, result.stderr
    assert f"{still_queued} step spans could not be delivered" in given_up[0]
    final = [line for line in result.stderr.splitlines() if "otel_stepspan: lost" in line][-1]
    assert f"totals {summary['dropped']} / {summary['export_queue_full']} / {still_queued}" in final


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_workers_export_their_own_spans_once(method):
    steps, workers = 40, 2
    with OtlpReceiver("grpc") as receiver:
        result = subprocess.run(
            [sys.executable, str(PROGRAMS / "forking.py"), method, str(workers), str(steps)],
            env=env_for(receiver.endpoint),
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert result.returncode == 0, result.stderr
        assert "exit codes [0, 0]" in result.stdout
        spans = receiver.wait_for_steps(steps * (workers + 1), timeout_s=10)
    keys = Counter((s.attributes["process.pid"], s.attributes["forward.batch_size"]) for s in spans)
    assert all(count == 1 for count in keys.values()), "duplicated spans"
    assert len(spans) == steps * (workers + 1)
    by_rank: dict[int, set[int]] = {}
    for span in spans:
        by_rank.setdefault(span.attributes["engine.tp_rank"], set()).add(span.attributes["process.pid"])
    assert sorted(by_rank) == [0, 1, 2]
    assert all(len(pids) == 1 for pids in by_rank.values())
    assert len({next(iter(p)) for p in by_rank.values()}) == 3  # each rank its own process


def _self_signed(tmp_path: Path) -> tuple[Path, bytes, bytes]:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
            "-keyout", str(key), "-out", str(cert),
        ],
        check=True,
        capture_output=True,
    )
    return cert, cert.read_bytes(), key.read_bytes()


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
def test_tls_with_certificate_and_auth_headers(tmp_path, protocol):
    cert_path, cert, key = _self_signed(tmp_path)
    headers = {"authorization": "Bearer token-123", "x-tenant": "llm"}
    with OtlpReceiver(protocol, tls=(cert, key), required_headers=headers) as receiver:
        result = subprocess.run(
            [sys.executable, str(PROGRAMS / "steps.py"), "3"],
            env=env_for(
                receiver.endpoint,
                OTEL_EXPORTER_OTLP_PROTOCOL=protocol,
                OTEL_EXPORTER_OTLP_CERTIFICATE=str(cert_path),
                OTEL_EXPORTER_OTLP_HEADERS="authorization=Bearer%20token-123,x-tenant=llm",
            ),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, result.stderr
        spans = receiver.wait_for_steps(3, timeout_s=10)
    assert receiver.endpoint.startswith("https://")
    assert [s.name for s in spans] == ["step[decode bs=1]", "step[decode bs=2]", "step[decode bs=3]"]
    assert receiver.rejected == 0


def test_wrong_auth_header_is_rejected_and_counted(tmp_path):
    with OtlpReceiver("grpc", required_headers={"authorization": "Bearer right"}) as receiver:
        result = subprocess.run(
            [sys.executable, str(PROGRAMS / "paced_steps.py"), "0.3", "100"],
            env=env_for(receiver.endpoint, OTEL_EXPORTER_OTLP_HEADERS="authorization=Bearer%20wrong"),
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert result.returncode == 0
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert receiver.step_count == 0 and receiver.rejected >= 1
    assert summary["export_failed"] == summary["steps"]
