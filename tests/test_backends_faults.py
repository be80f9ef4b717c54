"""Faults on the real backends: the project's Collector (collector/config.yaml: queue on disk,
endless retries, memory_limiter first) and Jaeger (jaeger/config.yaml: Badger), both the Go-built
releases that docker-compose.yml pins, broken while an engine stand-in
(tests/programs/paced_modes.py, configured only by OTEL_* variables) sends steps through them.
Jaeger is the judge: every step is counted there by forward.mode and pass id.

1. Jaeger SIGKILLed for 30 s mid-run, then restarted: no step missing.
2. Jaeger restarted after that run: every step still there.
3. The Collector SIGTERMed mid-run while spans wait in its queue for a stopped (SIGSTOP) Jaeger,
   restarted at once: no step missing.
4. The Collector down at engine start and for 20 s: steps never wait on it; what is lost is
   exactly what the engine reported lost.
5. A flood from several processes far beyond the memory limit: the Collector refuses, keeps its
   RSS under the limit and keeps serving; the engine's steps cost what they cost before.
6. The secured variant (TLS + bearer token): the right token arrives; a wrong token, no token and
   plain text are refused, counted by the engine, and nothing hangs.

Scenarios 1-4 and 6 each get their own Collector and Jaeger and run at the same time (their
outages overlap in time, not in processes); 5 runs alone, since it loads the machine. Every
scenario prints its figures (sent, received, lost, outage, longest step) to the terminal.
"""

from __future__ import annotations

import concurrent.futures
import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import backends  # noqa: E402
from backends_support import EngineRun, requires_go, stored, wait_stored  # noqa: E402

pytestmark = [pytest.mark.backends, requires_go]

RATE = 100.0  # steps per second, every scenario
JAEGER_OUTAGE_S = 30.0
COLLECTOR_OUTAGE_S = 20.0
# A step that waited on the network would take at least the SDK's first retry back-off (1 s);
# this bound tells "never waits" from "waits", it is not a speed goal. (The first step of a
# process sets up the export and is reported apart.)
BLOCKED_STEP_MS = 1000.0


def _figures(name: str, run: EngineRun, got, *, outage_s: float | None, note: str = "") -> dict:
    return {
        "scenario": name,
        "sent": run.steps,
        "received": got.unique if got is not None else 0,
        "duplicates": got.duplicates if got is not None else 0,
        "reported_lost": run.reported_lost,
        "loss_lines": len(run.loss_lines),
        "outage_s": outage_s,
        "first_step_ms": run.summary["first_step_ms"],
        "exit_s": run.summary["exit_s"],
        "max_step_ms": run.summary["max_step_ms"],
        "p99_step_ms": run.summary["p99_step_ms"],
        "note": note,
    }


# --------------------------------------------------------------------------- scenarios


def jaeger_killed_then_restarted(workdir: Path) -> dict:
    """1 and 2: SIGKILL Jaeger 10 s into a 50 s run, start it again 30 s later; after the run,
    wait until every step is in Jaeger, then restart Jaeger (SIGTERM) and count again."""
    with backends.LocalBackends(workdir) as stack:
        run = EngineRun.start(stack.otlp_grpc_endpoint, "fault-jaeger-kill", 50, RATE)
        time.sleep(10)
        backends.kill(stack.jaeger)
        killed_at = time.monotonic()
        time.sleep(JAEGER_OUTAGE_S)
        stack.start_jaeger()
        outage = time.monotonic() - killed_at
        run.finish()
        during = wait_stored(stack.jaeger_url, run.service, run.started_ns, run.steps, timeout_s=120)
        backends.stop(stack.jaeger)
        stack.start_jaeger()
        after_restart = stored(stack.jaeger_url, run.service, run.started_ns, run.steps + 1000)
    return {
        "run": run,
        "during": during,
        "after_restart": after_restart,
        "figures": [
            _figures("1 Jaeger SIGKILL mid-run", run, during, outage_s=outage),
            _figures("2 Jaeger restarted after the run", run, after_restart, outage_s=None),
        ],
    }


def _queue_size(stack: backends.LocalBackends) -> float:
    """The collector's own gauge of requests waiting in the Jaeger exporter's queue."""
    import urllib.request

    with urllib.request.urlopen(stack.internal_metrics_url, timeout=5) as response:
        text = response.read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("otelcol_exporter_queue_size") and "jaeger" in line
    )


def collector_stopped_with_queue(workdir: Path) -> dict:
    """3: Jaeger stopped (SIGSTOP: connections hang, exports time out) 5 s into a 40 s run;
    10 s later, with spans queued, the collector gets SIGTERM and is started again at once;
    Jaeger resumes 5 s after that. (The collector's graceful shutdown waits for the exports in
    flight to the hung Jaeger, up to the exporter's timeout: the restart takes several seconds,
    which the engine's side rides out.)"""
    with backends.LocalBackends(workdir) as stack:
        run = EngineRun.start(stack.otlp_grpc_endpoint, "fault-collector-term", 40, RATE)
        time.sleep(5)
        stack.jaeger.send_signal(signal.SIGSTOP)
        time.sleep(10)
        queued = _queue_size(stack)
        stopped_at = time.monotonic()
        backends.stop(stack.collector, timeout=30)
        stack.start_collector()
        outage = time.monotonic() - stopped_at
        time.sleep(5)
        stack.jaeger.send_signal(signal.SIGCONT)
        run.finish()
        got = wait_stored(stack.jaeger_url, run.service, run.started_ns, run.steps, timeout_s=120)
    return {
        "run": run,
        "got": got,
        "queued": queued,
        "figures": [_figures("3 Collector SIGTERM, spans queued", run, got, outage_s=outage,
                             note=f"{queued:.0f} requests queued at SIGTERM")],
    }


def collector_down_at_start(workdir: Path) -> dict:
    """4: the engine starts with no collector; the collector comes up 20 s later."""
    stack = backends.LocalBackends(workdir)
    stack.start_jaeger()
    try:
        run = EngineRun.start(stack.otlp_grpc_endpoint, "fault-collector-down", 40, RATE)
        time.sleep(COLLECTOR_OUTAGE_S)
        stack.start_collector()
        outage = (time.time_ns() - run.started_ns) / 1e9
        run.finish()
        got = wait_stored(stack.jaeger_url, run.service, run.started_ns, run.steps - run.reported_lost)
        # nothing more arrives later
        time.sleep(3)
        got = stored(stack.jaeger_url, run.service, run.started_ns, run.steps + 1000)
    finally:
        stack.close()
    return {"run": run, "got": got,
            "figures": [_figures("4 Collector down at start", run, got, outage_s=outage)]}


SECURED_CASES = {
    # name: (scheme, protocol, token: "right" | "wrong" | None)
    "grpc, right token": ("https", "grpc", "right"),
    "http, right token": ("https", "http/protobuf", "right"),
    "grpc, wrong token": ("https", "grpc", "wrong"),
    "http, no token": ("https", "http/protobuf", None),
    "grpc, plain text to the TLS port": ("http", "grpc", "right"),
}


def secured_variant(workdir: Path) -> dict:
    """6: every case at once against one secured stack, 5 s of steps each."""
    with backends.LocalBackends(workdir, secured=True) as stack:
        token = stack.secrets["token"].read_text().strip()
        runs = {}
        for i, (case, (scheme, protocol, which)) in enumerate(SECURED_CASES.items()):
            port = stack.otlp_grpc if protocol == "grpc" else stack.otlp_http
            env = {"OTEL_EXPORTER_OTLP_PROTOCOL": protocol,
                   "OTEL_EXPORTER_OTLP_CERTIFICATE": str(stack.secrets["ca.crt"])}
            if which is not None:
                env["OTEL_EXPORTER_OTLP_HEADERS"] = "authorization=Bearer%20" + (
                    token if which == "right" else "not-" + token)
            runs[case] = EngineRun.start(f"{scheme}://127.0.0.1:{port}", f"fault-secured-{i}", 5, 50, **env)
        started = time.monotonic()
        for run in runs.values():
            run.finish(timeout_s=90)
        waited = time.monotonic() - started
        got = {}
        for case, run in runs.items():
            if SECURED_CASES[case][2] == "right" and SECURED_CASES[case][0] == "https":
                got[case] = wait_stored(stack.jaeger_url, run.service, run.started_ns, run.steps)
            else:
                time.sleep(1)
                got[case] = stored(stack.jaeger_url, run.service, run.started_ns, run.steps + 1000)
    return {"runs": runs, "got": got, "waited_s": waited,
            "figures": [_figures(f"6 secured: {case}", runs[case], got[case], outage_s=None) for case in runs]}


# --------------------------------------------------------------------------- running them


def _report(request, figures: list[dict]) -> None:
    reporter = request.config.pluginmanager.getplugin("terminalreporter")
    header = (f"{'scenario':44} {'sent':>6} {'received':>8} {'dup':>4} {'lost*':>6} {'lines':>5} "
              f"{'outage s':>8} {'1st step ms':>11} {'max step ms':>11} {'p99 step ms':>11} {'exit s':>6}  note")
    lines = [header, "-" * len(header)]
    for f in figures:
        outage = f"{f['outage_s']:.1f}" if f["outage_s"] is not None else "-"
        lines.append(f"{f['scenario']:44} {f['sent']:>6} {f['received']:>8} {f['duplicates']:>4} "
                     f"{f['reported_lost']:>6} {f['loss_lines']:>5} {outage:>8} {f['first_step_ms']:>11.1f} "
                     f"{f['max_step_ms']:>11.3f} {f['p99_step_ms']:>11.3f} {f['exit_s']:>6.1f}  {f['note']}")
    lines.append("* lost: what the engine's stderr loss lines add up to; lines: how many such lines; "
                 "1st step: the first traced step, which sets up the export; max, p99: the other steps; "
                 "exit: how long the engine took to exit after its last step (the library's exit flush)")
    capture = request.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled():
        for line in ["", *lines]:
            reporter.write_line(line)


@pytest.fixture(scope="module")
def binaries():
    return backends.ensure_built()


@pytest.fixture(scope="module")
def concurrent_faults(request, tmp_path_factory, binaries):
    """Scenarios 1-4 and 6, side by side, each on its own Collector and Jaeger."""
    scenarios = {
        "jaeger_kill": jaeger_killed_then_restarted,
        "collector_term": collector_stopped_with_queue,
        "collector_down": collector_down_at_start,
        "secured": secured_variant,
    }
    with concurrent.futures.ThreadPoolExecutor(len(scenarios)) as pool:
        futures = {name: pool.submit(fn, tmp_path_factory.mktemp(name)) for name, fn in scenarios.items()}
        results = {}
        for name, future in futures.items():
            try:
                results[name] = future.result()
            except Exception as error:  # each test reports its own scenario's failure
                results[name] = error
    _report(request, [f for r in results.values() if isinstance(r, dict) for f in r["figures"]])
    return results


def _result(results: dict, name: str) -> dict:
    result = results[name]
    if isinstance(result, Exception):
        raise result
    return result


def test_jaeger_killed_for_30s_mid_run_loses_no_step(concurrent_faults):
    r = _result(concurrent_faults, "jaeger_kill")
    run, got = r["run"], r["during"]
    assert run.steps >= 1000
    assert got.missing(run.steps) == []
    assert got.by_mode.keys() == run.sent.keys() and all(got.by_mode[m] >= run.sent[m] for m in run.sent)
    assert run.loss_lines == []


def test_jaeger_restarted_after_the_run_still_has_every_step(concurrent_faults):
    r = _result(concurrent_faults, "jaeger_kill")
    run = r["run"]
    assert r["after_restart"].missing(run.steps) == []
    assert r["after_restart"].pass_ids == r["during"].pass_ids


def test_collector_sigterm_with_queued_spans_loses_no_step(concurrent_faults):
    r = _result(concurrent_faults, "collector_term")
    run, got = r["run"], r["got"]
    assert r["queued"] > 0, "nothing was waiting in the collector's queue at SIGTERM"
    assert got.missing(run.steps) == []
    assert run.loss_lines == []


def test_collector_down_at_start_costs_exactly_what_the_engine_reports(concurrent_faults):
    r = _result(concurrent_faults, "collector_down")
    run, got = r["run"], r["got"]
    assert run.summary["max_step_ms"] < BLOCKED_STEP_MS  # no step waited for the collector
    assert got.duplicates == 0
    # Every step is either in Jaeger or in the engine's loss report, never both, never neither.
    assert got.unique + run.reported_lost == run.steps
    # Reported in one line per interval, not per span.
    assert len(run.loss_lines) <= 4 and (run.reported_lost == 0 or len(run.loss_lines) >= 1)
    assert got.unique > 0


@pytest.mark.parametrize("case", list(SECURED_CASES))
def test_secured_collector_takes_the_right_token_and_refuses_the_rest(concurrent_faults, case):
    r = _result(concurrent_faults, "secured")
    run, got = r["runs"][case], r["got"][case]
    scheme, _, token = SECURED_CASES[case]
    if scheme == "https" and token == "right":
        assert got.missing(run.steps) == []
        assert run.loss_lines == []
    else:
        assert got.unique == 0  # refused: nothing reached Jaeger
        assert run.reported_lost == run.steps  # ... and every step counted as lost
        assert 1 <= len(run.loss_lines) <= 2  # in a line, not per span
    assert run.summary["max_step_ms"] < BLOCKED_STEP_MS


# --------------------------------------------------------------------------- 5: the flood

FLOOD_SECONDS = 20
FLOOD_PROCESSES = 4


def _compose_memory() -> tuple[int, dict[str, str]]:
    """The memory docker-compose.yml gives the collector (MiB), and the variables that size
    its Go runtime and memory_limiter below that: the flood runs the collector with those."""
    import yaml

    service = yaml.safe_load(backends.COMPOSE_FILE.read_text())["services"]["otel-collector"]
    limit = service["mem_limit"]
    assert limit.endswith("m"), limit
    return int(limit[:-1]), {k: str(v) for k, v in service["environment"].items()}


def _memory_mib(pid: int) -> dict[str, float]:
    """VmRSS, and its parts: RssAnon (the process's own memory, what the OOM killer weighs) and
    RssFile (mapped files: the queue's database, as page cache the kernel can reclaim)."""
    with open(f"/proc/{pid}/status") as fh:
        return {line.split(":")[0]: int(line.split()[1]) / 1024 for line in fh
                if line.startswith(("VmRSS:", "RssAnon:", "RssFile:"))}


def test_flood_is_refused_under_the_memory_limit_and_the_engine_keeps_its_step_cost(request, tmp_path, binaries):
    limit_mib, env = _compose_memory()
    with backends.LocalBackends(tmp_path, collector_env=env) as stack:
        quiet = EngineRun.start(stack.otlp_grpc_endpoint, "flood-engine-quiet", 10, RATE).finish()
        peak = {"VmRSS": 0.0, "RssAnon": 0.0, "RssFile": 0.0}
        sampling = threading.Event()

        def sample() -> None:
            while not sampling.is_set() and stack.collector.poll() is None:
                for key, value in _memory_mib(stack.collector.pid).items():
                    peak[key] = max(peak[key], value)
                time.sleep(0.05)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        floods = [
            subprocess.Popen(
                [sys.executable, str(Path(__file__).parent / "programs" / "otlp_flood.py"),
                 f"127.0.0.1:{stack.otlp_grpc}", str(FLOOD_SECONDS)],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(FLOOD_PROCESSES)
        ]
        loaded = EngineRun.start(stack.otlp_grpc_endpoint, "flood-engine", FLOOD_SECONDS, RATE)
        outcomes = [f.communicate(timeout=FLOOD_SECONDS + 120) for f in floods]
        loaded.finish()
        sampling.set()
        sampler.join()
        alive = stack.collector.poll() is None
        backends.wait_http_ok(f"http://127.0.0.1:{stack.health}/", timeout=30)
        after = EngineRun.start(stack.otlp_grpc_endpoint, "flood-engine-after", 3, RATE).finish()
        got_after = wait_stored(stack.jaeger_url, after.service, after.started_ns, after.steps)
        got_loaded = wait_stored(stack.jaeger_url, loaded.service, loaded.started_ns,
                                 loaded.steps - loaded.reported_lost)
    totals = {"ok": 0, "refused": 0, "other": 0, "bytes": 0}
    for flood, (out, err) in zip(floods, outcomes):
        assert flood.returncode == 0, err
        for key, value in json.loads(out.strip().splitlines()[-1]).items():
            totals[key] += value
    _report(request, [
        _figures("5 flood: engine before", quiet, None, outage_s=None),
        _figures("5 flood: engine during", loaded, got_loaded, outage_s=None,
                 note=f"{FLOOD_PROCESSES} floods: {totals['ok']} exports accepted, {totals['refused']} refused, "
                      f"{totals['other']} other errors, {totals['bytes'] / 2**20:.0f} MiB sent; collector "
                      f"RssAnon max {peak['RssAnon']:.0f} MiB (limit {limit_mib}), RSS max {peak['VmRSS']:.0f} "
                      f"MiB of which mapped queue file {peak['RssFile']:.0f}"),
        _figures("5 flood: engine after", after, got_after, outage_s=None),
    ])
    assert alive, "the collector died under the flood"
    assert totals["refused"] > 0, "the flood never reached the memory limit: it proves nothing"
    assert totals["other"] == 0
    assert peak["RssAnon"] < limit_mib
    assert got_after.missing(after.steps) == []  # it still serves
    assert loaded.summary["max_step_ms"] < BLOCKED_STEP_MS
    # What the refusals cost the engine is counted exactly, like any loss.
    assert got_loaded.unique + loaded.reported_lost == loaded.steps
