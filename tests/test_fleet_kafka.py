"""Kafka between the fleet's gateways and Jaeger (docs/scale.md), for real: one agent, two
gateways writing what they keep to Kafka (collector/gateway-kafka.yaml over gateway.yaml), one
Kafka 4 KRaft node from Maven Central's jars (kafka/server.properties) and Jaeger as ingester
and query on one Badger store (jaeger/ingester.yaml over jaeger/config.yaml), all started by
scripts/backends.py (LocalFleet with kafka=True) on free ports of 127.0.0.1.

The gateways keep every window (STEPSPAN_KEEP_PERCENT=100), so Jaeger must end up holding every
step the engine stand-in (tests/programs/paced_modes.py, OTEL_* variables only) sent: the counts
are exact. Jaeger takes no OTLP in this setup, so what it holds came through Kafka.

1. Every step sent reaches Jaeger's HTTP API through Kafka; the consumer group has committed to
   the end of the topic.
2. The Kafka broker stopped once the gateways write a run's windows to it, and started again
   4 s later: no step missing (the gateways' queues on disk hold what Kafka could not take).
3. The Jaeger ingester SIGKILLed once it has stored and committed part of a run, and started
   again 4 s later: no step missing; it read on from the offsets its group had committed.
4. `python scripts/backends.py run --fleet --kafka` as a user runs it: it prints Kafka's
   broker and topic, every step sent through its agent is in its Jaeger, SIGTERM stops
   everything (exit 0, every port free), and a second `run` on the same data dir (Kafka's log
   kept, not formatted again) still holds them.

One fleet serves 1-3, one after the other (each run its own service name). About two
minutes once the binaries are built and Kafka's jars fetched
(`python scripts/backends.py build --fleet`). Skips where Go or Java is absent; CI
(OTEL_STEPSPAN_REQUIRE_BACKENDS=1) turns those skips into failures.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import backends  # noqa: E402
from backends_support import (  # noqa: E402
    EngineRun, assert_all_stored, poll, requires_go, requires_kafka, sigterm, start_run, wait_stored,
)

RATE = 100.0  # steps per second
OUTAGE_S = 4.0
# Windows of at most 2 s: each is decided 5 s after its root arrived (decision_wait_after_root_received).
ENGINE_ENV = {"OTEL_STEPSPAN_TIMELINE_SECONDS": "2"}


def test_the_overlays_name_one_topic_and_keep_what_a_restart_would_lose(tmp_path):
    """What the gateways write is what Jaeger reads (and what `run --fleet --kafka` prints);
    the settings the restart tests below rely on, but cannot force to fail, are as documented."""
    gateway = yaml.safe_load(backends.GATEWAY_KAFKA_CONFIG.read_text())
    ingester = yaml.safe_load(backends.JAEGER_INGESTER_CONFIG.read_text())
    exporter, receiver = gateway["exporters"]["kafka"], ingester["receivers"]["kafka"]
    for kafka in (exporter, receiver):
        assert kafka["traces"] == {"topic": backends.KAFKA_TOPIC, "encoding": "otlp_proto"}
        assert kafka["brokers"] == f"${{env:{backends.ENV_KAFKA_BROKERS}:-kafka:9092}}"
    assert gateway["service"]["pipelines"]["traces/sampled"] == {"exporters": ["kafka"]}
    assert exporter["sending_queue"]["storage"] == "file_storage/queue"  # gateway.yaml's, on disk
    assert exporter["retry_on_failure"]["max_elapsed_time"] == "0s" and exporter["producer"]["required_acks"] == "all"
    assert ingester["service"]["pipelines"]["traces"] == {"receivers": ["kafka"]}
    assert receiver["group_id"] == backends.KAFKA_GROUP and receiver["initial_offset"] == "earliest"
    # an offset is committed only once the store took the record's spans
    assert receiver["message_marking"] == {"after": True, "on_error": False}
    config = backends.write_kafka_config(tmp_path / "kafka.properties", backends.KafkaPorts(1111, 2222),
                                         data_dir=tmp_path / "data")
    settings = dict(line.split("=", 1) for line in config.read_text().splitlines() if "=" in line and line[0] != "#")
    assert settings["listeners"] == "PLAINTEXT://127.0.0.1:1111,CONTROLLER://127.0.0.1:2222"
    assert settings["advertised.listeners"] == "PLAINTEXT://127.0.0.1:1111"
    assert settings["controller.quorum.bootstrap.servers"] == "127.0.0.1:2222"
    assert settings["log.dirs"] == str((tmp_path / "data").resolve())
    assert settings["log.retention.hours"] == "24" and settings["log.retention.bytes"] == str(2 * 2**30)


def test_run_kafka_without_fleet_is_refused(capsys):
    assert backends.main(["run", "--kafka"]) == 1
    assert "--kafka needs --fleet" in capsys.readouterr().err


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("fleet_kafka")
    policies = {"STEPSPAN_KEEP_PERCENT": "100", "STEPSPAN_DECISION_WAIT": "5s"}
    with backends.LocalFleet(workdir, kafka=True, collector_env=policies) as stack:
        yield stack


def _offsets(stack: backends.LocalFleet) -> dict[int, tuple[int, int]]:
    """{partition: (committed, end)} of Jaeger's group; 0 committed where none was (a
    partition no record went to yet)."""
    offsets = backends.kafka_group_offsets(stack.kafka_broker, libs=stack.binaries["kafka"])
    return {partition: (committed or 0, end) for partition, (committed, end) in offsets.items()}


def _committed_and_end(stack: backends.LocalFleet) -> tuple[int, int]:
    """(records the group committed, records the topic holds), over all partitions."""
    offsets = _offsets(stack).values()
    return sum(committed for committed, _ in offsets), sum(end for _, end in offsets)


def _settled_offsets(stack: backends.LocalFleet) -> dict[int, tuple[int, int]]:
    """The group's offsets once it committed to the end (autocommit runs every second), or
    after 20 s (the caller's assertion then shows the lag)."""
    deadline = time.monotonic() + 20
    while True:
        offsets = _offsets(stack)
        if all(committed == end for committed, end in offsets.values()) or time.monotonic() > deadline:
            return offsets
        time.sleep(1.0)


@pytest.mark.backends
@requires_go
@requires_kafka
def test_every_step_reaches_jaeger_through_kafka(fleet):
    run = EngineRun.start(fleet.otlp_grpc_endpoint, "kafka-path", 8, RATE, **ENGINE_ENV).finish()
    assert_all_stored(fleet, run)
    # Jaeger's OTLP receiver is defined but in no pipeline: Kafka was the only way in.
    assert not backends._port_open(fleet.jaeger_ports.otlp_grpc)
    offsets = _settled_offsets(fleet)
    assert sorted(offsets) == [0, 1, 2, 3]  # num.partitions of kafka/server.properties
    assert sum(end for _, end in offsets.values()) > 0
    assert all(committed == end for committed, end in offsets.values()), offsets


@pytest.mark.backends
@requires_go
@requires_kafka
def test_a_kafka_restart_mid_run_loses_nothing(fleet):
    _, end_before = _committed_and_end(fleet)
    run = EngineRun.start(fleet.otlp_grpc_endpoint, "kafka-restart", 16, RATE, **ENGINE_ENV)
    # Stopped once the gateways are writing this run's windows (the first ones are decided
    # about 7 s in), so that the outage is in the middle of the flow.
    _, end = poll(lambda: _committed_and_end(fleet), lambda got: got[1] > end_before, 20, 0.5)
    assert end > end_before, "the gateways wrote nothing to Kafka"
    before = fleet.kafka
    backends.stop(fleet.kafka, timeout=30)
    assert before.returncode is not None and not backends._port_open(fleet.kafka_ports.broker)
    time.sleep(OUTAGE_S)
    fleet.start_kafka()
    run.finish()
    assert_all_stored(fleet, run)
    assert fleet.kafka.pid != before.pid


@pytest.mark.backends
@requires_go
@requires_kafka
def test_the_ingester_killed_mid_run_resumes_from_its_offsets_and_loses_nothing(fleet):
    committed_before, _ = _committed_and_end(fleet)
    run = EngineRun.start(fleet.otlp_grpc_endpoint, "kafka-ingester-kill", 16, RATE, **ENGINE_ENV)
    # Killed once it has stored and committed part of this run: mid-flow.
    committed, _ = poll(lambda: _committed_and_end(fleet), lambda got: got[0] > committed_before, 20, 0.5)
    assert committed > committed_before, "the ingester committed nothing of this run"
    backends.kill(fleet.jaeger)
    committed_at_kill, _ = _committed_and_end(fleet)
    time.sleep(OUTAGE_S)
    fleet.start_jaeger()
    run.finish()
    assert_all_stored(fleet, run)
    at_end = _settled_offsets(fleet)
    assert all(committed == end for committed, end in at_end.values()), at_end
    # Records came after the offsets committed before the kill: the restarted ingester read on
    # from there, and committed them all.
    assert committed_at_kill < sum(end for _, end in at_end.values()), (committed_at_kill, at_end)


@pytest.mark.backends
@requires_go
@requires_kafka
def test_run_fleet_kafka_serves_stops_and_keeps_what_it_stored(tmp_path):
    ports = backends.free_ports(7)
    grpc, jaeger = f"http://127.0.0.1:{ports[0]}", f"http://127.0.0.1:{ports[3]}"
    proc, text = start_run(tmp_path, ports, "--kafka")
    try:
        assert (f"Kafka      127.0.0.1:{ports[5]}, topic {backends.KAFKA_TOPIC} " in text
                and backends.KAFKA_GROUP in text), text
        run = EngineRun.start(grpc, "kafka-run", 3, RATE, **ENGINE_ENV).finish()
        got = wait_stored(jaeger, run.service, run.started_ns, run.steps)
        assert got.missing(run.steps) == [] and got.by_mode == run.sent
    finally:
        status = sigterm(proc)
    assert status == 0
    backends._check_free(ports)  # Kafka, Jaeger's front, the agent, Prometheus: all gone
    proc, _ = start_run(tmp_path, ports, "--kafka")
    try:
        again = wait_stored(jaeger, run.service, run.started_ns, run.steps, timeout_s=10)
        assert again.missing(run.steps) == [] and again.by_mode == run.sent
    finally:
        assert sigterm(proc) == 0
    stderr = (tmp_path / "run.stderr").read_text()
    ready = f"Kafka {backends.KAFKA_VERSION} ready on 127.0.0.1:{ports[5]}"
    assert stderr.count("formatting Kafka's log") == 1 and stderr.count(ready) == 2, stderr[-2000:]
