"""End to end against the real backends: the OpenTelemetry Collector (built with ocb from the
project's builder config) and Jaeger v2, both built from their Go modules at the versions
docker-compose.yml pins, run on 127.0.0.1 with the project's collector/config.yaml and
jaeger/config.yaml (endpoints and data directories rewritten for a local run, nothing else).
The reference engine exports to the Collector through OTEL_* variables; the steps are then
found through Jaeger's query API and with `otel-stepspan search`.

Skips only where Go is absent; CI (OTEL_STEPSPAN_REQUIRE_BACKENDS=1) turns that skip into a
failure.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))
import backends  # noqa: E402
from backends_support import EngineRun, requires_go, stored, wait_stored  # noqa: E402
from span_schema import FORWARD_KEYS, PASS_ID_KEY  # noqa: E402

pytestmark = [pytest.mark.backends, requires_go]

SERVICE = "otel-stepspan-e2e"
SCHEMA_KEYS = FORWARD_KEYS | {PASS_ID_KEY, "engine.name", "engine.tp_rank", "engine.pp_rank"}


def _get(url: str, timeout: float = 10.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def _otlp_value(value: dict):
    for key in ("stringValue", "boolValue", "doubleValue"):
        if key in value:
            return value[key]
    if "intValue" in value:
        return int(value["intValue"])
    return None


def _spans_of(body: dict) -> list[dict]:
    spans = []
    for resource_spans in body["result"]["resourceSpans"]:
        for scope_spans in resource_spans["scopeSpans"]:
            for span in scope_spans["spans"]:
                attributes = {a["key"]: _otlp_value(a["value"]) for a in span.get("attributes", [])}
                spans.append({"name": span["name"], "attributes": attributes})
    return spans


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """Jaeger (Badger) and the Collector running on free local ports."""
    workdir = tmp_path_factory.mktemp("backends")
    with backends.LocalBackends(workdir) as running:
        yield {
            "jaeger": running.jaeger_url,
            "otlp_grpc": running.otlp_grpc_endpoint,
            "otlp_http": running.otlp_http_endpoint,
            "metrics": running.metrics_url,
            "workdir": workdir,
        }


@pytest.fixture(scope="module")
def engine_run(stack):
    """The reference engine's demo, exporting to the Collector over OTLP gRPC."""
    out_dir = stack["workdir"] / "demo"
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env.update(
        {
            "OTEL_SERVICE_NAME": SERVICE,
            "OTEL_EXPORTER_OTLP_ENDPOINT": stack["otlp_grpc"],
            "OTEL_BSP_SCHEDULE_DELAY": "200",
        }
    )
    started = datetime.now(timezone.utc) - timedelta(seconds=5)
    result = subprocess.run(
        [sys.executable, "-m", "otel_stepspan.cli", "demo", "--requests", "16", "--no-profiler", "--quiet",
         "--out-dir", str(out_dir)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return {"started": started, "out_dir": out_dir}


def _search_v3(jaeger: str, started: datetime, **extra: str) -> tuple[int, dict]:
    params = {
        "query.service_name": SERVICE,
        "query.start_time_min": started.strftime("%Y-%m-%dT%H:%M:%S.%f000Z"),
        "query.start_time_max": (datetime.now(timezone.utc) + timedelta(minutes=1)).strftime(
            "%Y-%m-%dT%H:%M:%S.%f000Z"
        ),
        "query.num_traces": "1000",
        **extra,
    }
    status, text = _get(f"{jaeger}/api/v3/traces?{urllib.parse.urlencode(params)}")
    return status, (json.loads(text) if text.strip().startswith("{") else {})


def _wait_for_modes(stack, engine_run, modes: set[str], timeout_s: float = 60.0) -> list[dict]:
    deadline = time.monotonic() + timeout_s
    spans: list[dict] = []
    while time.monotonic() < deadline:
        status, body = _search_v3(stack["jaeger"], engine_run["started"])
        if status == 200:
            spans = _spans_of(body)
            if modes <= {s["attributes"].get("forward.mode") for s in spans}:
                return spans
        time.sleep(1.0)
    raise AssertionError(f"modes {modes} not all in Jaeger after {timeout_s}s: got {len(spans)} spans")


def test_collector_validates_every_project_config():
    backends.validate_collector_config(backends.COLLECTOR_CONFIG)
    backends.validate_collector_config(backends.COLLECTOR_CONFIG, backends.SECURED_CONFIG)


def test_collector_refuses_a_broken_config(tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text(backends.COLLECTOR_CONFIG.read_text().replace("processors: [memory_limiter]", "processors: [batch]"))
    with pytest.raises(backends.BackendError, match="batch"):
        backends.validate_collector_config(broken)


@pytest.mark.parametrize("name", ["docker-compose.yml", "docker-compose.secured.yml"])
def test_compose_files_follow_the_compose_specification(name):
    import jsonschema
    import yaml

    schema = json.loads(backends.compose_schema().read_text())
    compose = yaml.safe_load((REPO / name).read_text())
    jsonschema.validate(compose, schema)
    for service_name, service in compose["services"].items():
        for mapping in service.get("ports", []):
            assert str(mapping).startswith("127.0.0.1:"), f"{service_name} publishes {mapping} beyond loopback"


def test_compose_pins_the_built_releases():
    import yaml

    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    images = {s["image"] for s in compose["services"].values()}
    versions = backends.pinned_versions()
    assert f"otel/opentelemetry-collector-contrib:{versions.collector}" in images
    assert f"jaegertracing/jaeger:{versions.jaeger}" in images
    assert f"prom/prometheus:v{versions.prometheus}" in images


def test_steps_of_every_mode_reach_jaeger_with_the_schema_attributes(stack, engine_run):
    # the local spans file of the same run holds every step the engine ran
    local = (engine_run["out_dir"] / "spans.jsonl").read_text().splitlines()
    expected = sum(
        1
        for line in local
        for rs in json.loads(line)["resourceSpans"]
        for ss in rs["scopeSpans"]
        for span in ss["spans"]
        if span["name"].startswith("step[")  # the timeline roots are not steps
    )
    spans = _wait_for_modes(stack, engine_run, {"decode", "prefill", "mixed", "idle"})
    deadline = time.monotonic() + 60
    while len(spans) < expected and time.monotonic() < deadline:  # the collector batches
        time.sleep(1.0)
        spans = _spans_of(_search_v3(stack["jaeger"], engine_run["started"])[1])
    steps = [s for s in spans if s["name"].startswith("step[")]
    assert len(steps) == expected  # every step, once
    for span in steps:
        attributes = span["attributes"]
        assert SCHEMA_KEYS <= set(attributes), SCHEMA_KEYS - set(attributes)
        assert attributes["forward.label"] == span["name"]
        assert attributes["engine.name"] == "otel-stepspan-reference"
    decodes = [s for s in steps if s["attributes"]["forward.mode"] == "decode"]
    assert all(s["name"] == f"step[decode bs={s['attributes']['forward.batch_size']}]" for s in decodes)


def test_jaeger_reports_no_match_as_404(stack, engine_run):
    _wait_for_modes(stack, engine_run, {"decode"})
    status, _ = _search_v3(stack["jaeger"], engine_run["started"], **{"query.service_name": "no-such-service"})
    assert status == 404


def test_cli_search_finds_decode_steps_in_jaeger(stack, engine_run):
    _wait_for_modes(stack, engine_run, {"decode"})
    result = subprocess.run(
        [sys.executable, "-m", "otel_stepspan.cli", "search", "--jaeger", stack["jaeger"], "--service", SERVICE,
         "--mode", "decode", "--since", "15m", "--limit", "500", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.strip()]
    assert rows
    assert all(row["label"].startswith("step[decode bs=") for row in rows)
    table = subprocess.run(
        [sys.executable, "-m", "otel_stepspan.cli", "search", "--jaeger", stack["jaeger"], "--service", SERVICE,
         "--mode", "decode", "--since", "15m"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert table.returncode == 0, table.stderr
    assert "step[decode bs=" in table.stdout and "step[prefill" not in table.stdout


def test_span_metrics_by_mode_without_per_batch_size_series(stack, engine_run):
    _wait_for_modes(stack, engine_run, {"decode", "prefill", "mixed", "idle"})
    deadline = time.monotonic() + 60
    text = ""
    while time.monotonic() < deadline:
        status, text = _get(stack["metrics"])
        if status == 200 and 'forward_mode="mixed"' in text and 'forward_mode="idle"' in text:
            break
        time.sleep(1.0)
    series = [line for line in text.splitlines() if line and not line.startswith("#")]
    ours = [line for line in series if SERVICE in line]
    assert ours, "no span metrics for the engine's service"
    modes = {part.split('"')[1] for line in ours for part in line.split(",") if part.strip().startswith("forward_mode=")}
    assert {"decode", "prefill", "mixed", "idle"} <= modes
    assert not any("span_name" in line for line in series)
    calls = [line for line in ours if line.startswith("traces_span_metrics_calls_total")]
    # one calls series per mode (and status), whatever the number of batch sizes seen
    assert len(calls) <= 2 * len(modes)


def test_jaeger_drops_spans_past_the_retention(tmp_path):
    """JAEGER_RETENTION (docker-compose.yml passes it; 72h by default) is Badger's time to live."""
    with backends.LocalBackends(tmp_path, jaeger_env={"JAEGER_RETENTION": "4s"}) as running:
        run = EngineRun.start(running.otlp_grpc_endpoint, "retention", 1, 50).finish()
        assert wait_stored(running.jaeger_url, run.service, run.started_ns, run.steps).missing(run.steps) == []
        deadline = time.monotonic() + 30
        while stored(running.jaeger_url, run.service, run.started_ns, 1000).unique and time.monotonic() < deadline:
            time.sleep(1)
        assert stored(running.jaeger_url, run.service, run.started_ns, 1000).unique == 0
