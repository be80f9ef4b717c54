"""The fleet tier for real (docs/scale.md): one agent (collector/agent.yaml) load-balancing by
trace id onto two gateways (collector/gateway.yaml: span_metrics on every span, then
tail_sampling), all three the fleet Collector built from collector/gateway-builder-config.yaml,
run with the project's configs (endpoints and queue directories rewritten for a local run,
nothing else; the tail-sampling policies and their defaults exactly as shipped).

Four engine stand-ins (tests/programs/fleet_steps.py, configured by OTEL_* variables only)
send paced steps of every mode to the agent in windows of 4 steps (OTEL_STEPSPAN_TIMELINE_STEPS),
with slow steps, failed steps, steps over the link limit and a request prefilled in two chunks,
decoded, then prefilled again (a recompute after a preemption) planted at known places. Each
gateway exports to its own OTLP receiver, so the test knows which gateway kept what; the
agent also copies everything it receives to a third receiver (a test-only overlay adds that
exporter), so the test knows every trace the gateways had to judge, with the spans' real
durations.

From those spans the test computes, with the thresholds, percentage and hash of the shipped
gateway.yaml, which traces the policies must keep, and checks:
  * every trace went to one gateway, and what a gateway kept of it is the whole trace;
  * the kept traces are exactly the computed ones: every window with a step slower than its
    mode's threshold, with a failed step, with dropped request links or with a recompute, every
    request trace, and of the rest exactly those whose trace-id hash falls in the configured
    share; the windows of the recomputed request's first prompt and decode are not kept for it;
  * that share of the rest is within 4 standard deviations of the configured percentage;
  * the span metrics of both gateways, summed, count every step sent, mode by mode, exactly.

Once the fleet Collector is built (the first build takes minutes: `python scripts/backends.py
build --fleet`), the module runs in about a minute. Skips only where Go is absent; CI
(OTEL_STEPSPAN_REQUIRE_BACKENDS=1) turns that skip into a failure.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import time
import urllib.request
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import pytest
import yaml

from otel_stepspan.testing.otlp_receiver import OtlpReceiver, ReceivedSpan

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))
import backends  # noqa: E402
from backends_support import LOSS_LINE, engine_env, requires_go  # noqa: E402

pytestmark = [pytest.mark.backends, requires_go]

FLEET_STEPS = Path(__file__).parent / "programs" / "fleet_steps.py"
PROCESSES = 4
STEPS = 1200  # per process
WINDOW = 4  # steps per timeline window: 300 windows per process
RATE = 400.0  # steps per second
SPACING = 20  # windows between two planted ones
LINK_LIMIT = 2  # OTEL_SPAN_LINK_COUNT_LIMIT: a step linking 3 requests drops one
STATUS_ERROR = 2  # Status.code in OTLP
#: collector/gateway.yaml's policies in order, each of which Policies.reason below follows: a
#: policy added to the file fails the test until the test computes what it keeps.
POLICY_NAMES = ["slow-step", "error", "request-links-dropped", "recompute", "recomputed-request",
                "not-a-step-window", "baseline"]
#: The planted request's name in the plan: prefilled in two chunks, decoded, then prefilled again.
RECOMPUTED = "recomputed"
SIGMAS = 4  # the share's tolerance: a correct gateway fails it about once in 16,000 runs


# --------------------------------------------------------------------------- the shipped policies


@dataclass(frozen=True)
class Policies:
    """What collector/gateway.yaml's tail_sampling keeps, read from the file itself."""

    slow_ms: dict  # forward.mode -> threshold in ms
    any_ms: int  # the threshold of every mode
    percent: float
    salt: str

    @classmethod
    def shipped(cls) -> "Policies":
        config = yaml.safe_load(backends.GATEWAY_CONFIG.read_text())
        policies = {p["name"]: p for p in config["processors"]["tail_sampling"]["policies"]}
        assert list(policies) == POLICY_NAMES, "a policy changed: make Policies.reason follow it"
        for name, key in (("request-links-dropped", "forward.request_links_dropped"),
                          ("recompute", "forward.recomputes"), ("recomputed-request", "request.recomputes")):
            assert policies[name]["numeric_attribute"] == {"key": key, "min_value": 1}, policies[name]
        slow_ms, any_ms = {}, None
        for condition in policies["slow-step"]["ottl_condition"]["span"]:
            m = re.search(r'forward\.mode"\] (==|!=) (nil|"(\w+)") and .* > \$\{env:\w+:-(\d+)\} \* 1000000$',
                          condition)
            assert m, f"unexpected slow-step condition: {condition}"
            if m.group(1) == "==":
                slow_ms[m.group(3)] = int(m.group(4))
            else:
                any_ms = int(m.group(4))
        probabilistic = policies["baseline"]["probabilistic"]
        percent = re.fullmatch(r"\$\{env:\w+:-([\d.]+)\}", str(probabilistic["sampling_percentage"]))
        assert any_ms and percent, policies
        # the tail_sampling processor's default salt (internal/sampling/probabilistic.go)
        return cls(slow_ms, any_ms, float(percent.group(1)), probabilistic.get("hash_salt") or "default-hash-seed")

    def hashed_in(self, trace_id: str) -> bool:
        """The probabilistic policy of tail_sampling v0.161.0: FNV-1a (64 bits) of the salt and
        the trace id's 16 bytes, kept when at most (2^64 - 1) * ratio. (Go rounds that product
        to 64 significant bits before truncating; it can differ from this one by 1, which a
        hash hits with probability 2^-63.)"""
        h = 0xCBF29CE484222325
        for byte in self.salt.encode() + bytes.fromhex(trace_id):
            h = ((h ^ byte) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
        return h <= math.floor((2**64 - 1) * Fraction(self.percent / 100))

    def slow(self, span: ReceivedSpan) -> bool:
        mode = span.attributes.get("forward.mode")
        if mode is None:
            return False
        ns = span.end_ns - span.start_ns
        return ns > self.any_ms * 1_000_000 or (mode in self.slow_ms and ns > self.slow_ms[mode] * 1_000_000)

    def reason(self, spans: list[ReceivedSpan]) -> str | None:
        """Why the policies keep this trace (None: they drop it), in the file's order."""
        steps = [s for s in spans if "forward.mode" in s.attributes]
        if not steps and not any(s.name == "timeline" for s in spans):
            return "not-a-step-window"
        if any(self.slow(s) for s in steps):
            return "slow-step"
        if any(s.status_code == STATUS_ERROR for s in spans):
            return "error"
        if any(s.attributes.get("forward.request_links_dropped", 0) >= 1 for s in spans):
            return "request-links-dropped"
        if any(s.attributes.get("forward.recomputes", 0) >= 1 for s in spans):
            return "recompute"
        if any(s.attributes.get("request.recomputes", 0) >= 1 for s in spans):
            return "recomputed-request"
        return "baseline" if self.hashed_in(spans[0].trace_id) else None


# --------------------------------------------------------------------------- the plan


def plan(policies: Policies) -> tuple[dict, dict]:
    """The steps each process plants, {pass id: spec}, and what each planted window is for,
    {window index: kind}; the same for every process. Slow steps are 2.5 times their mode's
    threshold (prefill: 2.5 times DECODE's, to be slow for a decode and not for a prefill). The
    recompute's request is prefilled in two chunks and decoded in the three windows before it,
    one step in each."""
    decode, idle, mixed, prefill = (policies.slow_ms[m] for m in ("decode", "idle", "mixed", "prefill"))
    assert 2.5 * decode < 0.5 * prefill, "the planted prefill must be slow for a decode only"
    kinds = [
        ("slow decode", {"mode": "decode", "sleep_ms": 2.5 * decode}),
        ("slow idle", {"mode": "idle", "sleep_ms": 2.5 * idle}),
        ("prefill under its threshold", {"mode": "prefill", "sleep_ms": 2.5 * decode}),
        ("failed", {"mode": "decode", "error": True}),
        ("links dropped", {"mode": "decode", "links": LINK_LIMIT + 1}),
        ("slow mixed", {"mode": "mixed", "sleep_ms": 1.5 * mixed}),
        ("slow decode", {"mode": "decode", "sleep_ms": 2.5 * decode}),
        ("prefill under its threshold", {"mode": "prefill", "sleep_ms": 2.5 * decode}),
        ("failed", {"mode": "decode", "error": True}),
        ("links dropped", {"mode": "decode", "links": LINK_LIMIT + 1}),
        ("slow decode", {"mode": "decode", "sleep_ms": 2.5 * decode}),
        ("prefill under its threshold", {"mode": "prefill", "sleep_ms": 2.5 * decode}),
        ("recompute", {"mode": "prefill", "request": RECOMPUTED, "work": "prefill"}),
    ]
    before_recompute = [  # in the windows before the recompute's: (kind, spec), nearest last
        ("first prompt chunk", {"mode": "prefill", "request": RECOMPUTED, "work": "prefill"}),
        ("second prompt chunk", {"mode": "prefill", "request": RECOMPUTED, "work": "prefill"}),
        ("decode before the preemption", {"mode": "decode", "request": RECOMPUTED, "work": "decode"}),
    ]
    assert len(kinds) * SPACING < STEPS // WINDOW
    plant, windows = {}, {}
    for slot, (kind, spec) in enumerate(kinds):
        window = SPACING * slot + SPACING // 2
        plant[window * WINDOW + slot % WINDOW + 1] = spec  # each position in a window in turn
        windows[window] = kind
        if kind == "recompute":
            for back, (earlier, earlier_spec) in enumerate(reversed(before_recompute), 1):
                plant[(window - back) * WINDOW + back % WINDOW + 1] = earlier_spec
                windows[window - back] = earlier
    return plant, windows


# --------------------------------------------------------------------------- the fleet


def _stop_all(procs) -> None:
    for proc in procs:
        backends.stop(proc, timeout=20)


@dataclass
class Fleet:
    tee: OtlpReceiver
    outs: list  # one OtlpReceiver per gateway: what it kept
    metrics_urls: list
    agent_endpoint: str
    procs: list = field(default_factory=list)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    """Two gateways, each exporting to its own receiver, and one agent in front of them."""
    binary = backends.ensure_built(("otelcol_gateway",))["otelcol_gateway"]
    workdir = tmp_path_factory.mktemp("fleet")
    receivers = [OtlpReceiver("grpc").start() for _ in range(3)]
    tee, outs = receivers[0], receivers[1:]
    fleet = Fleet(tee, outs, [], "")
    with pytest.MonkeyPatch.context() as env:
        for key in [k for k in os.environ if k.startswith("STEPSPAN_")]:
            env.delenv(key)  # the gateways run with the shipped defaults
        try:
            gateways = []
            for i, out in enumerate(outs):
                grpc, http, metrics, health = backends.free_ports(4)
                config = backends.write_local_collector_config(
                    backends.GATEWAY_CONFIG, workdir / f"gateway{i}.yaml", grpc, http, f"127.0.0.1:{out.port}",
                    metrics, health, queue_dir=workdir / f"gateway{i}_queue")
                fleet.procs.append(backends.start_collector(config, health, binary=binary,
                                                            other_ports=(grpc, http, metrics)))
                gateways.append(f"127.0.0.1:{grpc}")
                fleet.metrics_urls.append(f"http://127.0.0.1:{metrics}/metrics")
            grpc, http, health = backends.free_ports(3)
            config = backends.write_local_agent_config(
                backends.AGENT_CONFIG, workdir / "agent.yaml", grpc, http, gateways, health,
                queue_dir=workdir / "agent_queue")
            # Test only: the agent also copies what it receives to the tee.
            tee_overlay = workdir / "agent-tee.yaml"
            tee_overlay.write_text(
                f"exporters:\n  otlp_grpc/tee:\n    endpoint: 127.0.0.1:{tee.port}\n    tls:\n      insecure: true\n"
                "service:\n  pipelines:\n    traces:\n      exporters: [load_balancing, otlp_grpc/tee]\n")
            fleet.procs.append(backends.start_collector(config, health, binary=binary, extra_configs=(tee_overlay,),
                                                        other_ports=(grpc, http)))
            fleet.agent_endpoint = f"http://127.0.0.1:{grpc}"
            yield fleet
        finally:
            _stop_all(reversed(fleet.procs))
            for receiver in receivers:
                receiver.stop()


def _span_metrics(url: str, services: set[str]) -> Counter:
    """calls_total of the span metrics at one gateway, by forward_mode, for ``services``."""
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    calls: Counter = Counter()
    for line in text.splitlines():
        if not line.startswith("traces_span_metrics_calls_total{"):
            continue
        labels = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', line[: line.rindex("}")]))
        if labels.get("service_name") in services and "forward_mode" in labels:
            calls[labels["forward_mode"]] += int(float(line.rsplit(" ", 1)[1]))
    return calls


def _traces(spans: list[ReceivedSpan]) -> dict[str, list[ReceivedSpan]]:
    traces = defaultdict(list)
    for span in spans:
        traces[span.trace_id].append(span)
    return dict(traces)


@dataclass
class Outcome:
    policies: Policies
    windows: dict  # window index -> planted kind
    services: set
    sent: Counter  # steps by mode, all processes
    requests: dict  # request id -> trace id
    seen: dict  # trace id -> spans, every trace the agent received
    kept: list  # per gateway: trace id -> spans it exported
    metrics: list  # per gateway: calls by mode
    seconds: dict


@pytest.fixture(scope="module")
def outcome(fleet, tmp_path_factory) -> Outcome:
    t0 = time.monotonic()
    policies = Policies.shipped()
    plant, windows = plan(policies)
    plan_file = tmp_path_factory.mktemp("fleet_plan") / "plan.json"
    plan_file.write_text(json.dumps({"steps": STEPS, "rate": RATE, "plant": plant}))
    services = {f"fleet-{i}" for i in range(PROCESSES)}
    engines = [
        subprocess.Popen([sys.executable, str(FLEET_STEPS), str(plan_file)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True,
                         env=engine_env(fleet.agent_endpoint, service, OTEL_STEPSPAN_TIMELINE_STEPS=str(WINDOW),
                                        OTEL_SPAN_LINK_COUNT_LIMIT=str(LINK_LIMIT)))
        for service in sorted(services)
    ]
    sent: Counter = Counter()
    requests: dict = {}
    for engine in engines:
        out, err = engine.communicate(timeout=180)
        assert engine.returncode == 0, err
        assert not LOSS_LINE.search(err), err  # the engine lost nothing on its way to the agent
        report = json.loads(out.splitlines()[-1])
        sent.update(report["sent"])
        requests.update(report["requests"])
    engines_s = time.monotonic() - t0

    # Every span the agent received: each step, each window's root, each request report.
    fleet.tee.wait_for_steps(sum(sent.values()), timeout_s=60)
    fleet.tee.wait_until_quiet(2.0, timeout_s=60)
    seen = _traces([s for s in fleet.tee.spans() if s.resource.get("service.name") in services])

    # What the gateways keep: windows are decided 5 s after their root arrives, request traces
    # decision_wait (30 s) after their first span. Wait for every trace the policies keep,
    # whole, then a little more for any they should not have kept.
    expected = {tid: spans for tid, spans in seen.items() if policies.reason(spans)}
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        got = Counter(s.trace_id for out in fleet.outs for s in out.spans())
        if all(got[tid] >= len(spans) for tid, spans in expected.items()):
            break
        time.sleep(1.0)
    for out in fleet.outs:
        out.wait_until_quiet(3.0, timeout_s=30)
    kept = [_traces([s for s in out.spans() if s.resource.get("service.name") in services]) for out in fleet.outs]

    # The span metrics: flushed every 5 s; wait until they count every step (or stop moving).
    metrics: list = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        metrics = [_span_metrics(url, services) for url in fleet.metrics_urls]
        if sum(metrics, Counter()) == sent:
            break
        time.sleep(1.0)
    seconds = {"engines": round(engines_s, 1), "total": round(time.monotonic() - t0, 1)}
    result = Outcome(policies, windows, services, sent, requests, seen, kept, metrics, seconds)
    reasons = Counter(policies.reason(spans) for spans in seen.values())
    print(f"\nfleet: {sum(sent.values())} steps in {len(seen)} traces, "
          f"kept {sum(len(k) for k in kept)} ({', '.join(f'{r}: {n}' for r, n in reasons.items() if r)}); "
          f"per gateway {[len(k) for k in kept]}; {seconds}")
    return result


def _window_of(spans: list[ReceivedSpan]) -> set[tuple[str, int]]:
    """(service, window index) of a trace's steps: pass ids 1-4 are window 0, and so on."""
    return {(s.resource["service.name"], (s.attributes["forward.pass_id"] - 1) // WINDOW)
            for s in spans if "forward.mode" in s.attributes}


# --------------------------------------------------------------------------- the checks


def test_fleet_configs_validate():
    binary = backends.ensure_built(("otelcol_gateway",))["otelcol_gateway"]
    for config in (backends.AGENT_CONFIG, backends.GATEWAY_CONFIG):
        backends.validate_collector_config(config, binary=binary)


def test_the_agent_saw_every_step_in_whole_windows(outcome):
    steps = Counter(s.attributes["forward.mode"] for spans in outcome.seen.values() for s in spans
                    if "forward.mode" in s.attributes)
    assert steps == outcome.sent
    windows = [spans for spans in outcome.seen.values() if any(s.name == "timeline" for s in spans)]
    assert len(windows) == PROCESSES * math.ceil(STEPS / WINDOW)
    for spans in windows:
        assert len(_window_of(spans)) == 1  # one window's steps, and all of them
        root, = [s for s in spans if s.name == "timeline"]
        assert root.attributes["timeline.steps"] == len(spans) - 1


def test_no_trace_is_split_across_gateways_and_kept_traces_are_whole(outcome):
    first, second = (set(k) for k in outcome.kept)
    assert first and second, "both gateways kept traces"
    assert not first & second, f"traces at both gateways: {sorted(first & second)[:5]}"
    for kept in outcome.kept:
        for tid, spans in kept.items():
            assert sorted(s.span_id for s in spans) == sorted(s.span_id for s in outcome.seen[tid]), tid
    # both gateways judged a fair part of the steps (the agent balanced, not only routed)
    total = sum(outcome.sent.values())
    assert all(sum(m.values()) >= 0.2 * total for m in outcome.metrics), outcome.metrics


def test_gateways_keep_exactly_what_the_policies_say(outcome):
    kept = {tid for k in outcome.kept for tid in k}
    expected = {tid for tid, spans in outcome.seen.items() if outcome.policies.reason(spans)}
    assert kept == expected, {
        "kept, not expected": {t: _window_of(outcome.seen[t]) for t in sorted(kept - expected)[:10]},
        "expected, not kept": {t: outcome.policies.reason(outcome.seen[t]) for t in sorted(expected - kept)[:10]},
    }


def test_every_window_with_a_slow_step_a_failure_dropped_links_or_a_recompute_is_kept(outcome):
    kept = {tid for k in outcome.kept for tid in k}
    by_window = {w: tid for tid, spans in outcome.seen.items() for w in _window_of(spans)}
    must = {"slow decode": "slow-step", "slow idle": "slow-step", "slow mixed": "slow-step",
            "failed": "error", "links dropped": "request-links-dropped", "recompute": "recompute"}
    under = []
    for service in outcome.services:
        for window, kind in outcome.windows.items():
            tid = by_window[(service, window)]
            reason = outcome.policies.reason(outcome.seen[tid])
            if kind in must:
                assert reason == must[kind], (service, window, kind, reason)
                assert tid in kept, (service, window, kind)
            else:  # slow for a decode, not for a prefill, or before the recompute: only the share may keep it
                assert reason in ("baseline", None), (service, window, kind, reason)
                assert (tid in kept) == outcome.policies.hashed_in(tid)
                under.append(tid in kept)
    assert not all(under), "every prefill under its threshold kept: one threshold for all modes?"


def test_the_rest_is_kept_at_the_configured_share(outcome):
    policies = outcome.policies
    rest = [tid for tid, spans in outcome.seen.items() if policies.reason(spans) in ("baseline", None)]
    kept = [tid for tid in rest if any(tid in k for k in outcome.kept)]
    p = policies.percent / 100
    share = len(kept) / len(rest)
    tolerance = SIGMAS * math.sqrt(p * (1 - p) / len(rest))
    print(f"\nrest: {len(kept)} of {len(rest)} windows kept = {share:.2%} "
          f"(configured {p:.0%} +- {tolerance:.2%})")
    assert len(rest) > 1000
    assert abs(share - p) <= tolerance


def test_request_traces_are_kept(outcome):
    """Each request the engines linked gets its `request.steps` report in its own trace (the
    ones over the link limit too: docs/spans.md), and every such trace is kept."""
    carried = {rid for spans in outcome.seen.values() for s in spans
               for rid in s.attributes.get("forward.request_ids", ())}
    # two steps of LINK_LIMIT carried links each, and the recomputed request
    assert len(carried) == PROCESSES * (2 * LINK_LIMIT + 1)
    assert len(outcome.requests) == PROCESSES * (2 * (LINK_LIMIT + 1) + 1) and carried < set(outcome.requests)
    reports = {s.attributes["request.id"]: tid for tid, spans in outcome.seen.items()
               for s in spans if s.name == "request.steps"}
    assert reports == outcome.requests  # request id -> the trace id the engine gave it
    kept = {tid for k in outcome.kept for tid in k}
    assert set(reports.values()) <= kept


def test_the_recompute_is_counted_on_its_step_alone_and_in_the_requests_report(outcome):
    """The planted request: two prompt chunks (0 recomputes each: it has not decoded), a decode,
    then its prompt again after the preemption (1), each step in a window of its own; its
    report counts the same 1."""
    by_window = {w: spans for spans in outcome.seen.values() for w in _window_of(spans)}
    planted = {window: kind for window, kind in outcome.windows.items()
               if kind in ("first prompt chunk", "second prompt chunk", "decode before the preemption", "recompute")}
    assert sorted(planted.values()) == sorted(["first prompt chunk", "second prompt chunk",
                                               "decode before the preemption", "recompute"])
    reports = {s.attributes["request.id"]: s for spans in outcome.seen.values() for s in spans
               if s.name == "request.steps"}
    for service in sorted(outcome.services):
        request_id = f"{service}-{RECOMPUTED}"
        counted = {}
        for window, kind in planted.items():
            [step] = [s for s in by_window[(service, window)]
                      if request_id in s.attributes.get("forward.request_ids", ())]
            counted[kind] = step.attributes["forward.recomputes"]
        assert counted == {"first prompt chunk": 0, "second prompt chunk": 0, "decode before the preemption": 0,
                           "recompute": 1}, service
        report = reports[request_id].attributes
        counts = (report["request.recomputes"], report["request.prefill_steps"], report["request.decode_steps"])
        assert counts == (1, 3, 1), service


def test_span_metrics_count_every_step_before_sampling(outcome):
    total = sum(outcome.metrics, Counter())
    assert set(outcome.sent) == {"prefill", "decode", "mixed", "idle"}
    assert total == outcome.sent  # per mode, exactly: the dropped windows' steps too
    kept_steps = sum(1 for k in outcome.kept for spans in k.values() for s in spans if "forward.mode" in s.attributes)
    assert kept_steps < sum(total.values()) / 2
