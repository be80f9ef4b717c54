"""Real OTLP over the wire: the instrumented program runs as a subprocess configured only through
OTEL_* variables; a receiver built on the OTLP protobuf services checks what arrived."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from otel_stepspan.testing.otlp_receiver import OtlpReceiver

PROGRAM = Path(__file__).parent / "programs" / "steps.py"


def run_program(env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    clean.update(env)
    result = subprocess.run(
        [sys.executable, str(PROGRAM), *args], env=clean, capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
def test_env_alone_exports_step_spans(protocol):
    headers = {"authorization": "Bearer s3cret"}
    with OtlpReceiver(protocol, required_headers=headers) as receiver:
        run_program(
            {
                "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
                "OTEL_EXPORTER_OTLP_PROTOCOL": protocol,
                "OTEL_EXPORTER_OTLP_HEADERS": "authorization=Bearer%20s3cret",
                "OTEL_SERVICE_NAME": "wire-test",
                "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment=ci,service.namespace=llm",
            },
            "3",
        )
        spans = receiver.wait_for_steps(3, timeout_s=5)
        [timeline] = receiver.timelines()
    assert receiver.rejected == 0
    assert [s.name for s in spans] == ["step[decode bs=1]", "step[decode bs=2]", "step[decode bs=3]"]
    # One engine timeline: the steps are the children of its root, which counts them.
    assert {(s.trace_id, s.parent_span_id) for s in spans} == {(timeline.trace_id, timeline.span_id)}
    assert timeline.attributes["timeline.steps"] == timeline.attributes["timeline.steps.decode"] == 3
    assert timeline.start_ns == spans[0].start_ns and timeline.end_ns == spans[2].end_ns
    span = spans[2]
    assert span.kind == 1  # SPAN_KIND_INTERNAL
    assert span.scope_name == "otel_stepspan" and span.scope_version
    attributes = dict(span.attributes)
    assert attributes.pop("process.pid") == span.resource["process.pid"]
    assert attributes == {
        "forward.mode": "decode",
        "forward.batch_size": 3,
        "forward.extend_tokens": 0,
        "forward.decode_seqs": 3,
        "forward.prefill_seqs": 0,
        "forward.num_tokens": 3,
        "forward.label": "step[decode bs=3]",
    }
    assert span.resource["service.name"] == "wire-test"
    assert span.resource["deployment.environment"] == "ci"
    assert span.resource["service.namespace"] == "llm"
    assert isinstance(span.resource["process.pid"], int)
    assert span.end_ns >= span.start_ns > 0


def test_traces_endpoint_variable_is_used_as_is_for_http():
    with OtlpReceiver("http/protobuf") as receiver:
        run_program(
            {
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": f"{receiver.endpoint}/v1/traces",
                "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf",
            },
            "2",
        )
        assert len(receiver.wait_for_steps(2, timeout_s=5)) == 2


def test_span_name_mode_is_low_cardinality():
    with OtlpReceiver("grpc") as receiver:
        run_program({"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint, "OTEL_STEPSPAN_SPAN_NAME": "mode"}, "3")
        spans = receiver.wait_for_steps(3, timeout_s=5)
    assert {s.name for s in spans} == {"step[decode]"}
    assert [s.attributes["forward.label"] for s in spans] == [
        "step[decode bs=1]",
        "step[decode bs=2]",
        "step[decode bs=3]",
    ]


@pytest.mark.parametrize(
    "extra",
    [{"OTEL_SDK_DISABLED": "true"}, {"OTEL_TRACES_SAMPLER": "always_off"}, {"OTEL_TRACES_EXPORTER": "none"}],
)
def test_standard_variables_turn_export_off(extra):
    with OtlpReceiver("grpc") as receiver:
        run_program({"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint, **extra}, "3")
        assert receiver.wait_for_steps(1, timeout_s=1.5) == []


def test_unsupported_protocol_is_a_clear_error_and_the_program_runs_on():
    result = run_program(
        {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"}, "2"
    )
    assert "OTLP protocol 'http/json' is not supported" in result.stderr
    assert "pid" in result.stdout


def test_engine_provider_is_kept_not_replaced():
    with OtlpReceiver("grpc") as engine_side, OtlpReceiver("grpc") as env_side:
        run_program({"OTEL_EXPORTER_OTLP_ENDPOINT": env_side.endpoint}, "2", "--own-provider", engine_side.endpoint)
        spans = engine_side.wait_for_steps(2, timeout_s=5)
        assert [s.resource["service.name"] for s in spans] == ["engine-own-provider"] * 2
        assert env_side.wait_for_steps(1, timeout_s=1) == []


def test_spawned_worker_configures_itself_from_the_inherited_environment():
    with OtlpReceiver("grpc") as receiver:
        result = run_program(
            {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint, "OTEL_SERVICE_NAME": "spawner"}, "2", "--spawn-worker"
        )
        spans = receiver.wait_for_steps(4, timeout_s=5)
    assert "worker exit 0" in result.stdout
    parent_pid = int(result.stdout.split("pid")[-1])
    by_pid: dict[int, list[str]] = {}
    for span in spans:
        by_pid.setdefault(span.resource["process.pid"], []).append(span.name)
    assert by_pid.pop(parent_pid) == ["step[decode bs=1]", "step[decode bs=2]"]
    ((worker_pid, names),) = by_pid.items()
    assert names == ["step[decode bs=100]", "step[decode bs=101]"]
    assert {s.resource["service.name"] for s in spans} == {"spawner"}
