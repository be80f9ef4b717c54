"""`python scripts/backends.py run --fleet` for real (docs/scale.md): the command a user runs,
as a subprocess, with every fixed port of its own. It starts one agent, two gateways (the fleet
Collector with collector/agent.yaml and collector/gateway.yaml, tail-sampling policies as
shipped, decision_wait shortened by STEPSPAN_DECISION_WAIT), Jaeger behind its search front,
and Prometheus with prometheus/prometheus-fleet.yml scraping both gateways.

An engine stand-in (tests/programs/fleet_steps.py, OTEL_* variables only, pointed at the
endpoint `run --fleet` prints for engines) sends 240 steps in windows of 4 with one decode step
planted 2.5 times slower than the decode threshold. The test checks, through the same HTTP APIs
users and Jaeger's Monitor tab use:
  * Jaeger holds the planted step's window, whole, and far fewer windows than were sent (the
    rest went through the baseline share);
  * Prometheus's `sum by (forward_mode)` of the span metrics counts every step sent, mode by
    mode, and its series come from both gateways;
  * Jaeger's Monitor tab reads that Prometheus: one series per mode, the gateways summed;
  * a gateway SIGKILLed is started again by `run` on its ports (a line names it, why it ended
    and its log), and `run` goes on serving;
  * SIGTERM stops everything `run --fleet` started (its exit status is 0, every port is free).

Once the binaries are built (`python scripts/backends.py build --fleet`), about 30 s. Skips
only where Go is absent; CI (OTEL_STEPSPAN_REQUIRE_BACKENDS=1) turns that skip into a failure.
"""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))
import backends  # noqa: E402
from backends_support import LOSS_LINE, engine_env, monitor_series, poll, prometheus_query, requires_go  # noqa: E402

pytestmark = [pytest.mark.backends, requires_go]

FLEET_STEPS = Path(__file__).parent / "programs" / "fleet_steps.py"
SERVICE = "fleet-run"
GATEWAYS = 2
STEPS = 240
WINDOW = 4  # OTEL_STEPSPAN_TIMELINE_STEPS: 60 windows
RATE = 200.0
SLOW_WINDOW = 30
SLOW_PASS = SLOW_WINDOW * WINDOW + 2  # the second step of window 30 (pass ids 121-124)
SLOW_MS = 250  # 2.5 times the shipped decode threshold (100 ms)


def _get_json(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        return error.code, {}


def _value(value: dict):
    if "intValue" in value:
        return int(value["intValue"])
    return next((value[k] for k in ("stringValue", "boolValue", "doubleValue") if k in value), None)


def _jaeger_traces(jaeger: str, started: datetime) -> dict[str, list[dict]]:
    """Every trace of SERVICE since ``started``, {trace id: [{name, attributes}]}, through the
    /api/v3 search (the search front in front of Jaeger)."""
    fmt = "%Y-%m-%dT%H:%M:%S.%f000Z"
    params = {"query.service_name": SERVICE, "query.start_time_min": started.strftime(fmt),
              "query.start_time_max": (datetime.now(timezone.utc) + timedelta(minutes=1)).strftime(fmt),
              "query.num_traces": "1000"}
    status, body = _get_json(f"{jaeger}/api/v3/traces?{urllib.parse.urlencode(params)}")
    traces: dict[str, list[dict]] = {}
    if status != 200:
        return traces
    for resource_spans in body["result"]["resourceSpans"]:
        for scope_spans in resource_spans["scopeSpans"]:
            for span in scope_spans["spans"]:
                traces.setdefault(span["traceId"], []).append(
                    {"name": span["name"], "attributes": {a["key"]: _value(a["value"]) for a in span.get("attributes", [])}})
    return traces


@pytest.fixture(scope="module")
def fleet_run(tmp_path_factory):
    """`backends.py run --fleet` as a subprocess, until its endpoints are printed; SIGTERM after."""
    backends.ensure_built(("jaeger", "prometheus", "search_front", "otelcol_gateway"))  # built here, not in run
    workdir = tmp_path_factory.mktemp("fleet_run")
    grpc, http, health, jaeger_ui, prometheus = backends.free_ports(5)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("STEPSPAN_", "OTEL_"))}
    env["STEPSPAN_DECISION_WAIT"] = "5s"  # the gateways' policies otherwise as shipped
    argv = [sys.executable, str(REPO / "scripts" / "backends.py"), "run", "--fleet", "--gateways", str(GATEWAYS),
            "--data-dir", str(workdir), "--otlp-grpc-port", str(grpc), "--otlp-http-port", str(http),
            "--health-port", str(health), "--jaeger-ui-port", str(jaeger_ui), "--prometheus-port", str(prometheus)]
    stderr = open(workdir / "run.stderr", "w+")
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=stderr, stdin=subprocess.DEVNULL, text=True,
                            env=env, cwd=REPO)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    printed = []
    try:
        deadline = time.monotonic() + 120
        while not (printed and printed[-1].startswith("data, logs")):
            try:
                printed.append(lines.get(timeout=max(0.1, deadline - time.monotonic())))
            except queue.Empty:
                stderr.seek(0)
                raise AssertionError(f"run --fleet printed no endpoints in 120 s: {printed}\n{stderr.read()[-3000:]}")
        text = "".join(printed)
        pairs = re.findall(r"gateway \d+ +OTLP gRPC 127\.0\.0\.1:(\d+), span metrics http://127\.0\.0\.1:(\d+)/", text)
        gateway_ports = [int(port) for pair in pairs for port in pair]
        yield {"proc": proc, "text": text, "workdir": workdir, "stderr": stderr,
               "engine": f"http://127.0.0.1:{grpc}", "jaeger": f"http://127.0.0.1:{jaeger_ui}",
               "prometheus": f"http://127.0.0.1:{prometheus}",
               "ports": [grpc, http, health, jaeger_ui, prometheus, *gateway_ports]}
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
        stderr.close()


@pytest.fixture(scope="module")
def sent(fleet_run, tmp_path_factory) -> dict:
    """The engine stand-in's run through the agent: {"sent": steps by mode, "started": datetime}."""
    plan = tmp_path_factory.mktemp("fleet_run_plan") / "plan.json"
    plan.write_text(json.dumps({"steps": STEPS, "rate": RATE,
                                "plant": {str(SLOW_PASS): {"mode": "decode", "sleep_ms": SLOW_MS}}}))
    started = datetime.now(timezone.utc) - timedelta(seconds=5)
    engine = subprocess.run([sys.executable, str(FLEET_STEPS), str(plan)], capture_output=True, text=True,
                            timeout=120, env=engine_env(fleet_run["engine"], SERVICE,
                                                        OTEL_STEPSPAN_TIMELINE_STEPS=str(WINDOW)))
    assert engine.returncode == 0, engine.stderr
    assert not LOSS_LINE.search(engine.stderr), engine.stderr
    report = json.loads(engine.stdout.splitlines()[-1])
    assert sum(report["sent"].values()) == STEPS
    return {"sent": Counter(report["sent"]), "started": started}


def test_run_fleet_prints_the_agent_for_engines_and_every_gateway(fleet_run):
    text = fleet_run["text"]
    assert f"OTEL_EXPORTER_OTLP_ENDPOINT={fleet_run['engine']} (the agent)" in text
    assert len(re.findall(r"^gateway \d+ ", text, re.MULTILINE)) == GATEWAYS
    assert fleet_run["prometheus"] in text and fleet_run["jaeger"] in text
    config = (fleet_run["workdir"] / "prometheus.yml").read_text()
    assert len(re.findall(r"127\.0\.0\.1:\d+", config.split("targets:")[1].splitlines()[0])) == GATEWAYS


def test_the_window_with_the_slow_step_is_searchable_in_jaeger(fleet_run, sent):
    def slow_window(traces):
        return [spans for spans in traces.values()
                if any(s["attributes"].get("forward.pass_id") == SLOW_PASS for s in spans)]

    traces = poll(lambda: _jaeger_traces(fleet_run["jaeger"], sent["started"]),
                  lambda t: slow_window(t) and len(slow_window(t)[0]) == WINDOW + 1, 60, 1.0)
    found = slow_window(traces)
    assert found, f"the slow step's window is not in Jaeger ({len(traces)} traces of {SERVICE} are)"
    spans, = found
    steps = sorted(s["attributes"]["forward.pass_id"] for s in spans if "forward.mode" in s["attributes"])
    assert steps == list(range(SLOW_WINDOW * WINDOW + 1, SLOW_WINDOW * WINDOW + WINDOW + 1))  # whole
    assert [s["name"] for s in spans].count("timeline") == 1
    # tail sampling ran: most quiet windows were dropped (10 % kept by the baseline share)
    assert len(traces) < STEPS // WINDOW // 2, len(traces)


def test_prometheus_sums_every_gateways_span_metrics_to_the_steps_sent(fleet_run, sent):
    selector = f'traces_span_metrics_calls_total{{service_name="{SERVICE}",forward_mode!=""}}'
    by_mode = poll(lambda: prometheus_query(fleet_run["prometheus"], f"sum by (forward_mode) ({selector})", "forward_mode"),
                  lambda got: got == dict(sent["sent"]), 60, 1.0)
    assert by_mode == dict(sent["sent"])  # every step, kept or dropped by tail sampling
    instances = prometheus_query(fleet_run["prometheus"], f"sum by (instance) ({selector})", "instance")
    assert len(instances) == GATEWAYS and all(n > 0 for n in instances.values()), instances


def test_jaeger_monitor_tab_reads_the_gateways_summed(fleet_run, sent):
    steps = {f"step[{mode}]" for mode in sent["sent"]}
    series = poll(lambda: monitor_series(fleet_run["jaeger"], SERVICE, "calls"), lambda s: steps <= set(s), 60, 1.0)
    assert steps <= set(series), series
    assert all(len(per_op) == 1 for per_op in series.values()), series  # one per mode, not per gateway


def _pids_naming(path: Path) -> list[int]:
    """The processes whose command line names ``path``."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                argv = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if any(str(path).encode() in arg for arg in argv):
                pids.append(int(entry.name))
    return pids


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def test_a_gateway_killed_is_started_again_by_run(fleet_run, sent):
    config = fleet_run["workdir"] / "gateway-2.yaml"
    (killed,) = _pids_naming(config)
    metrics = f"http://127.0.0.1:{fleet_run['ports'][8]}/metrics"  # gateway 2's span metrics
    assert _answers(metrics)
    os.kill(killed, signal.SIGKILL)
    line = f"gateway-2 ended (killed by SIGKILL); starting it again (log: {fleet_run['workdir']}"

    def said() -> str:  # read apart from run's own handle on it (they would share an offset)
        return (fleet_run["workdir"] / "run.stderr").read_text(errors="replace")

    assert line in poll(said, lambda text: line in text, 60, 0.5), said()[-3000:]
    started = poll(lambda: _pids_naming(config), lambda pids: len(pids) == 1 and pids[0] != killed, 60, 0.5)
    assert len(started) == 1 and started[0] != killed, started
    assert poll(lambda: _answers(metrics), bool, 60, 0.5), f"gateway 2 does not answer again: {said()[-3000:]}"
    assert fleet_run["proc"].poll() is None  # run goes on serving


def test_sigterm_stops_everything_run_fleet_started(fleet_run, sent):
    proc = fleet_run["proc"]
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0
    backends._check_free(fleet_run["ports"])  # agent, gateways, Jaeger's front, Prometheus: all gone
