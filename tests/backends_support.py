"""What the tests against the real Collector and Jaeger share: an engine stand-in run through
OTEL_* variables only, what it says it sent and lost, and what Jaeger holds of it."""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from otel_stepspan.cli.jaeger import JaegerClient, JaegerError

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))
import backends  # noqa: E402

# The real Collector, Jaeger and Docker Compose are built from Go; CI
# (OTEL_STEPSPAN_REQUIRE_BACKENDS=1) turns this skip into a failure.
requires_go = pytest.mark.skipif(
    shutil.which("go") is None and not os.environ.get(backends.ENV_GO),
    reason="Go is not installed: the real Collector, Jaeger and Docker Compose cannot be built",
)
# Kafka runs from Maven Central's jars on Java (scripts/backends.py, fetch_kafka): java, and mvn
# unless the jars are fetched already. CI turns this skip into a failure too.
requires_kafka = pytest.mark.skipif(
    shutil.which("java") is None or (shutil.which("mvn") is None and not backends.kafka_libs_dir().is_dir()),
    reason="java (and mvn, to fetch Kafka's jars) not installed: Kafka cannot run",
)
# OpenSearch runs from Maven Central's jars too (fetch_opensearch); same rule.
requires_opensearch = pytest.mark.skipif(
    shutil.which("java") is None or (shutil.which("mvn") is None and not backends.opensearch_home().is_dir()),
    reason="java (and mvn, to fetch OpenSearch's jars) not installed: OpenSearch cannot run",
)
PACED_MODES = Path(__file__).parent / "programs" / "paced_modes.py"
# The library's loss report, one line per interval (never one per span).
LOSS_LINE = re.compile(r"otel_stepspan: lost (\d+) step spans")
# How long `run --fleet` may take to print its endpoints (start_run).
START_TIMEOUT_S = 300


def engine_env(endpoint: str, service: str, **extra: str) -> dict[str, str]:
    """The machine's environment without its OTEL_* variables, plus the engine's."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env.update({
        "OTEL_SERVICE_NAME": service,
        "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
        "OTEL_BSP_SCHEDULE_DELAY": "200",
        "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
    })
    env.update(extra)
    return env


@dataclass
class EngineRun:
    """One run of tests/programs/paced_modes.py, and what it reported."""

    service: str
    process: subprocess.Popen
    started_ns: int
    summary: dict = field(default_factory=dict)
    stderr: str = ""

    @classmethod
    def start(cls, endpoint: str, service: str, seconds: float, rate: float, **env: str) -> "EngineRun":
        started_ns = time.time_ns()
        process = subprocess.Popen(
            [sys.executable, str(PACED_MODES), str(seconds), str(rate)],
            env=engine_env(endpoint, service, **env),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        run = cls(service, process, started_ns)
        line = process.stdout.readline()
        if line.strip() != "ready":
            process.kill()
            raise AssertionError(f"{service}: the engine did not start: {line}{process.stderr.read()}")
        return run

    def finish(self, timeout_s: float = 120) -> "EngineRun":
        """Wait for the end of the run (a hang fails here) and read its report."""
        out, self.stderr = self.process.communicate(timeout=timeout_s)
        assert self.process.returncode == 0, f"{self.service}: exit {self.process.returncode}\n{self.stderr}"
        lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        self.summary = {k: v for line in lines for k, v in line.items()}
        return self

    @property
    def sent(self) -> Counter:
        return Counter(self.summary["sent"])

    @property
    def steps(self) -> int:
        return self.summary["steps"]

    @property
    def loss_lines(self) -> list[int]:
        return [int(n) for n in LOSS_LINE.findall(self.stderr)]

    @property
    def reported_lost(self) -> int:
        return sum(self.loss_lines)


@dataclass
class Stored:
    """The step spans Jaeger returns for one service."""

    by_mode: Counter
    pass_ids: Counter  # pass id -> how many spans carry it

    @property
    def unique(self) -> int:
        return len(self.pass_ids)

    @property
    def duplicates(self) -> int:
        return sum(self.pass_ids.values()) - len(self.pass_ids)

    def missing(self, steps: int) -> list[int]:
        return [i for i in range(1, steps + 1) if i not in self.pass_ids]


def stored(jaeger_url: str, service: str, since_ns: int, depth: int) -> Stored:
    docs = JaegerClient(jaeger_url, timeout_s=60).find_traces(
        service, since_ns - 10 * 10**9, time.time_ns() + 60 * 10**9, search_depth=depth
    )
    by_mode: Counter = Counter()
    pass_ids: Counter = Counter()
    for doc in docs:
        for resource_spans in doc.get("result", {}).get("resourceSpans", []):
            for scope_spans in resource_spans.get("scopeSpans", []):
                for span in scope_spans.get("spans", []):
                    attributes = {a["key"]: a["value"] for a in span.get("attributes", [])}
                    if "forward.mode" not in attributes:
                        continue
                    by_mode[attributes["forward.mode"]["stringValue"]] += 1
                    pass_ids[int(attributes["forward.pass_id"]["intValue"])] += 1
    return Stored(by_mode, pass_ids)


def wait_stored(jaeger_url: str, service: str, since_ns: int, expected: int, timeout_s: float = 90) -> Stored:
    """Jaeger's answer once it holds ``expected`` distinct steps, or the last answer after
    ``timeout_s`` (the caller's assertion then says what is missing). An error answer is asked
    again until then (OpenSearch answers 503 while a new day's index gets its shards), and
    raised after it."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            got = stored(jaeger_url, service, since_ns, expected + 1000)
        except JaegerError:
            if time.monotonic() > deadline:
                raise
        else:
            if got.unique >= expected or time.monotonic() > deadline:
                return got
        time.sleep(2.0)


def assert_all_stored(stack: backends.LocalBackends, run: EngineRun) -> None:
    """Every step ``run`` sent is in the Jaeger of ``stack`` once: none lost on the way, none
    twice, the count of each mode exact."""
    got = wait_stored(stack.jaeger_url, run.service, run.started_ns, run.steps)
    assert run.reported_lost == 0, run.stderr
    assert got.missing(run.steps) == [], f"{len(got.missing(run.steps))} of {run.steps} steps missing"
    assert got.by_mode == run.sent
    assert got.unique == run.steps
    refresh_every_copy(stack)


def refresh_every_copy(stack: backends.LocalBackends) -> None:
    """Make every copy of Jaeger's OpenSearch span indices show what one copy showed (nothing
    to do on Badger). Each copy of a shard refreshes on its own 1 s schedule, and Jaeger's
    searches may be answered by either copy: right after a search saw every step, the next
    one may reach a replica that has not refreshed yet and miss the newest trace (seen in
    CI: the CLI found 100 of 150 decode steps a moment after all 300 were seen)."""
    for url in getattr(stack, "opensearch_urls", []):  # the first node that answers
        try:
            shards = opensearch_request("POST", f"{url}/jaeger-span-*/_refresh", timeout_s=30)["_shards"]
        except urllib.error.URLError as exc:
            if isinstance(exc, urllib.error.HTTPError):
                raise
            continue  # a node down (a fault test): ask the next
        assert shards["failed"] == 0, shards  # a node down: its copies are not counted as failed
        return


def voter_names(state: dict) -> set[str]:
    """The names of the nodes in an OpenSearch cluster's last committed voting configuration,
    from its ``GET /_cluster/state/metadata,nodes``."""
    ids = set(state["metadata"]["cluster_coordination"]["last_committed_config"])
    return {node["name"] for node_id, node in state["nodes"].items() if node_id in ids}


def opensearch_request(method: str, url: str, body: dict | None = None, timeout_s: float = 60) -> Any:
    """One request to an OpenSearch node's REST API (a JSON body, if any), its JSON answer."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout_s) as response:
        return json.load(response)


def monitor_series(jaeger_url: str, service: str, metric: str = "calls",
                   **params: str) -> dict[str, list[list[float]]]:
    """What Jaeger's Monitor tab asks for its operations table, as the UI asks it:
    GET /api/metrics/<metric> (calls, latencies, errors) for the INTERNAL spans of ``service``,
    grouped by operation, over the last 10 minutes. Returns {operation: one list of point
    values per series of that operation}; series without an operation label (span_name)
    come back under ""."""
    query = {"service": service, "spanKind": "internal", "groupByOperation": "true",
             "endTs": str(time.time_ns() // 10**6), "lookback": str(10 * 60 * 1000),
             "step": str(60 * 1000), "ratePer": str(10 * 60 * 1000), **params}
    url = f"{jaeger_url}/api/metrics/{metric}?{urllib.parse.urlencode(query)}"
    with urllib.request.urlopen(url, timeout=30) as response:
        family = json.load(response)
    series: dict[str, list] = {}
    for metric_ in family.get("metrics", []):
        labels = {label["name"]: label["value"] for label in metric_["labels"]}
        assert labels.get("service_name") == service, labels
        series.setdefault(labels.get("operation", ""), []).append(
            [point["gaugeValue"]["doubleValue"] for point in metric_["metricPoints"]])
    return series


def prometheus_query(prometheus_url: str, query: str, label: str) -> dict[str, float]:
    """An instant PromQL query through Prometheus's own API: {value of ``label``: value}."""
    url = f"{prometheus_url}/api/v1/query?{urllib.parse.urlencode({'query': query})}"
    with urllib.request.urlopen(url, timeout=30) as response:
        body = json.load(response)
    assert body["status"] == "success", body
    return {r["metric"].get(label, ""): float(r["value"][1]) for r in body["data"]["result"]}


def poll(fetch, done, timeout_s: float, every_s: float):
    """fetch() every ``every_s`` until done(answer) or ``timeout_s`` passed; the last answer
    either way (the caller's assertion then says what was missing)."""
    deadline = time.monotonic() + timeout_s
    while True:
        answer = fetch()
        if done(answer) or time.monotonic() > deadline:
            return answer
        time.sleep(every_s)


def start_run(workdir: Path, ports: list[int], *flags: str) -> tuple[subprocess.Popen, str]:
    """`backends.py run --fleet FLAGS` (--kafka, --opensearch) with every fixed port given
    (``ports``: OTLP gRPC, OTLP HTTP, health, Jaeger UI, Prometheus, then with --kafka the
    broker and the controller), every window kept, until it printed its endpoints: (the
    process, what it printed). Its stderr goes to workdir/run.stderr."""
    grpc, http, health, jaeger_ui, prometheus, *kafka = ports
    argv = [sys.executable, str(backends.REPO_ROOT / "scripts" / "backends.py"), "run", "--fleet", *flags,
            "--data-dir", str(workdir), "--otlp-grpc-port", str(grpc), "--otlp-http-port", str(http),
            "--health-port", str(health), "--jaeger-ui-port", str(jaeger_ui), "--prometheus-port", str(prometheus),
            *(["--kafka-port", str(kafka[0]), "--kafka-controller-port", str(kafka[1])] if kafka else [])]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("STEPSPAN_", "OTEL_"))}
    env.update(STEPSPAN_KEEP_PERCENT="100", STEPSPAN_DECISION_WAIT="5s")
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=open(workdir / "run.stderr", "a"),
                            stdin=subprocess.DEVNULL, text=True, env=env, cwd=backends.REPO_ROOT)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    printed: list[str] = []
    # OpenSearch alone took 85 s to turn green on 2 cores at load 40: a bound for a hang, not a speed.
    deadline = time.monotonic() + START_TIMEOUT_S
    while not (printed and printed[-1].startswith("data, logs")):
        try:
            printed.append(lines.get(timeout=1.0))
        except queue.Empty:
            if proc.poll() is None and time.monotonic() < deadline:
                continue
            sigterm(proc)  # `run` stops what it started so far (a SIGKILL would leave it running)
            raise AssertionError(f"run --fleet {' '.join(flags)} printed no endpoints (exit {proc.returncode}) "
                                 f"{printed}\n{(workdir / 'run.stderr').read_text()[-3000:]}") from None
    return proc, "".join(printed)


def sigterm(proc: subprocess.Popen) -> int:
    """SIGTERM, then `run`'s exit status (killed, and the test failed, after 60 s)."""
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise


def cleaner_cutoffs(log: str) -> list[str]:
    """The cutoffs Jaeger's es-index-cleaner logged, one per run ("Indices before this date will
    be deleted"), from its JSON lines among others."""
    return [record["date"] for record in map(json.loads, re.findall(r"^\{.*\}$", log, re.M))
            if record.get("msg") == "Indices before this date will be deleted"]


def expected_cutoff(days: int) -> str:
    """00:00 UTC of the day ``days - 1`` days back: what the cleaner keeping ``days`` keeps from."""
    today = datetime.now(timezone.utc).replace(hour=0, minute=0, second=0, microsecond=0)
    return (today - timedelta(days=days - 1)).strftime("%Y-%m-%dT%H:%M:%SZ")
