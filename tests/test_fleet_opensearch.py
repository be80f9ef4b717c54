"""Jaeger on OpenSearch in the fleet (docs/scale.md), for real: one agent, two gateways writing
what they keep to Kafka, Jaeger as ingester and query on a three-node OpenSearch 2.19 cluster
(opensearch/opensearch.yml; jaeger/ingester.yaml over jaeger/opensearch.yaml; one
replica), all started by scripts/backends.py (LocalFleet with
kafka=True, opensearch=True) on free ports of 127.0.0.1.

The gateways keep every window (STEPSPAN_KEEP_PERCENT=100), so Jaeger must hold every step the
engine stand-in (tests/programs/paced_modes.py) sent: the counts are exact.

1. Every step sent reaches Jaeger's HTTP API through Kafka and OpenSearch; the spans are in
   the day's jaeger-span index, with one replica, and the cluster of three nodes is green,
   each of them in its voting configuration.
2. The data node os2 SIGKILLed once this run's spans are being stored: the cluster goes yellow,
   not red, Jaeger's search keeps answering from the replicas on os1, and no step is missing;
   os2 started again, the cluster is green again.
3. os1, the elected cluster manager and a data node, SIGKILLed the same way: os2 and os3 elect
   a manager among themselves, writes go on, and every step of the run is stored and found
   while os1 is still down (with two nodes, this loss stopped every write: 488 of 3,000 steps
   were lost over a 6.5-minute outage, docs/scale.md); os1 started again, green again.
   Then os3, the voter, killed: the cluster stays green with two nodes (os3 holds no shard),
   os1 or os2 manages it, a new run is stored whole; os3 started again rejoins the vote.
4. The project's CLI (`otel-stepspan search`, `stats`) against this Jaeger finds every step.
5. Retention (the fleet keeps 7 days): its es-index-cleaner ran at start, and again on demand
   (what its daily thread runs) with today's real steps stored and indices planted under names
   10 and 3 days back, as Jaeger names them: the cutoff is 00:00 UTC six days back (the
   cleaner's own log line), nothing made today is deleted (every index a test makes is made
   today: OpenSearch sets index.creation_date itself, so no test holds a genuinely old one),
   and every step of today is still found. The same cleaner with 0 days (cutoff: tomorrow, as
   Jaeger's own integration test runs it) deletes exactly the indices of Jaeger's daily layout,
   today's real ones and the planted ones, keeps an index outside it, and Jaeger then finds
   none of the steps: the test fails if the cleaner does nothing. Last on this fleet.
6. `python scripts/backends.py run --fleet --kafka --opensearch --retention-days 5` as a user
   runs it: it prints the nodes and the retention, runs the cleaner at start (cutoff 00:00 UTC
   four days back), every step sent through its agent is in its Jaeger, and SIGTERM stops
   everything (exit 0, every port free, no node left running). Everything down, then up: a
   second `run` on the same data dir finds every step stored before, through Jaeger's HTTP
   API and `otel-stepspan search`, Kafka's log is not formatted again, and new steps arrive.

One fleet serves 1-5, `run` its own (started twice). 5-7 minutes once built (`python
scripts/backends.py build --fleet`). Skips where Go or Java is absent; CI
(OTEL_STEPSPAN_REQUIRE_BACKENDS=1) turns those skips into failures.
"""

from __future__ import annotations

import json
import re
import sys
import time
import urllib.error
from collections import Counter
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import backends  # noqa: E402
from backends_support import (  # noqa: E402
    EngineRun, Stored, assert_all_stored, cleaner_cutoffs, expected_cutoff, opensearch_request, poll,
    requires_go, requires_kafka, requires_opensearch, sigterm, start_run, stored, voter_names, wait_stored,
)

from otel_stepspan.cli.jaeger import JaegerError  # noqa: E402
from otel_stepspan.cli.main import main as cli_main  # noqa: E402

RATE = 100.0  # steps per second
# Windows of at most 2 s: each is decided 5 s after its root arrived.
ENGINE_ENV = {"OTEL_STEPSPAN_TIMELINE_SECONDS": "2"}
KEEP_DAYS = 7  # the fleet's retention
RUN_KEEP_DAYS = 5  # `run --retention-days`
needs_all = [pytest.mark.backends, requires_go, requires_kafka, requires_opensearch]


def test_jaeger_stores_in_opensearch_with_a_replica_and_daily_indices():
    """What docs/scale.md says of the store: replicas, daily indices, templates, the URLs' variable."""
    config = yaml.safe_load(backends.JAEGER_OPENSEARCH_CONFIG.read_text())
    assert list(config["extensions"]["jaeger_storage"]["backends"]) == ["steps"]
    assert list(config["extensions"]["jaeger_storage"]["backends"]["steps"]) == ["opensearch"]  # no Badger
    store = config["extensions"]["jaeger_storage"]["backends"]["steps"]["opensearch"]
    assert store["server_urls"] == f"${{env:{backends.ENV_OPENSEARCH_URLS}:-[http://opensearch:9200]}}"
    assert store["create_mappings"] is True
    for kind in ("spans", "services", "dependencies", "sampling"):
        assert store["indices"][kind]["replicas"] == 1 and store["indices"][kind]["rollover_frequency"] == "day"


def test_run_opensearch_without_fleet_is_refused(capsys):
    assert backends.main(["run", "--opensearch"]) == 1
    assert "--opensearch needs --fleet" in capsys.readouterr().err


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("fleet_opensearch")
    policies = {"STEPSPAN_KEEP_PERCENT": "100", "STEPSPAN_DECISION_WAIT": "5s"}
    with backends.LocalFleet(workdir, kafka=True, opensearch=True, retention_days=KEEP_DAYS,
                             collector_env=policies) as stack:
        yield stack


def _mark(test):
    """The marks of a test on the real tier: skipped without Go or Java (failed in CI)."""
    for mark in needs_all:
        test = mark(test)
    return test


def _day(days_back: int) -> str:
    return (datetime.now(timezone.utc) - timedelta(days=days_back)).strftime("%Y-%m-%d")


def plant_day(url: str, days_back: int) -> list[str]:
    """The span and service indices named for the day ``days_back`` days ago, as Jaeger names
    them (its index templates apply), one document each: their names."""
    stamp = _day(days_back)
    micros = int((datetime.now(timezone.utc) - timedelta(days=days_back)).timestamp() * 10**6)
    documents = {
        f"jaeger-span-{stamp}": {"traceID": f"{days_back + 1:032x}", "spanID": f"{days_back + 1:016x}",
                                 "operationName": "old-step", "startTime": micros,
                                 "startTimeMillis": micros // 1000, "duration": 1000,
                                 "process": {"serviceName": "retention-old"}},
        f"jaeger-service-{stamp}": {"serviceName": "retention-old", "operationName": "old-step"},
    }
    for index, document in documents.items():
        opensearch_request("POST", f"{url}/{index}/_doc?refresh=true", document)
    return sorted(documents)


def jaeger_indices(url: str) -> set[str]:
    return {i["index"] for i in opensearch_request("GET", f"{url}/_cat/indices/jaeger-*?format=json")}


@_mark
def test_every_step_reaches_jaeger_on_opensearch(fleet):
    run = EngineRun.start(fleet.otlp_grpc_endpoint, "os-path", 6, RATE, **ENGINE_ENV).finish()
    assert_all_stored(fleet, run)
    day = time.strftime("%Y-%m-%d", time.gmtime())
    indices = {i["index"]: i for i in opensearch_request("GET", f"{fleet.opensearch_urls[0]}/_cat/indices?format=json", timeout_s=30)}
    assert f"jaeger-span-{day}" in indices and f"jaeger-service-{day}" in indices, sorted(indices)
    assert indices[f"jaeger-span-{day}"]["rep"] == "1"
    health = backends.opensearch_health(fleet.opensearch_urls[0])
    assert health["status"] == "green" and health["number_of_nodes"] == 3, health
    assert health["number_of_data_nodes"] == 2, health  # os3 only votes
    assert _voters(fleet.opensearch_urls[0]) == {"os1", "os2", "os3"}


def _voters(url: str) -> set[str]:
    """The names of the nodes in the cluster's last committed voting configuration."""
    return voter_names(opensearch_request("GET", f"{url}/_cluster/state/metadata,nodes", timeout_s=30))


def _health_or_error(url: str) -> dict:
    """The cluster's health as the node at ``url`` sees it, or {"error": ...} while it has no
    cluster manager to ask (OpenSearch answers 503 after cluster_manager_timeout)."""
    try:
        return backends.opensearch_health(url, cluster_manager_timeout="3s")
    except urllib.error.URLError as exc:
        return {"error": str(exc)}


def _elected(url: str) -> str:
    """The name of the node the cluster elected to manage it, as the node at ``url`` knows it."""
    return opensearch_request("GET", f"{url}/_cat/cluster_manager?format=json", timeout_s=30)[0]["node"]


def _search(stack: backends.LocalFleet, run: EngineRun) -> Stored | None:
    """What Jaeger's search finds of ``run``, or None if Jaeger answered with an error."""
    try:
        return stored(stack.jaeger_url, run.service, run.started_ns, 2000)
    except JaegerError:
        return None


@_mark
def test_a_data_node_killed_mid_run_loses_nothing(fleet):
    run = EngineRun.start(fleet.otlp_grpc_endpoint, "os-node-kill", 12, RATE, **ENGINE_ENV)
    # Killed once this run's first windows are stored: mid-flow.
    first = poll(lambda: stored(fleet.jaeger_url, run.service, run.started_ns, 2000),
                 lambda got: got.unique > 0, 30, 0.5)
    assert first.unique > 0, "nothing of this run stored before the kill"
    backends.kill(fleet.opensearch["os2"])
    # The replicas on os1 are promoted: yellow (a copy of every shard), never red.
    health = poll(lambda: backends.opensearch_health(fleet.opensearch_urls[0]),
                  lambda h: h["number_of_nodes"] == 2, 60, 0.5)
    assert health["number_of_nodes"] == 2 and health["status"] == "yellow", health
    # Search answers from the replicas. Jaeger's client leaves a node out once a request to it
    # failed: the first search sent to os2 after the kill may fail, the next ones go to os1;
    # and for a moment the answer may be partial (seen once: 41 of 94 steps stored before).
    during = poll(lambda: _search(fleet, run), lambda got: got is not None and got.unique >= first.unique, 15, 0.5)
    assert during is not None and during.unique >= first.unique, f"search after the kill: {during}"
    assert all(_search(fleet, run) is not None for _ in range(3))
    run.finish()
    assert_all_stored(fleet, run)
    assert backends.opensearch_health(fleet.opensearch_urls[0])["status"] == "yellow"
    fleet.start_opensearch("os2")  # waits for green: the replicas are copied back
    assert backends.opensearch_health(fleet.opensearch_urls[0])["status"] == "green"


@_mark
def test_the_elected_manager_killed_mid_run_loses_nothing(fleet):
    os1, os2 = fleet.opensearch_url("os1"), fleet.opensearch_url("os2")
    assert _elected(os1) == "os1", "os1 bootstraps the cluster and should still manage it"
    run = EngineRun.start(fleet.otlp_grpc_endpoint, "os-manager-kill", 12, RATE, **ENGINE_ENV)
    first = poll(lambda: stored(fleet.jaeger_url, run.service, run.started_ns, 2000),
                 lambda got: got.unique > 0, 30, 0.5)
    assert first.unique > 0, "nothing of this run stored before the kill"
    backends.kill(fleet.opensearch["os1"])
    # os2 and os3 are two of the three voters: they elect one of them and os2's replicas
    # become primaries.
    health = poll(lambda: _health_or_error(os2), lambda h: h.get("number_of_nodes") == 2, 60, 1)
    assert health["number_of_nodes"] == 2 and health["status"] == "yellow", health
    assert _elected(os2) in ("os2", "os3")
    run.finish()
    # Every step, the ones sent after the kill included, stored while os1 is still down.
    assert_all_stored(fleet, run)
    assert fleet.opensearch["os1"].poll() is not None
    fleet.start_opensearch("os1")  # waits for green with all three nodes
    assert _voters(os1) == {"os1", "os2", "os3"}


@_mark
def test_the_voter_killed_leaves_every_shard_and_every_write(fleet):
    backends.kill(fleet.opensearch["os3"])  # the manager too, if the last test's election chose it
    health = poll(lambda: _health_or_error(fleet.opensearch_urls[0]), lambda h: h.get("number_of_nodes") == 2, 60, 1)
    assert health["number_of_nodes"] == 2 and health["status"] == "green", health  # it held no shard
    assert _elected(fleet.opensearch_urls[0]) in ("os1", "os2")
    run = EngineRun.start(fleet.otlp_grpc_endpoint, "os-voter-kill", 3, RATE, **ENGINE_ENV).finish()
    assert_all_stored(fleet, run)
    fleet.start_opensearch("os3")
    assert _voters(fleet.opensearch_urls[0]) == {"os1", "os2", "os3"}


@_mark
def test_the_cli_searches_and_summarises_jaeger_on_opensearch(fleet, capsys):
    run = EngineRun.start(fleet.otlp_grpc_endpoint, "os-cli", 3, RATE, **ENGINE_ENV).finish()
    assert_all_stored(fleet, run)
    source = ["--jaeger", fleet.jaeger_url, "--service", run.service, "--since", "10m", "--json"]
    assert cli_main(["search", *source, "--mode", "decode", "--limit", "0"]) == 0
    found = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert {f["mode"] for f in found} == {"decode"} and len(found) == run.sent["decode"]
    assert cli_main(["stats", *source]) == 0
    rows = {row["mode"]: row for row in map(json.loads, capsys.readouterr().out.splitlines())}
    assert rows.pop("all")["steps"] == run.steps
    assert {mode: row["steps"] for mode, row in rows.items()} == dict(run.sent), rows


@_mark
def test_the_cleaner_keeps_the_retention_and_deletes_jaegers_daily_indices(fleet, capfd):
    """Last on this fleet: the 0-day run at its end deletes today's indices."""
    cleaner_log = fleet.workdir / "es-index-cleaner.log"
    assert fleet.index_cleaner is not None
    at_start = cleaner_log.read_text()
    assert cleaner_cutoffs(at_start) == [expected_cutoff(KEEP_DAYS)]  # it ran at start
    assert backends._cleaner_deleted(at_start) == []  # and deleted nothing
    url = fleet.opensearch_urls[0]
    run = EngineRun.start(fleet.otlp_grpc_endpoint, "retention", 4, RATE, **ENGINE_ENV).finish()
    assert_all_stored(fleet, run)
    today = {f"jaeger-span-{_day(0)}", f"jaeger-service-{_day(0)}"}
    planted = plant_day(url, 10) + plant_day(url, 3)
    opensearch_request("PUT", f"{url}/jaeger-span-archive")  # Jaeger's archive index: not a daily one
    before = jaeger_indices(url)
    assert today | set(planted) | {"jaeger-span-archive"} <= before, sorted(before)

    assert fleet.index_cleaner.run_once()  # what the daily thread runs
    log = cleaner_log.read_text()
    assert cleaner_cutoffs(log) == [expected_cutoff(KEEP_DAYS)] * 2, log[-2000:]
    assert jaeger_indices(url) == before  # all made today, whatever their name
    assert f"index cleaner (keeps {KEEP_DAYS} days): deleted 0 indices" in capfd.readouterr().err
    assert_all_stored(fleet, run)  # today's steps, through Jaeger's HTTP API

    deleted = backends.run_index_cleaner(fleet.binaries["es_index_cleaner"], fleet.opensearch_urls, 0, cleaner_log)
    assert sorted(deleted) == sorted(today | set(planted))
    assert jaeger_indices(url) == {"jaeger-span-archive"}
    assert stored(fleet.jaeger_url, run.service, run.started_ns, 2000).unique == 0


def _search_cli(jaeger_url: str, service: str, capsys) -> list[tuple[int, str]]:
    """What `otel-stepspan search` lists of ``service``'s steps: (pass id, mode) of each, by pass id."""
    assert cli_main(["search", "--jaeger", jaeger_url, "--service", service, "--since", "10m", "--json",
                     "--limit", "0"]) == 0
    found = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    return sorted((int(step["attributes"]["forward.pass_id"]), step["mode"]) for step in found)


@_mark
def test_run_fleet_kafka_opensearch_serves_stops_and_keeps_what_it_stored(tmp_path, capsys):
    ports = backends.free_ports(7)
    grpc, jaeger = f"http://127.0.0.1:{ports[0]}", f"http://127.0.0.1:{ports[3]}"
    proc, text = start_run(tmp_path, ports, "--kafka", "--opensearch", "--retention-days", str(RUN_KEEP_DAYS))
    try:
        nodes = [line for line in text.splitlines() if line.startswith("OpenSearch ")]
        assert len(nodes) == 1 and nodes[0].count("http://127.0.0.1:") == 3, text
        # The retention it prints, and the cleaner run at start (the cutoff in its own log).
        assert f"the last {RUN_KEEP_DAYS} days kept" in text, text
        log = (tmp_path / "run.stderr").read_text()
        assert f"index cleaner (keeps {RUN_KEEP_DAYS} days): deleted 0 indices" in log, log[-3000:]
        assert cleaner_cutoffs((tmp_path / "es-index-cleaner.log").read_text()) == [expected_cutoff(RUN_KEEP_DAYS)]
        run = EngineRun.start(grpc, "os-run", 3, RATE, **ENGINE_ENV).finish()
        got = wait_stored(jaeger, run.service, run.started_ns, run.steps)
        assert got.missing(run.steps) == [] and got.by_mode == run.sent
    finally:
        status = sigterm(proc)
    assert status == 0
    backends._check_free(ports)
    backends._check_free([int(port) for port in re.findall(r"http://127\.0\.0\.1:(\d+)", nodes[0])])  # every node gone
    # Everything down; up again on the same data dir: OpenSearch's indices, Kafka's log and
    # offsets, the queues. What was stored is found, through the HTTP API and the CLI, and new
    # steps arrive.
    proc, _ = start_run(tmp_path, ports, "--kafka", "--opensearch")
    try:
        again = wait_stored(jaeger, run.service, run.started_ns, run.steps, timeout_s=30)
        assert again.missing(run.steps) == [] and again.by_mode == run.sent
        listed = _search_cli(jaeger, run.service, capsys)
        assert [pass_id for pass_id, _ in listed] == list(range(1, run.steps + 1))
        assert Counter(mode for _, mode in listed) == run.sent
        new = EngineRun.start(grpc, "os-run-again", 3, RATE, **ENGINE_ENV).finish()
        got = wait_stored(jaeger, new.service, new.started_ns, new.steps)
        assert got.missing(new.steps) == [] and got.by_mode == new.sent
    finally:
        assert sigterm(proc) == 0
    stderr = (tmp_path / "run.stderr").read_text()
    assert stderr.count("formatting Kafka's log") == 1, stderr[-2000:]
