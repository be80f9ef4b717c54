"""`docker compose up`, for real: the project's docker-compose.yml (and its secured override)
run by Docker Compose v2 on a Docker Engine, with images of the pinned releases built locally
from the Go-built binaries (scripts/compose.py: the registry images cannot be pulled here).

The user's path: `config`, `up --wait`, the demo exporting through OTEL_EXPORTER_OTLP_ENDPOINT,
`otel-stepspan search --mode decode`, span metrics by mode; then what must survive does:
Jaeger restarted and SIGKILLed (Badger on its volume), spans queued in the collector while
Jaeger is stopped surviving a collector restart (the queue's volume), and `down` then `up`
again; then the secured override, as its comments tell a user to run it; `down -v` at the end.

Needs root on Debian (docker.io) or a running Docker Engine, and Go; in CI
(OTEL_STEPSPAN_REQUIRE_BACKENDS=1) a skip is a failure.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from otel_stepspan.otlp_json import iter_step_spans

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import backends  # noqa: E402
import compose  # noqa: E402
from backends_support import EngineRun, monitor_series, requires_go, stored, wait_stored  # noqa: E402

pytestmark = [
    pytest.mark.backends,
    requires_go,
    pytest.mark.skipif(
        shutil.which("dockerd") is None and (os.geteuid() != 0 or shutil.which("apt-get") is None),
        reason="no Docker Engine, and it cannot be installed here (not root on Debian)",
    ),
]

PROJECT = "otel_stepspan_test"  # its own volumes, never a user's otel_stepspan ones
JAEGER = "http://127.0.0.1:16686"
OTLP_GRPC = "http://127.0.0.1:4317"
SERVICE = "compose-demo"
SECURED = ("-f", "docker-compose.yml", "-f", "docker-compose.secured.yml")


def _compose(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return compose.compose("-p", PROJECT, *args, timeout=timeout)


def _ports_free() -> None:
    for port in (4317, 4318, 8889, 9090, 13133, 16686):
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                pytest.fail(f"127.0.0.1:{port} is taken: docker-compose.yml publishes it")


@pytest.fixture(scope="module")
def up(tmp_path_factory):
    compose.prepare(fleet=False)  # the fleet's images: tests/test_compose_fleet.py
    _compose("down", "-v", "--remove-orphans")
    _ports_free()
    _compose("up", "-d", "--wait", "--wait-timeout", "120")
    try:
        yield tmp_path_factory.mktemp("compose")
    finally:
        _compose("down", "-v", "--remove-orphans")


@pytest.fixture(scope="module")
def demo(up):
    """The reference engine's demo, exporting to the compose collector."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env.update({"OTEL_SERVICE_NAME": SERVICE, "OTEL_EXPORTER_OTLP_ENDPOINT": OTLP_GRPC})
    started_ns = time.time_ns()
    result = subprocess.run(
        [sys.executable, "-m", "otel_stepspan.cli", "demo", "--requests", "12", "--no-profiler", "--quiet",
         "--out-dir", str(up)],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    pass_ids, modes = set(), {}
    # The step spans (the file also holds the demo's request spans and the timeline roots).
    for step in iter_step_spans(up / "spans.jsonl"):
        pass_ids.add(step.attributes["forward.pass_id"])
        modes[step.mode] = modes.get(step.mode, 0) + 1
    return {"started_ns": started_ns, "pass_ids": pass_ids, "modes": modes}


def _holds_the_demo(demo, timeout_s: float = 90) -> None:
    got = wait_stored(JAEGER, SERVICE, demo["started_ns"], len(demo["pass_ids"]), timeout_s)
    assert set(got.pass_ids) == demo["pass_ids"]
    assert dict(got.by_mode) == demo["modes"]


def test_compose_files_are_valid_for_docker_compose(up):
    plain = _compose("config", "--quiet")
    assert plain.returncode == 0
    secured = compose.compose(*SECURED, "config", "--format", "json")
    service = json.loads(secured.stdout)["services"]["otel-collector"]
    assert "--config=/etc/otelcol-contrib/secured.yaml" in service["command"]
    assert {v["target"] for v in service["volumes"]} >= {
        "/etc/otelcol-contrib/config.yaml", "/etc/otelcol-contrib/secured.yaml",
        "/etc/otelcol-contrib/secrets", "/var/lib/otelcol/file_storage"}


def test_every_demo_step_reaches_jaeger_through_compose(demo):
    _holds_the_demo(demo)


def test_search_by_mode_finds_the_decode_steps(demo):
    _holds_the_demo(demo)
    result = subprocess.run(
        [sys.executable, "-m", "otel_stepspan.cli", "search", "--jaeger", JAEGER, "--service", SERVICE,
         "--mode", "decode", "--since", "15m", "--limit", "5000", "--json"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.strip()]
    assert len(rows) == demo["modes"]["decode"]
    assert all(row["label"].startswith("step[decode bs=") for row in rows)


def test_the_ui_port_is_the_search_front(demo):
    """127.0.0.1:16686 answers Jaeger's API through search-front; Jaeger publishes nothing."""
    _holds_the_demo(demo)
    with urllib.request.urlopen(f"{JAEGER}/api/services", timeout=10) as response:
        assert SERVICE in json.loads(response.read())["data"]
    rows = [json.loads(line) for line in _compose("ps", "--format", "json").stdout.splitlines() if line.strip()]
    published = {row["Service"]: {p["PublishedPort"] for p in row.get("Publishers") or [] if p.get("PublishedPort")}
                 for row in rows}
    assert published["search-front"] == {16686}
    assert published["jaeger"] == set()


def test_span_metrics_by_mode_on_the_published_port(demo):
    _holds_the_demo(demo)
    deadline = time.monotonic() + 60
    while True:
        with urllib.request.urlopen("http://127.0.0.1:8889/metrics", timeout=10) as response:
            text = response.read().decode()
        ours = [line for line in text.splitlines() if SERVICE in line and line.startswith("traces_span_metrics_calls")]
        if all(f'forward_mode="{m}"' in " ".join(ours) for m in demo["modes"]) or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert {m for m in demo["modes"] if any(f'forward_mode="{m}"' in line for line in ours)} == set(demo["modes"])


def test_monitor_tab_lists_the_demo_steps_by_mode(demo):
    """Jaeger's Monitor tab through compose: Jaeger asks the Prometheus service, which scrapes the
    collector; one call-rate row per mode the demo ran (plus the timeline roots' row)."""
    _holds_the_demo(demo)
    expected = {f"step[{mode}]" for mode in demo["modes"]} | {"(not a step)"}
    deadline = time.monotonic() + 90
    while True:
        series = monitor_series(JAEGER, SERVICE, "calls")
        if set(series) >= expected or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert set(series) == expected
    assert all(len(per_op) == 1 for per_op in series.values()), series
    with urllib.request.urlopen(f"{JAEGER}/api/services", timeout=10) as response:
        assert "jaeger" not in json.load(response)["data"]  # no self-tracing


def test_jaeger_restart_and_sigkill_keep_every_step(demo):
    _holds_the_demo(demo)
    _compose("restart", "jaeger")
    _compose("up", "-d", "--wait", "--wait-timeout", "120")
    _holds_the_demo(demo, timeout_s=30)
    _compose("kill", "-s", "SIGKILL", "jaeger")
    _compose("up", "-d", "--wait", "--wait-timeout", "120")
    _holds_the_demo(demo, timeout_s=30)


def _collector_ready(timeout_s: float = 60) -> None:
    """Wait for the collector's health_check to answer: it does once every pipeline started,
    that is once the exporter's queue has put back on disk what its last run left in flight."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen("http://127.0.0.1:13133/", timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError("the collector's health_check did not answer within "
                                 f"{timeout_s:.0f} s:\n{_compose('logs', 'otel-collector').stdout[-4000:]}")
        time.sleep(0.5)


def test_spans_queued_for_a_stopped_jaeger_survive_a_collector_restart(demo):
    _compose("stop", "jaeger")
    run = EngineRun.start(OTLP_GRPC, "compose-queued", 3, 100).finish()
    assert run.loss_lines == []  # the collector took them all
    _compose("restart", "otel-collector")  # what it holds for Jaeger is on its volume
    # SIGKILL a RUNNING collector. While it starts, the queue moves the exports its last run
    # left in flight: it deletes them, then writes them back, in two writes; a kill between the
    # two loses them (the collector's own window, docs/backends.md), which this test is not about.
    _collector_ready()
    _compose("kill", "-s", "SIGKILL", "otel-collector")
    _compose("up", "-d", "--wait", "--wait-timeout", "120")  # Jaeger first, then the collector
    got = wait_stored(JAEGER, run.service, run.started_ns, run.steps)
    assert got.missing(run.steps) == [], _compose("logs", "otel-collector").stdout[-4000:]


def test_down_then_up_keeps_the_volumes(demo):
    _holds_the_demo(demo)
    _compose("down")
    _compose("up", "-d", "--wait", "--wait-timeout", "120")
    _holds_the_demo(demo, timeout_s=30)
    assert stored(JAEGER, SERVICE, demo["started_ns"], 100000).duplicates == 0


def test_secured_override_takes_the_token_over_tls_and_refuses_plain_requests(demo):
    """`python scripts/backends.py secrets`, then up with the override; the engine is configured
    by OTEL_EXPORTER_OTLP_CERTIFICATE and OTEL_EXPORTER_OTLP_HEADERS only."""
    secrets = backends.make_secrets()  # collector/secrets/, as the override expects
    token = secrets["token"].read_text().strip()
    _compose(*SECURED, "up", "-d", "--wait", "--wait-timeout", "120")
    tls = {"OTEL_EXPORTER_OTLP_CERTIFICATE": str(secrets["ca.crt"])}
    right = EngineRun.start("https://127.0.0.1:4317", "compose-secured", 3, 100,
                            OTEL_EXPORTER_OTLP_HEADERS=f"authorization=Bearer%20{token}", **tls)
    wrong = EngineRun.start("https://127.0.0.1:4317", "compose-secured-wrong", 3, 100,
                            OTEL_EXPORTER_OTLP_HEADERS="authorization=Bearer%20wrong", **tls)
    plain = EngineRun.start(OTLP_GRPC, "compose-plain", 3, 100)
    for run in (right, wrong, plain):
        run.finish()
    assert wait_stored(JAEGER, right.service, right.started_ns, right.steps).missing(right.steps) == []
    assert right.loss_lines == []
    for refused in (wrong, plain):  # refused, and neither run hung (finish() has a timeout)
        assert stored(JAEGER, refused.service, refused.started_ns, 1000).unique == 0
    assert wrong.loss_lines, wrong.stderr  # exact accounting: tests/test_backends_faults.py
    _holds_the_demo(demo, timeout_s=30)  # the same volumes under the secured collector
