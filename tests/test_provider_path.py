"""One path for every way of turning it on: with a tracer provider in the engine's process (as
sglang's ``--enable-trace`` sets one, or ``opentelemetry-instrument``), step spans still go
through the exporter process whenever that provider exports OTLP, with its resource, and are
delivered after a SIGKILL; a provider exporting anywhere else keeps them, saying so once."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from otel_stepspan.testing.otlp_receiver import OtlpReceiver
from otel_stepspan.testing.processes import exporter_pids, read_until

ROOT = Path(__file__).resolve().parent.parent
PROGRAM = ROOT / "tests" / "programs" / "paced_steps.py"


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env["PYTHONPATH"] = str(ROOT)
    env.update(extra)
    return env


def _start(argv: list[str], env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _killed_a_second_after(process: subprocess.Popen, steps: int) -> list[int]:
    """SIGKILL the engine a second after its last step; the exporter processes it had."""
    try:
        read_until(process, f"done {steps}")
        time.sleep(1.0)
        exporters = exporter_pids(process.pid)
        process.kill()
        process.wait(10)
        return exporters
    finally:
        if process.poll() is None:
            process.kill()


def test_steps_through_an_sglang_provider_go_through_the_exporter_process_and_survive_sigkill():
    with OtlpReceiver("grpc") as receiver:
        program = _start([sys.executable, str(PROGRAM), "0", "200", "--forever", "--stop-after", "400",
                          "--provider", "sglang", receiver.endpoint], _env())
        exporters = _killed_a_second_after(program, 400)
        spans = receiver.wait_for_steps(400, timeout_s=30)
        stderr = program.stderr.read()
    assert len(exporters) == 1, stderr[-3000:]
    assert sorted(s.attributes["forward.batch_size"] for s in spans) == list(range(1, 401))
    # The provider's resource, not one from the variables (none are set).
    assert {s.resource["service.name"] for s in spans} == {"sglang-provider"}
    assert {s.resource["process.pid"] for s in spans} == {program.pid}


def test_under_opentelemetry_instrument_steps_go_through_the_exporter_process():
    instrument = Path(sys.executable).parent / "opentelemetry-instrument"
    with OtlpReceiver("grpc") as receiver:
        program = _start(
            [str(instrument), sys.executable, str(PROGRAM), "0", "200", "--forever", "--stop-after", "300"],
            _env(OTEL_TRACES_EXPORTER="otlp", OTEL_METRICS_EXPORTER="none", OTEL_LOGS_EXPORTER="none",
                 OTEL_EXPORTER_OTLP_ENDPOINT=receiver.endpoint, OTEL_SERVICE_NAME="instrumented"),
        )
        exporters = _killed_a_second_after(program, 300)
        spans = receiver.wait_for_steps(300, timeout_s=30)
    assert len(exporters) == 1
    assert sorted(s.attributes["forward.batch_size"] for s in spans) == list(range(1, 301))
    assert {s.resource["service.name"] for s in spans} == {"instrumented"}
    # The provider opentelemetry-instrument set up, read back: its resource, not the variables'.
    assert {s.resource.get("telemetry.auto.version") for s in spans} != {None}


def test_a_provider_exporting_elsewhere_keeps_the_steps_and_says_why_once():
    program = _start([sys.executable, str(PROGRAM), "0.2", "100", "--provider", "console", "-"], _env())
    stdout, stderr = program.communicate(timeout=60)
    assert program.returncode == 0, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if "through the tracer provider in place" in line]
    assert len(lines) == 1 and "an exporter that is not OTLP (opentelemetry.sdk.trace.export.ConsoleSpanExporter)" in lines[0]
    assert stderr.count('"name": "step[decode bs=') >= 10  # the console exporter printed them


def test_otel_stepspan_export_provider_keeps_the_steps_on_an_otlp_provider():
    with OtlpReceiver("grpc") as receiver:
        program = _start([sys.executable, str(PROGRAM), "0", "200", "--forever", "--stop-after", "50",
                          "--provider", "sglang", receiver.endpoint], _env(OTEL_STEPSPAN_EXPORT="provider"))
        try:
            read_until(program, "done 50")
            assert exporter_pids(program.pid) == []  # in process, as asked
            spans = receiver.wait_for_steps(50, timeout_s=10)  # the SDK's batch thread sent them
        finally:
            program.kill()
            program.wait(10)
    assert len(spans) == 50


@pytest.mark.parametrize("value", ["process", "provider"])
def test_the_choice_is_a_known_word(value):
    from otel_stepspan.settings import read_settings

    assert read_settings({"OTEL_STEPSPAN_EXPORT": value}).export_via == value
    wrong = read_settings({"OTEL_STEPSPAN_EXPORT": "sideways"})
    assert wrong.export_via == "auto" and "OTEL_STEPSPAN_EXPORT='sideways'" in wrong.problems[0]
