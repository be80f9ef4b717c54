"""The fleet tier with Docker Compose, for real: `docker compose -f docker-compose.yml -f
docker-compose.fleet.yml up -d --wait` runs agent -> two gateways -> Kafka -> Jaeger's ingester ->
a three-node OpenSearch <- Jaeger's query, and Prometheus scraping the gateways, from images built
here (scripts/compose.py: the fleet Collector from its Go build, Kafka and OpenSearch from Maven
Central's jars on a Debian JRE made with debootstrap).

1. The override replaces the single node's collector by the fleet (a plain `config` still is
   the single node), publishes on 127.0.0.1 only, names the images compose.py builds, and
   hands the shell's STEPSPAN_* policy variables to the gateways.
2. Every step an engine stand-in sends to the agent's published OTLP port is in Jaeger once
   (STEPSPAN_KEEP_PERCENT=100 through the compose environment: the count is exact), and
   Prometheus's sum over both gateways' span metrics is the steps sent, per mode.
   OpenSearch is three nodes, two of them holding data, all three in the voting configuration
   (so that the two left after any one is lost elect a manager: docs/scale.md).
   A gateway SIGKILLed mid-run and left down leaves the agent's ring (the dns resolver on the
   gateways' network alias): every step that ended a few seconds after the kill is stored,
   through the other gateway; started again, it takes a share of a new run.
3. `down` (the volumes kept), then `up --wait`: every stored step is still there, none twice
   (Kafka's committed offsets survived too), and a new run goes through again.
4. Retention: the service index-cleaner (Jaeger's es-index-cleaner, image built by compose.py)
   runs at each start with the shell's STEPSPAN_RETENTION_DAYS (5 here; 7 unset), logging the
   cutoff (00:00 UTC four days back) and what it deleted: nothing, on the empty store of the
   first start and on today's indices and steps after `up` again, which stay. Last, the same
   image's cleaner run once with 0 days (`docker compose run`) deletes today's daily indices,
   and Jaeger then finds none of the steps: the cleaner reaches OpenSearch over the compose
   network and deletes for real (every index is made today, so no test holds a really old
   one; tests/test_fleet_retention.py says why the creation date decides). Stopped, the
   service exits 0 on SIGTERM rather than being killed 10 s later. A refused
   STEPSPAN_RETENTION_DAYS makes `up --wait` fail with the cleaner unhealthy (its log says why,
   once; no restart loop), and the right value again makes it healthy and run.

Its own project name and free ports, so it runs beside tests/test_compose.py and a user's
stack; `down -v` at the end. Needs what tests/test_compose.py needs, and Java (the jars);
in CI (OTEL_STEPSPAN_REQUIRE_BACKENDS=1) a skip is a failure.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import backends  # noqa: E402
import compose  # noqa: E402
from backends_support import (  # noqa: E402
    EngineRun, cleaner_cutoffs, expected_cutoff, poll, prometheus_query, requires_go, requires_kafka,
    requires_opensearch, stored, voter_names, wait_stored,
)

pytestmark = [
    pytest.mark.backends,
    requires_go,
    requires_kafka,
    requires_opensearch,
    pytest.mark.skipif(
        shutil.which("dockerd") is None and (os.geteuid() != 0 or shutil.which("apt-get") is None),
        reason="no Docker Engine, and it cannot be installed here (not root on Debian)",
    ),
]

PROJECT = "otel_stepspan_fleet_test"  # its own containers and volumes
FLEET = ("-f", "docker-compose.yml", "-f", "docker-compose.fleet.yml")
PORT_VARIABLES = ("STEPSPAN_OTLP_GRPC_PORT", "STEPSPAN_OTLP_HTTP_PORT", "STEPSPAN_HEALTH_PORT",
                  "STEPSPAN_UI_PORT", "STEPSPAN_PROMETHEUS_PORT")
SERVICE = "compose-fleet"
RATE = 100.0  # steps per second
# Windows of at most 2 s, each decided 5 s after its root arrived (collector/gateway.yaml).
ENGINE_ENV = {"OTEL_STEPSPAN_TIMELINE_SECONDS": "2"}
GATEWAY_KILL_RUN_S = 20.0
GATEWAY_KILL_AT_S = 8.0  # into that run: both gateways hold undecided windows
GATEWAY_GONE_S = 3.0  # the container's death, the agent's next DNS lookup (1 s), the engine's export
KEEP_DAYS = 5  # STEPSPAN_RETENTION_DAYS, not the default, to see the shell's value arrive
CLEANER = "index-cleaner"


@pytest.fixture(scope="module")
def env():
    """What the compose commands run with: free published ports, and the gateways keeping every
    window, told through the compose environment as a user would."""
    ports = dict(zip(PORT_VARIABLES, map(str, backends.free_ports(len(PORT_VARIABLES)))))
    return {**ports, "STEPSPAN_KEEP_PERCENT": "100", "STEPSPAN_DECISION_WAIT": "5s",
            backends.ENV_RETENTION_DAYS: str(KEEP_DAYS)}


def _compose(env: dict[str, str], *args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
    return compose.compose("-p", PROJECT, *FLEET, *args, env=env, timeout=timeout, check=check)


def _up(env: dict[str, str]) -> None:
    _compose(env, "up", "-d", "--wait", "--wait-timeout", "300")


@pytest.fixture(scope="module")
def fleet(env):
    compose.prepare()
    _compose(env, "down", "-v", "--remove-orphans")
    _up(env)
    try:
        yield {"otlp": f"http://127.0.0.1:{env['STEPSPAN_OTLP_GRPC_PORT']}",
               "jaeger": f"http://127.0.0.1:{env['STEPSPAN_UI_PORT']}",
               "prometheus": f"http://127.0.0.1:{env['STEPSPAN_PROMETHEUS_PORT']}"}
    finally:
        _compose(env, "down", "-v", "--remove-orphans")


def _assert_all_stored(jaeger: str, run: EngineRun, timeout_s: float = 180) -> None:
    got = wait_stored(jaeger, run.service, run.started_ns, run.steps, timeout_s)
    assert run.reported_lost == 0, run.stderr
    assert got.missing(run.steps) == [], f"{len(got.missing(run.steps))} of {run.steps} steps missing"
    assert got.by_mode == run.sent
    assert got.duplicates == 0


@pytest.fixture(scope="module")
def first_run(fleet):
    run = EngineRun.start(fleet["otlp"], SERVICE, 4, RATE, **ENGINE_ENV).finish()
    _assert_all_stored(fleet["jaeger"], run)
    return run


def test_the_override_replaces_the_single_node_with_the_fleet(env):
    compose.ensure_compose()
    single = json.loads(compose.compose("config", "--format", "json").stdout)["services"]
    assert "otel-collector" in single and "agent" not in single  # `up` alone: the single node
    services = json.loads(_compose(env, "config", "--format", "json").stdout)["services"]
    assert set(services) == {"agent", "gateway-1", "gateway-2", "kafka", "jaeger", "jaeger-ingester", CLEANER,
                             "opensearch", "opensearch-1", "opensearch-2", "opensearch-3", "search-front",
                             "prometheus"}
    published = [p for s in services.values() for p in s.get("ports", [])]
    assert len(published) == len(PORT_VARIABLES)
    assert all(p["host_ip"] == "127.0.0.1" for p in published), published
    assert {p["published"] for p in published} == {env[v] for v in PORT_VARIABLES}
    fleet_collector = f"{compose.FLEET_COLLECTOR_IMAGE}:{backends.gateway_version()}"
    assert {name: services[name]["image"] for name in ("agent", "gateway-1", "kafka", "opensearch", "opensearch-1")} == {
        "agent": fleet_collector, "gateway-1": fleet_collector, "kafka": compose.KAFKA_IMAGE,
        "opensearch": compose.JRE_IMAGE, "opensearch-1": compose.OPENSEARCH_IMAGE}
    assert services["jaeger-ingester"]["image"] == services["jaeger"]["image"] == single["jaeger"]["image"]
    for gateway in ("gateway-1", "gateway-2"):
        assert services[gateway]["environment"]["STEPSPAN_KEEP_PERCENT"] == "100"
        assert services[gateway]["environment"]["STEPSPAN_SLOW_DECODE_MS"] is None  # unset: the config's default
    cleaner = services[CLEANER]
    assert cleaner["image"] == f"{compose.INDEX_CLEANER_IMAGE}:{backends.pinned_versions().jaeger}"
    nodes = services["jaeger"]["environment"]["STEPSPAN_OPENSEARCH_URLS"]  # Jaeger's, the same
    assert cleaner["environment"] == {backends.ENV_RETENTION_DAYS: str(KEEP_DAYS), "STEPSPAN_OPENSEARCH_URLS": nodes}
    unset = json.loads(_compose({**env, backends.ENV_RETENTION_DAYS: ""}, "config", "--format", "json").stdout)
    default_days = unset["services"][CLEANER]["environment"][backends.ENV_RETENTION_DAYS]
    assert default_days == str(backends.DEFAULT_RETENTION_DAYS)


def test_every_step_reaches_jaeger_through_the_fleet(first_run):
    """first_run asserts it: every step once, the count of each mode exact."""
    assert first_run.steps > 0


def test_prometheus_sums_both_gateways_span_metrics_to_the_steps_sent(fleet, first_run):
    selector = f'traces_span_metrics_calls_total{{service_name="{SERVICE}",forward_mode!=""}}'
    by_mode = poll(lambda: prometheus_query(fleet["prometheus"], f"sum by (forward_mode) ({selector})", "forward_mode"),
                   lambda got: got == dict(first_run.sent), 90, 2.0)
    assert by_mode == dict(first_run.sent)
    with urllib.request.urlopen(f"{fleet['prometheus']}/api/v1/targets", timeout=30) as response:
        targets = json.load(response)["data"]["activeTargets"]
    assert sorted((t["labels"]["instance"], t["health"]) for t in targets) == [
        ("gateway-1:8889", "up"), ("gateway-2:8889", "up")]


def _steps_by_gateway(prometheus: str, service: str) -> dict[str, float]:
    """{gateway's metrics endpoint: the steps of ``service`` its span metrics counted}."""
    selector = f'traces_span_metrics_calls_total{{service_name="{service}",forward_mode!=""}}'
    return prometheus_query(prometheus, f"sum by (instance) ({selector})", "instance")


def test_a_killed_gateway_leaves_the_agents_ring_and_its_share_goes_to_the_other(env, fleet):
    """gateway-2 SIGKILLed mid-run and left down: Docker's DNS stops naming it, the agent's dns
    resolver (collector/agent.yaml, asked every second) drops it from the ring, and every step
    that ended from then on is stored, through gateway-1. (A static ring would keep sending
    gateway-2 its share, held in the agent's memory, then dropped after 60 s.) What is lost is
    what gateway-2 held undecided and what was routed to it in the second before the lookup
    (printed; tests/test_fleet_faults.py bounds the first part exactly). Started again, it
    rejoins the ring and takes a share of a new run."""
    run = EngineRun.start(fleet["otlp"], SERVICE + "-gateway-kill", GATEWAY_KILL_RUN_S, RATE, **ENGINE_ENV)
    time.sleep(GATEWAY_KILL_AT_S)
    _compose(env, "kill", "gateway-2")  # SIGKILL; the restart policy waits for the next start
    killed_at_s = (time.time_ns() - run.started_ns) / 1e9
    run.finish()
    # Step k ends no earlier than (k - 1) / RATE after started_ns: from `first_safe` on, every
    # step reached the agent after the lookup that dropped gateway-2.
    first_safe = int((killed_at_s + GATEWAY_GONE_S) * RATE) + 1
    assert first_safe < run.steps - RATE  # seconds of steps after it

    def missing() -> list[int]:
        return stored(fleet["jaeger"], run.service, run.started_ns, run.steps + 1000).missing(run.steps)
    poll(missing, lambda got: not got or got[-1] < first_safe, 120, 3.0)
    time.sleep(10.0)  # stragglers of the last windows, then the final count
    lost = missing()
    print(f"\ngateway-2 SIGKILLed {killed_at_s:.1f} s into a run of {run.steps} steps and left down: "
          f"{len(lost)} lost (steps {lost[0] if lost else '-'}..{lost[-1] if lost else '-'}), "
          f"none from step {first_safe} on")
    assert run.reported_lost == 0, run.stderr
    assert [k for k in lost if k >= first_safe] == [], f"steps after the kill lost: {lost[-20:]}"

    _up(env)  # gateway-2 again (healthy), back under the name the agent asks for
    # windows of 10 steps: 40 traces, so that each gateway's share is some (2 * 0.5 ** 40 that not)
    again = EngineRun.start(fleet["otlp"], SERVICE + "-gateway-back", 4, RATE,
                            **{**ENGINE_ENV, "OTEL_STEPSPAN_TIMELINE_STEPS": "10"}).finish()
    _assert_all_stored(fleet["jaeger"], again)
    endpoints = {"gateway-1:8889", "gateway-2:8889"}
    by_gateway = poll(lambda: _steps_by_gateway(fleet["prometheus"], again.service),
                      lambda got: set(got) == endpoints and sum(got.values()) == again.steps, 90, 2.0)
    assert set(by_gateway) == endpoints and sum(by_gateway.values()) == again.steps, by_gateway


def _assert_the_cleaner_ran_once_deleting_nothing(env: dict[str, str]) -> None:
    """The index-cleaner container's log (one start) shows one run, keeping the shell's days
    (its cutoff), on the first node, that deleted nothing."""
    def log() -> str:
        return _compose(env, "logs", "--no-log-prefix", CLEANER).stdout
    text = poll(log, lambda got: re.search(r"^index cleaner \(keeps", got, re.M) is not None, 90, 1.0)
    assert cleaner_cutoffs(text) == [expected_cutoff(KEEP_DAYS)], text[-3000:]
    summary = f"index cleaner (keeps {KEEP_DAYS} days, http://opensearch:9200): deleted 0 indices"
    assert re.findall(r"^index cleaner \(keeps.*$", text, re.M) == [summary], text[-3000:]


def _opensearch_get(env: dict[str, str], path: str) -> Any:
    """GET ``path`` of node os1's REST API from inside the compose network: its JSON."""
    got = _compose(env, "exec", "-T", "opensearch-1", "busybox", "wget", "-q", "-O", "-",
                   f"http://127.0.0.1:9200{path}")
    return json.loads(got.stdout)


def _daily_indices(env: dict[str, str]) -> set[str]:
    """Jaeger's indices (names), as node os1 lists them to a client inside the compose network."""
    return {index["index"] for index in _opensearch_get(env, "/_cat/indices/jaeger-*?format=json")}


def test_opensearch_is_three_voters_two_of_which_hold_data(env, fleet):
    health = _opensearch_get(env, "/_cluster/health")
    assert (health["number_of_nodes"], health["number_of_data_nodes"], health["status"]) == (3, 2, "green"), health
    assert voter_names(_opensearch_get(env, "/_cluster/state/metadata,nodes")) == {"os1", "os2", "os3"}


def test_the_index_cleaner_ran_at_start_with_the_shells_days(env, fleet):
    _assert_the_cleaner_ran_once_deleting_nothing(env)  # on the empty store of the first start


def test_down_then_up_keeps_what_was_stored(env, fleet, first_run):
    _compose(env, "down")
    _up(env)
    got = wait_stored(fleet["jaeger"], SERVICE, first_run.started_ns, first_run.steps, 60)
    assert got.missing(first_run.steps) == [] and got.by_mode == first_run.sent
    again = EngineRun.start(fleet["otlp"], SERVICE + "-again", 2, RATE, **ENGINE_ENV).finish()
    _assert_all_stored(fleet["jaeger"], again)
    # Once the new run is stored, the ingester has read past the old records: had it started
    # again before its committed offset (kafka_data lost), the first run would be there twice.
    assert stored(fleet["jaeger"], SERVICE, first_run.started_ns, first_run.steps + 1000).duplicates == 0

    # The cleaner of the new start ran on today's indices and kept them, and every step.
    _assert_the_cleaner_ran_once_deleting_nothing(env)
    today = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    daily = {f"jaeger-span-{today}", f"jaeger-service-{today}"}
    assert daily <= _daily_indices(env)
    got = stored(fleet["jaeger"], SERVICE, first_run.started_ns, first_run.steps + 1000)
    assert got.missing(first_run.steps) == [] and got.duplicates == 0

    # The same image's cleaner, once with 0 days (cutoff: tomorrow): today's daily indices go.
    once = _compose(env, "run", "--rm", "--no-deps", "-T", "--entrypoint", "/go/bin/es-index-cleaner-linux",
                    CLEANER, "0", "http://opensearch:9201")
    assert daily <= set(backends._cleaner_deleted(once.stdout + once.stderr)), once.stdout + once.stderr
    assert not daily & _daily_indices(env)
    assert stored(fleet["jaeger"], SERVICE, first_run.started_ns, 2000).unique == 0

    # SIGTERM, as `down` sends it, ends the cleaner's loop at once: exit 0, not the kill (137)
    # that follows 10 s later when a container ignores it.
    _compose(env, "stop", CLEANER)
    (state,) = map(json.loads, _compose(env, "ps", "-a", "--format", "json", CLEANER).stdout.splitlines())
    assert (state["State"], state["ExitCode"]) == ("exited", 0), state


def test_a_refused_retention_setting_leaves_the_cleaner_unhealthy_not_looping(env, fleet):
    """STEPSPAN_RETENTION_DAYS=a-week: `up --wait` fails naming the cleaner, whose log says why
    once; the container stays up (no restart loop), deleting nothing. Set right again, it is
    healthy and runs."""
    bad = {**env, backends.ENV_RETENTION_DAYS: "a-week"}
    refused = _compose(bad, "up", "-d", "--wait", "--wait-timeout", "60", CLEANER, timeout=120, check=False)
    assert refused.returncode != 0 and CLEANER in refused.stdout + refused.stderr, refused
    (state,) = map(json.loads, _compose(bad, "ps", "-a", "--format", "json", CLEANER).stdout.splitlines())
    assert (state["State"], state["Health"]) == ("running", "unhealthy"), state
    inspected = subprocess.run([compose._docker(), "inspect", "--format", "{{.RestartCount}}", state["ID"]],
                               stdout=subprocess.PIPE, text=True, check=True)
    assert inspected.stdout.strip() == "0"
    text = _compose(bad, "logs", "--no-log-prefix", CLEANER).stdout
    assert text.count("STEPSPAN_RETENTION_DAYS must be a whole number of days, not 'a-week'") == 1, text
    assert "index cleaner (keeps" not in text  # it never ran
    _up(env)  # the shell's days again: recreated, healthy (--wait), and it runs
    _assert_the_cleaner_ran_once_deleting_nothing(env)
