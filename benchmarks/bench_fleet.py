"""The fleet tier under load, on this machine: engines -> agent -> 2 gateways -> Kafka -> Jaeger
ingester -> a 2-node OpenSearch cluster (LocalFleet of scripts/backends.py, kafka and
opensearch on). Prints figures, judges nothing: the machine decides the figures.

Usage::

    .venv/bin/python benchmarks/bench_fleet.py --quick   # 2 levels x 30 s, ~8 min with the start and the drains
    .venv/bin/python benchmarks/bench_fleet.py           # 4 levels x 60 s, ~20 min or more (the drains grow with the rate)
    .venv/bin/python benchmarks/bench_fleet.py --levels 1,2,3 --seconds 45 --engines 24

The engines: ``--engines`` processes (16), each a paced loop calling a stand-in sglang
``ModelRunner.forward`` wrapped by ``sglang.traced_forward`` (what ``SGLangInstrumentor``
installs), configured only by ``OTEL_*`` variables, as a user's engine is. One rank in four
runs at 200 steps/s, the others at 20 (16 engines: 1,040 steps/s), times the level's factor.
Each level starts a fresh set of engines (service ``fleet-L<level>-r<rank>``), lets them run
``--seconds``, then waits until OpenSearch holds every step they sent or the count stops
moving (``--drain``). The gateways keep every window (``STEPSPAN_KEEP_PERCENT=100``), so every
span sent must be stored and can be counted.

Per level it reports:

* offered and stored spans/s (steps, and the ``timeline`` root span of each window), steps
  missing from OpenSearch at the end, and how long the backlog took to drain;
* refused: the agent's and gateways' own counters (otelcol_receiver_refused_spans,
  otelcol_exporter_send_failed_spans / enqueue_failed_spans, the tail sampler's traces dropped
  too early), plus the engines' own loss reports (``otel_stepspan: lost N step spans``);
* CPU seconds of each component over the level (utime + stime of its processes and their
  children, from /proc, sampled every second), spans per CPU-second of each tier, and each
  component's peak RSS;
* lag from a step's end to being searchable: two probe engines (rank 0 at 200 and rank 1 at
  20 steps/s, times the factor) are polled in OpenSearch every ``--poll`` seconds; a step first
  returned by a poll sent at T was searchable by T and not at the poll before, so its lag is T
  minus the step's end (start + duration of its span), to within the poll interval. Jaeger's
  query reads the same indices with no cache of its own, so what OpenSearch returns to a search,
  Jaeger's search returns.

At the end: OpenSearch's bytes per span (``_cat/indices``, primaries and with the replica, as
indexed and after a force merge) and Kafka's bytes per record and per span (the topic's log
files over its end offsets), and a sizing for 10^4, 10^5 and 10^6 spans/s from the highest
level with nothing refused, lost or missing (the arithmetic, and the figures of runs on this
machine, are in docs/scale.md).

Everything started is stopped at the end, also on Ctrl-C or SIGTERM. ``--keep`` keeps the work
folder (logs, data). ``--engine RATE SECONDS`` is the engine process itself (internal).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
FAST_RATE, SLOW_RATE = 200.0, 20.0
# The Collector's own counters that say a span was turned away or lost, by metric name (a
# `_total` suffix is accepted too).
REFUSED_METRICS = (
    "otelcol_receiver_refused_spans",
    "otelcol_exporter_send_failed_spans",
    "otelcol_exporter_enqueue_failed_spans",
    "otelcol_processor_tail_sampling_sampling_trace_dropped_too_early",
)
ACCEPTED_METRIC = "otelcol_receiver_accepted_spans"
LOSS_LINE = re.compile(r"otel_stepspan: lost (\d+) step spans")


# -- the engine process --------------------------------------------------------------------------


def engine(rate: float, seconds: float) -> None:
    """Paced sglang-shaped steps through the wrapper SGLangInstrumentor installs. Prints 'ready'
    after the first step (the export is set up then), waits for a line on stdin, runs, flushes,
    prints one JSON line."""
    import enum

    import otel_stepspan
    from otel_stepspan.integrations import sglang

    class ForwardMode(enum.IntEnum):  # sglang's member names: the integration reads the name
        EXTEND = 1
        DECODE = 2
        MIXED = 3
        IDLE = 4

    class Batch:  # the fields of sglang's ForwardBatch the step span reads
        def __init__(self, mode: ForwardMode, bs: int, lens: "list[int] | None" = None) -> None:
            self.forward_mode, self.batch_size = mode, bs
            self.extend_seq_lens_cpu, self.extend_num_tokens = lens, (sum(lens) if lens else None)
            self.spec_info = None

    class Runner:
        forward_pass_id = 0

        def forward(self, forward_batch: Batch, pp_proxy_tensors: object = None) -> Batch:
            self.forward_pass_id += 1  # sglang's first statement in forward
            return forward_batch

    Runner.forward = sglang.traced_forward(Runner.forward)
    runner = Runner()
    mixed = Batch(ForwardMode.MIXED, 64, [256] * 8 + [1] * 56)
    sglang.mark_decode_rows(mixed, 56)
    cycle = [Batch(ForwardMode.DECODE, 32 + 2 * i) for i in range(16)]
    cycle += [Batch(ForwardMode.EXTEND, 4, [512] * 4), mixed, Batch(ForwardMode.IDLE, 0)]
    runner.forward(cycle[0])
    print("ready", flush=True)
    sys.stdin.readline()
    total = int(rate * seconds)
    t0 = time.monotonic()
    done = 1
    while done < total:
        due = min(total, int((time.monotonic() - t0) * rate) + 1)
        while done < due:
            runner.forward(cycle[done % len(cycle)])
            done += 1
        wait = t0 + done / rate - time.monotonic()
        if wait > 0:
            time.sleep(wait)
    elapsed = time.monotonic() - t0
    flushed = otel_stepspan.flush(120.0)
    print(json.dumps({"steps": done, "seconds": elapsed, "flushed": flushed, "stats": otel_stepspan.stats()}),
          flush=True)


# -- /proc: CPU and RSS of each component --------------------------------------------------------


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def proc_table() -> dict[int, tuple[int, float, int]]:
    """{pid: (parent pid, CPU seconds, RSS bytes)} for every process now. The CPU is the
    process's own (utime + stime): its children are sampled as processes of their own, and
    adding the children's CPU a parent has waited for would count them twice."""
    table = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # after the command: state(0) ppid(1) ... utime(11) stime(12) ... rss in pages(21)
        cpu = (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
        table[int(name)] = (int(fields[1]), cpu, int(fields[21]) * PAGE)
    return table


def tree(root: int, table: dict[int, tuple[int, float, int]]) -> list[int]:
    """``root`` and every descendant of it in ``table``."""
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        if pid in table:
            out.append(pid)
            todo.extend(children.get(pid, []))
    return out


@dataclass
class Usage:
    """What the sampler saw of one component: the CPU seconds each of its processes had at the
    first and the last sample, and the largest RSS of the whole component."""

    first: dict[int, float] = field(default_factory=dict)
    last: dict[int, float] = field(default_factory=dict)
    peak_rss: int = 0

    @property
    def cpu_s(self) -> float:
        return sum(cpu - self.first.get(pid, 0.0) for pid, cpu in self.last.items())


class Sampler:
    """Samples the process trees of named components every second, in a thread. Processes that
    appear after the start (engines, their exporter processes) count from 0 CPU seconds."""

    def __init__(self, roots: "dict[str, list[int]]") -> None:
        self.roots = roots
        self.usage = {name: Usage() for name in roots}
        self.started = False
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def sample(self) -> None:
        table = proc_table()
        for name, roots in self.roots.items():
            usage = self.usage[name]
            pids = [pid for root in roots for pid in tree(root, table)]
            for pid in pids:
                usage.last[pid] = table[pid][1]
                if not self.started:
                    usage.first[pid] = table[pid][1]
            usage.peak_rss = max(usage.peak_rss, sum(table[pid][2] for pid in pids))
        self.started = True

    def _loop(self) -> None:
        while not self.stopping.wait(1.0):
            self.sample()

    def __enter__(self) -> "Sampler":
        self.sample()
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        self.thread.join()
        self.sample()


# -- OpenSearch and the Collectors' own metrics --------------------------------------------------


def http_json(url: str, body: "dict | None" = None, method: str | None = None) -> dict | list:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method or ("POST" if data else "GET"),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.load(response)


def stored_counts(opensearch: str, services: list[str]) -> dict[str, int]:
    """{"steps": n, "timeline": n}: spans of ``services`` OpenSearch returns to a search now."""
    try:
        answer = http_json(f"{opensearch}/jaeger-span-*/_search", {
            "size": 0, "track_total_hits": True, "query": {"terms": {"process.serviceName": services}},
            "aggs": {"timeline": {"filter": {"term": {"operationName": "timeline"}}}}})
    except urllib.error.HTTPError as e:
        if e.code != 503:  # 503: the day's index is being made, no shard of it answers yet
            raise
        answer = {}
    if "aggregations" not in answer:  # no span index yet: nothing stored
        return {"steps": 0, "timeline": 0}
    total = answer["hits"]["total"]["value"]
    timeline = answer["aggregations"]["timeline"]["doc_count"]
    return {"steps": total - timeline, "timeline": timeline}


def collector_counters(urls: dict[str, str]) -> dict[str, dict[str, float]]:
    """{collector: {"refused": sum of REFUSED_METRICS, "accepted": spans its receivers took}}."""
    out = {}
    for name, url in urls.items():
        with urllib.request.urlopen(url, timeout=30) as response:
            text = response.read().decode()
        sums = {"refused": 0.0, "accepted": 0.0}
        for line in text.splitlines():
            if line.startswith("#") or not line.strip():
                continue
            metric = re.split(r"[{ ]", line, maxsplit=1)[0].removesuffix("_total")
            value = float(line.rsplit(" ", 1)[1])
            if metric in REFUSED_METRICS:
                sums["refused"] += value
            elif metric == ACCEPTED_METRIC:
                sums["accepted"] += value
        out[name] = sums
    return out


class LagProbe:
    """Polls OpenSearch for the step spans of ``services`` every ``every_s``: each span first
    returned by a poll is searchable from that poll on; its lag is the poll's send time minus
    the step's end. Only spans at or after the oldest step not seen yet are asked for (pass ids
    count up by one per step), so a poll returns the recent steps, not the whole run."""

    def __init__(self, opensearch: str, services: list[str], every_s: float) -> None:
        self.opensearch, self.every_s = opensearch, every_s
        self.lags: dict[str, list[float]] = {service: [] for service in services}
        self.seen: dict[str, set[int]] = {service: set() for service in services}
        self.floor_us: dict[str, int] = {service: 0 for service in services}
        self.stopping = threading.Event()
        self.errors = 0
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def poll(self, service: str) -> None:
        sent_at = time.time()
        answer = http_json(f"{self.opensearch}/jaeger-span-*/_search", {
            "size": 10000, "sort": [{"startTime": "asc"}], "_source": ["startTime", "duration", "tags"],
            "query": {"bool": {"filter": [{"term": {"process.serviceName": service}},
                                          {"range": {"startTime": {"gte": self.floor_us[service]}}}],
                               "must_not": [{"term": {"operationName": "timeline"}}]}}})
        seen = self.seen[service]
        start_of: dict[int, int] = {}
        for hit in answer["hits"]["hits"]:
            span = hit["_source"]
            pass_id = next((int(t["value"]) for t in span.get("tags", []) if t["key"] == "forward.pass_id"), None)
            if pass_id is None:
                continue
            start_of[pass_id] = span["startTime"]
            if pass_id not in seen:
                seen.add(pass_id)
                if pass_id == 1:  # the warm-up step, run before the engines were told to go
                    continue
                self.lags[service].append(sent_at - (span["startTime"] + span["duration"]) / 1e6)
        lowest_unseen = 1
        while lowest_unseen in seen:
            lowest_unseen += 1
        if lowest_unseen - 1 in start_of:
            self.floor_us[service] = start_of[lowest_unseen - 1]

    def _loop(self) -> None:
        while not self.stopping.wait(self.every_s):
            for service in self.lags:
                try:
                    self.poll(service)
                except (OSError, ValueError, KeyError):
                    self.errors += 1

    def __enter__(self) -> "LagProbe":
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        self.thread.join()


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# -- one level of offered rate -------------------------------------------------------------------


def engine_env(endpoint: str, service: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env.update({"OTEL_SERVICE_NAME": service, "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint, "PYTHONUNBUFFERED": "1",
                "PYTHONPATH": os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)})
    return env


def rates(engines: int, factor: float) -> list[float]:
    return [(FAST_RATE if rank % 4 == 0 else SLOW_RATE) * factor for rank in range(engines)]


@dataclass
class Level:
    factor: float
    offered_steps_s: float = 0.0
    seconds: float = 0.0
    wall_s: float = 0.0
    sent_steps: int = 0
    engine_lost: int = 0
    stored: dict = field(default_factory=dict)
    drain_s: float = 0.0
    refused: dict = field(default_factory=dict)
    accepted: dict = field(default_factory=dict)
    usage: dict = field(default_factory=dict)
    lags: dict = field(default_factory=dict)
    probe_errors: int = 0

    @property
    def missing(self) -> int:
        return self.sent_steps - self.stored.get("steps", 0)

    @property
    def stored_spans(self) -> int:
        return self.stored.get("steps", 0) + self.stored.get("timeline", 0)

    def spans_through(self, component: str) -> float:
        """The spans ``component`` handled: what its receivers accepted for the agent and each
        gateway (a gateway gets its share of the trace ids), every stored span for the rest (each
        OpenSearch node indexes every span, as primary or as replica)."""
        return self.accepted.get(component, self.stored_spans)


def start_engines(fleet, workdir: Path, level_name: str, engine_rates: list[float],
                  seconds: float) -> "list[tuple[str, subprocess.Popen]]":
    engines = []
    for rank, rate in enumerate(engine_rates):
        service = f"fleet-{level_name}-r{rank:02d}"
        proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--engine", str(rate), str(seconds)],
            env=engine_env(fleet.otlp_grpc_endpoint, service), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=open(workdir / f"{service}.stderr", "w"), text=True)
        engines.append((service, proc))
    for service, proc in engines:
        if proc.stdout.readline().strip() != "ready":
            raise RuntimeError(f"{service} did not start: see {workdir / (service + '.stderr')}")
    return engines


def run_level(fleet, workdir: Path, index: int, factor: float, args: argparse.Namespace,
              components: "dict[str, list[int]]") -> Level:
    level = Level(factor)
    name = f"L{index}"
    engine_rates = rates(args.engines, factor)
    level.offered_steps_s = sum(engine_rates)
    opensearch = fleet.opensearch_urls[0]
    engines = start_engines(fleet, workdir, name, engine_rates, args.seconds)
    services = [service for service, _ in engines]
    try:
        counters_before = collector_counters(fleet.own_metrics_urls)
        roots = {**components, "engines": [proc.pid for _, proc in engines]}
        with Sampler(roots) as sampler, LagProbe(opensearch, services[:2], args.poll) as probe:
            t0 = time.monotonic()
            for _, proc in engines:
                proc.stdin.write("go\n")
                proc.stdin.flush()
            reports = []
            for service, proc in engines:
                out, _ = proc.communicate(timeout=args.seconds + 300)
                lines = [line for line in out.splitlines() if line.startswith("{")]
                if proc.returncode != 0 or not lines:
                    raise RuntimeError(f"{service} failed (exit {proc.returncode}): see its .stderr in {workdir}")
                reports.append(json.loads(lines[-1]))
            level.wall_s = time.monotonic() - t0
            level.seconds = max(r["seconds"] for r in reports)  # the engines' pacing, without their start and flush
            level.sent_steps = sum(r["steps"] for r in reports)
            level.drain_s, level.stored = drain(opensearch, services, level.sent_steps, args.drain)
        level.usage = sampler.usage
        level.lags = {("fast" if i == 0 else "slow"): probe.lags[s] for i, s in enumerate(services[:2])}
        level.probe_errors = probe.errors
        counters_after = collector_counters(fleet.own_metrics_urls)
        level.refused = {k: counters_after[k]["refused"] - counters_before[k]["refused"] for k in counters_after}
        level.accepted = {k: counters_after[k]["accepted"] - counters_before[k]["accepted"] for k in counters_after}
        level.engine_lost = sum(int(n) for service in services
                                for n in LOSS_LINE.findall((workdir / f"{service}.stderr").read_text()))
    finally:
        for _, proc in engines:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return level


def drain(opensearch: str, services: list[str], expected_steps: int, patience_s: float) -> tuple[float, dict]:
    """Wait until OpenSearch holds ``expected_steps`` step spans of ``services`` or the count
    has not moved for ``patience_s``: (seconds waited, the last counts)."""
    t0 = last_change = time.monotonic()
    last = stored_counts(opensearch, services)
    while last["steps"] < expected_steps and time.monotonic() - last_change < patience_s:
        time.sleep(2.0)
        now = stored_counts(opensearch, services)
        if now != last:
            last, last_change = now, time.monotonic()
    return time.monotonic() - t0, last


# -- disk ----------------------------------------------------------------------------------------


def opensearch_disk(opensearch: str) -> dict[str, float]:
    """Docs and bytes of the span indices: as indexed, and after a force merge to one segment."""
    def measure() -> dict[str, float]:
        http_json(f"{opensearch}/jaeger-span-*/_refresh", method="POST")
        rows = http_json(f"{opensearch}/_cat/indices/jaeger-span-*?format=json&bytes=b")
        # _cat's docs.count counts Lucene documents, a span's nested tags and logs each one of
        # them; _count counts spans.
        return {"docs": http_json(f"{opensearch}/jaeger-span-*/_count")["count"],
                "lucene_docs": sum(int(r["docs.count"]) for r in rows),
                "primary_bytes": sum(int(r["pri.store.size"]) for r in rows),
                "total_bytes": sum(int(r["store.size"]) for r in rows)}

    indexed = measure()
    http_json(f"{opensearch}/jaeger-span-*/_forcemerge?max_num_segments=1", method="POST")
    merged = measure()
    return {**{f"indexed_{k}": v for k, v in indexed.items()}, **{f"merged_{k}": v for k, v in merged.items()}}


def kafka_disk(fleet) -> dict[str, float]:
    """The topic's log bytes and records (end offsets, what Kafka's own tool reports)."""
    sys.path.insert(0, str(REPO / "scripts"))
    import backends

    logs = [p for d in (fleet.workdir / "kafka_data").glob(f"{backends.KAFKA_TOPIC}-*") for p in d.glob("*.log")]
    offsets = backends.kafka_group_offsets(fleet.kafka_broker, libs=fleet.binaries["kafka"])
    return {"bytes": sum(p.stat().st_size for p in logs), "records": sum(end for _, end in offsets.values())}


# -- report --------------------------------------------------------------------------------------


TIERS = ("agent", "gateway-1", "gateway-2", "kafka", "jaeger", "os1", "os2", "os3", "engines", "prometheus+front")


def mib(n: float) -> str:
    return f"{n / 2**20:.0f}"


def report(levels: list[Level], disk_os: dict, disk_kafka: dict, stored_spans_total: int) -> None:
    import _common as C

    print("\n## Levels (offered rate stepped up)\n")
    rows = []
    for lv in levels:
        refused = sum(lv.refused.values())
        rows.append([f"x{lv.factor:g}", f"{lv.offered_steps_s:,.0f}", f"{lv.sent_steps / lv.seconds:,.0f}",
                     f"{lv.stored_spans / lv.seconds:,.0f}", f"{lv.sent_steps:,}", f"{lv.missing:,}",
                     f"{refused:,.0f}", f"{lv.engine_lost:,}", f"{lv.drain_s:.0f}",
                     f"{percentile(lv.lags['slow'] + lv.lags['fast'], 0.5):.1f}",
                     f"{percentile(lv.lags['slow'] + lv.lags['fast'], 0.99):.1f}",
                     f"{percentile(lv.lags['fast'], 0.5):.1f} / {percentile(lv.lags['fast'], 0.99):.1f}",
                     f"{percentile(lv.lags['slow'], 0.5):.1f} / {percentile(lv.lags['slow'], 0.99):.1f}"])
    print(C.table(["level", "offered steps/s", "sent steps/s", "stored spans/s (run)", "steps sent", "missing",
                   "refused (collectors)", "lost (engines)", "drain s", "lag p50 s", "lag p99 s",
                   "fast probe p50/p99 s", "slow probe p50/p99 s"], rows))
    print("\nstored spans/s (run) = spans of the level in OpenSearch after the drain (steps + one timeline "
          "span per window) / the engines' running time; drain s = how long after the engines stopped "
          "the last span arrived (or the count stopped moving).")
    print("\n## CPU seconds per component, per level (and spans per CPU-second)\n")
    rows = []
    for lv in levels:
        for tier in TIERS:
            usage = lv.usage.get(tier)
            if usage is None:
                continue
            cpu = usage.cpu_s
            window = lv.wall_s + lv.drain_s
            rows.append([f"x{lv.factor:g}", tier, f"{cpu:.1f}", f"{cpu / window:.2f}", f"{lv.spans_through(tier):,.0f}",
                         f"{lv.spans_through(tier) / cpu:,.0f}" if cpu > 0 else "-", mib(usage.peak_rss)])
    print(C.table(["level", "component", "CPU s", "cores (CPU s / (run + drain) s)", "spans handled", "spans per CPU-s",
                   "peak RSS MiB"], rows))
    print("\nspans per CPU-s = the spans the component handled (the agent and each gateway: what their "
          "receivers accepted; the others: every stored span, 100 % being kept) / its CPU seconds over the run "
          "and the drain. A lower bound on one core's capacity: "
          "everything shared 2 vCPUs with the rest, other users included.")
    print("\n## Refused, by collector and level\n")
    print(C.table(["level", *levels[0].refused.keys(), "accepted by the agent"],
                  [[f"x{lv.factor:g}", *(f"{v:,.0f}" for v in lv.refused.values()),
                    f"{lv.accepted.get('agent', 0):,.0f}"] for lv in levels]))
    print("\n## Disk\n")
    for stage in ("indexed", "merged"):
        docs = disk_os[f"{stage}_docs"]
        print(f"OpenSearch span indices, {stage}: {docs:,.0f} spans ({disk_os[f'{stage}_lucene_docs']:,.0f} Lucene docs), {disk_os[f'{stage}_primary_bytes'] / docs:,.0f} "
              f"B/span in the primaries, {disk_os[f'{stage}_total_bytes'] / docs:,.0f} B/span with the replica")
    records = max(1, disk_kafka["records"])
    print(f"Kafka topic: {disk_kafka['bytes']:,} B in {disk_kafka['records']:,} records: "
          f"{disk_kafka['bytes'] / records:,.0f} B/record, {stored_spans_total / records:,.0f} spans/record, "
          f"{disk_kafka['bytes'] / max(1, stored_spans_total):,.1f} B/span (lz4)")


# What the gateways keep at the default sampling, for the sizing below: the 10 % baseline share
# of windows, plus the slow and failed windows kept whole, assumed 1 % of all windows more.
DEFAULT_KEPT_SHARE = 0.11
# The tiers of the sizing and their components here: the spans a tier takes in per CPU-second
# are its components' spans in (each OpenSearch node indexes every span, as primary or replica:
# the cluster's spans in are the stored spans) over their CPU seconds added up.
SIZING_TIERS = {"agent": ("agent",), "gateways": ("gateway-1", "gateway-2"), "kafka": ("kafka",),
                "jaeger ingester": ("jaeger",), "opensearch (2 data nodes + a voter, 1 replica)": ("os1", "os2", "os3")}
BEFORE_SAMPLING = ("agent", "gateways")
SIZING_RATES = (10**4, 10**5, 10**6)


def sizing(levels: list[Level], disk_os: dict, disk_kafka_bytes_per_span: float) -> None:
    """Cores per tier for SIZING_RATES spans/s from the spans per CPU-second of the highest level
    at which nothing was refused, lost or missing; the tiers behind the gateways see only the
    DEFAULT_KEPT_SHARE; and the disk a day of kept spans takes."""
    import _common as C

    clean = [lv for lv in levels if lv.missing == 0 and sum(lv.refused.values()) == 0 and lv.engine_lost == 0]
    if not clean:
        print("\nno level without a refusal or a missing step: no sizing")
        return
    lv = max(clean, key=lambda lv: lv.offered_steps_s)
    print(f"\n## Sizing from level x{lv.factor:g} ({lv.stored_spans / lv.seconds:,.0f} spans/s stored, nothing "
          f"refused); behind the gateways {DEFAULT_KEPT_SHARE:.0%} of the spans (10 % baseline + 1 % slow/error)\n")
    rows = []
    for tier, components in SIZING_TIERS.items():
        spans_in = lv.stored_spans if tier not in BEFORE_SAMPLING else sum(lv.spans_through(c) for c in components)
        per_cpu_s = spans_in / sum(lv.usage[c].cpu_s for c in components)
        share = 1.0 if tier in BEFORE_SAMPLING else DEFAULT_KEPT_SHARE
        rows.append([tier, f"{per_cpu_s:,.0f}", f"{share:.2f}",
                     *(f"{rate * share / per_cpu_s:,.1f}" for rate in SIZING_RATES),
                     " + ".join(mib(lv.usage[c].peak_rss) for c in components)])
    print(C.table(["tier", "spans per CPU-s", "share it sees", *(f"cores at {r:.0e}/s" for r in SIZING_RATES),
                   "peak RSS MiB here"], rows))
    os_bytes = disk_os["merged_total_bytes"] / disk_os["merged_docs"]
    for rate in SIZING_RATES:
        kept_per_day = rate * DEFAULT_KEPT_SHARE * 86400
        print(f"{rate:.0e} spans/s: {kept_per_day:,.0f} spans kept a day; OpenSearch {kept_per_day * os_bytes / 1e9:,.1f} GB "
              f"(x {os_bytes:,.0f} B/span with the replica, merged); Kafka {kept_per_day * disk_kafka_bytes_per_span / 1e9:,.1f} GB "
              f"(x {disk_kafka_bytes_per_span:,.1f} B/span, 24 h retention)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="levels x0.5,x1 of 30 s each (about 8 min in all on 2 busy cores)")
    parser.add_argument("--levels", help="comma-separated factors on the base rates (default 0.5,1,2,4)")
    parser.add_argument("--seconds", type=float, help="how long the engines run per level (default 60; 30 quick)")
    parser.add_argument("--engines", type=int, default=16, help="engine processes per level (default 16)")
    parser.add_argument("--poll", type=float, default=1.0, help="seconds between lag probes (default 1)")
    parser.add_argument("--drain", type=float, default=40.0,
                        help="give up waiting for the backlog once the stored count has not moved this long (40 s)")
    parser.add_argument("--warmup", type=float, default=20.0,
                        help="seconds of a first, unreported level at x0.25: OpenSearch makes its indices and "
                             "Kafka its topic, the JVMs compile (default 20; 0: none)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (data and logs)")
    parser.add_argument("--engine", nargs=2, type=float, metavar=("RATE", "SECONDS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.engine:
        engine(*args.engine)
        return 0
    factors = [float(x) for x in (args.levels or ("0.5,1" if args.quick else "0.5,1,2,4")).split(",")]
    args.seconds = args.seconds or (30.0 if args.quick else 60.0)
    if args.engines < 2 or any(f <= 0 for f in factors) or args.seconds <= 0:
        parser.error("--engines must be at least 2 (two are the lag probes), the levels and --seconds positive")

    sys.path.insert(0, str(HERE))
    sys.path.insert(0, str(REPO / "scripts"))
    import _common as C
    import backends

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # runs the finally blocks below
    workdir = Path(tempfile.mkdtemp(prefix="bench_fleet_"))
    print(f"# bench_fleet: {args.engines} engines, levels {factors} x {args.seconds:g} s; {C.machine_line()}")
    print(f"base rates: {sum(rates(args.engines, 1)):,.0f} steps/s (one rank in four at {FAST_RATE:g}, the rest at "
          f"{SLOW_RATE:g}); work folder {workdir}; the machine is shared and noisy: other jobs ran beside this")
    fleet = backends.LocalFleet(workdir, kafka=True, opensearch=True, own_metrics=True,
                                collector_env={"STEPSPAN_KEEP_PERCENT": "100"})
    try:
        t0 = time.monotonic()
        fleet.start()
        print(f"fleet started in {time.monotonic() - t0:.0f} s", flush=True)
        components = {
            "agent": [fleet.agent.pid], "gateway-1": [fleet.gateways[0].pid], "gateway-2": [fleet.gateways[1].pid],
            "kafka": [fleet.kafka.pid], "jaeger": [fleet.jaeger.pid], "os1": [fleet.opensearch["os1"].pid],
            "os2": [fleet.opensearch["os2"].pid], "os3": [fleet.opensearch["os3"].pid], "prometheus+front": [fleet.prometheus.pid, fleet.front.pid]}
        stored_total = 0
        if args.warmup > 0:
            print(f"warm-up: x0.25 for {args.warmup:g} s, not reported ...", flush=True)
            stored_total += run_level(fleet, workdir, 0, 0.25, argparse.Namespace(**{**vars(args), "seconds": args.warmup}),
                                      components).stored_spans
        levels = []
        for index, factor in enumerate(factors, 1):
            print(f"level x{factor:g}: {sum(rates(args.engines, factor)):,.0f} steps/s offered ...", flush=True)
            levels.append(run_level(fleet, workdir, index, factor, args, components))
            lv = levels[-1]
            print(f"  sent {lv.sent_steps:,} steps in {lv.seconds:.0f} s, missing {lv.missing:,}, refused "
                  f"{sum(lv.refused.values()):,.0f}, engines lost {lv.engine_lost:,}, drain {lv.drain_s:.0f} s",
                  flush=True)
        disk_os = opensearch_disk(fleet.opensearch_urls[0])
        disk_kafka = kafka_disk(fleet)
        stored_total += sum(lv.stored_spans for lv in levels)
        report(levels, disk_os, disk_kafka, stored_total)
        sizing(levels, disk_os, disk_kafka["bytes"] / max(1, stored_total))
        print(f"\nload average at the end: {os.getloadavg()}")
    finally:
        fleet.close()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
