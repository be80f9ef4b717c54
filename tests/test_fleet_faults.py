"""A gateway of the fleet SIGKILLed mid-run (docs/scale.md, "A gateway lost"), for real: one
agent (collector/agent.yaml, the static resolver) in front of two gateways
(collector/gateway.yaml), Jaeger on Badger, all started by scripts/backends.py (LocalFleet) on
free ports of 127.0.0.1, every window kept (STEPSPAN_KEEP_PERCENT=100), so that what Jaeger
lacks is exactly what was lost.

Each gateway also copies every span it accepts to a receiver of the test's (a test-only
overlay: an OTLP exporter without a queue in the intake pipeline, so that a span the gateway
acknowledged to the agent has reached the copy first). The copies say which gateway each trace
went to, and what the killed gateway had accepted by a given moment.

Two engine stand-ins (tests/programs/paced_modes.py, OTEL_* variables only) send 100 steps a
second each, in windows of 10 steps. Once the second gateway has taken part of the run, the
test notes the traces it has seen (moment t0), waits decision_wait plus 1.5 s (the processor
decides once a second), SIGKILLs it, and starts it again 4 s later on the same ports. Then:
  * no trace reached both gateways: the static resolver does not move the killed gateway's
    share to the other one, the agent holds it (in the per-gateway exporter's memory queue)
    and delivers it once the gateway is back;
  * every step missing from Jaeger is a step the killed gateway had accepted before the kill,
    in a window it first saw after t0: a window it held in memory with no decision yet. None
    of the other gateway's steps is missing, none of the steps sent during the outage;
  * at most that many steps are missing, and some are: the kill cost the undecided windows.

The figures (steps and windows lost, the bound, its OTLP bytes) are printed (`pytest -s`).
About a minute once built (`python scripts/backends.py build --fleet`). Skips only where Go is
absent; CI (OTEL_STEPSPAN_REQUIRE_BACKENDS=1) turns that skip into a failure.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from otel_stepspan.testing.otlp_receiver import OtlpReceiver

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import backends  # noqa: E402
from backends_support import EngineRun, Stored, poll, requires_go, stored  # noqa: E402

pytestmark = [pytest.mark.backends, requires_go]

RATE = 100.0  # steps per second, each engine
ENGINES = 2
RUN_S = 20.0
DECISION_WAIT_S = 5  # STEPSPAN_DECISION_WAIT
TICK_MARGIN_S = 1.5  # the processor decides once a second: a trace is decided by then
OUTAGE_S = 4.0
KILLED = 1  # the second gateway
# Windows of 10 steps (0.1 s at this rate): many windows, so both gateways get a share.
ENGINE_ENV = {"OTEL_STEPSPAN_TIMELINE_STEPS": "10", "OTEL_STEPSPAN_TIMELINE_SECONDS": "2"}


class CopyingFleet(backends.LocalFleet):
    """LocalFleet whose gateway ``i`` also copies every span it accepts to ``copies[i]``,
    synchronously: no queue, no retry, so the gateway answers the agent only once the copy
    took the spans (and a span the copy lacks was never acknowledged)."""

    def __init__(self, workdir: Path, copies: list[OtlpReceiver], **kwargs) -> None:
        self.copies = copies
        super().__init__(workdir, gateways=len(copies), **kwargs)

    def start_gateway(self, index: int, extra_configs: tuple[Path, ...] = ()) -> None:
        intake = yaml.safe_load(backends.GATEWAY_CONFIG.read_text())["service"]["pipelines"]["traces"]
        overlay = {
            "exporters": {"otlp_grpc/copy": {
                "endpoint": f"127.0.0.1:{self.copies[index].port}", "tls": {"insecure": True},
                "sending_queue": {"enabled": False}, "retry_on_failure": {"enabled": False}}},
            "service": {"pipelines": {"traces": {"exporters": [*intake["exporters"], "otlp_grpc/copy"]}}},
        }
        path = self.workdir / f"gateway-{index + 1}-copy.yaml"
        path.write_text(yaml.safe_dump(overlay))
        super().start_gateway(index, (*extra_configs, path))


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    copies = [OtlpReceiver("grpc").start() for _ in range(2)]
    policies = {"STEPSPAN_KEEP_PERCENT": "100", "STEPSPAN_DECISION_WAIT": f"{DECISION_WAIT_S}s"}
    try:
        with CopyingFleet(tmp_path_factory.mktemp("fleet_faults"), copies, collector_env=policies) as stack:
            yield stack
    finally:
        for copy in copies:
            copy.stop()


@dataclass(frozen=True)
class Accepted:
    """A step span as a gateway's copy received it."""

    service: str
    trace_id: str
    pass_id: int
    otlp_bytes: int


def accepted(receiver: OtlpReceiver, start: int = 0, end: int | None = None) -> tuple[list[Accepted], set[str]]:
    """The step spans of the receiver's requests [start:end], and the trace ids of all their
    spans (timeline roots too)."""
    steps, traces = [], set()
    for request in receiver.requests[start:end]:
        for resource_spans in request.resource_spans:
            service = next(kv.value.string_value for kv in resource_spans.resource.attributes
                           if kv.key == "service.name")
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    traces.add(span.trace_id.hex())
                    pass_id = next((kv.value.int_value for kv in span.attributes if kv.key == "forward.pass_id"), None)
                    if pass_id is not None:
                        steps.append(Accepted(service, span.trace_id.hex(), pass_id, span.ByteSize()))
    return steps, traces


def settled(jaeger_url: str, run: EngineRun, quiet_s: float = 6.0, timeout_s: float = 90.0) -> Stored:
    """What Jaeger holds of ``run`` once that stopped changing for ``quiet_s`` (the last windows
    decided and stored), or after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    last, since = stored(jaeger_url, run.service, run.started_ns, run.steps + 1000), time.monotonic()
    while time.monotonic() - since < quiet_s and time.monotonic() < deadline:
        time.sleep(2.0)
        got = stored(jaeger_url, run.service, run.started_ns, run.steps + 1000)
        if got.pass_ids != last.pass_ids:
            last, since = got, time.monotonic()
    return last


def test_a_gateway_killed_mid_run_loses_at_most_its_undecided_windows(fleet):
    killed, other = fleet.copies[KILLED], fleet.copies[1 - KILLED]
    runs = [EngineRun.start(fleet.otlp_grpc_endpoint, f"gateway-kill-{i}", RUN_S, RATE, **ENGINE_ENV)
            for i in range(ENGINES)]
    # t0: the killed gateway has taken part of this run. Every window it saw by then is decided
    # by the kill (decision_wait after its first span, on the processor's 1 s tick).
    assert poll(lambda: len(killed.requests), lambda n: n > 0, 20, 0.2) > 0, "the gateway got nothing"
    time.sleep(1.0)
    seen_at_t0 = len(killed.requests)
    time.sleep(DECISION_WAIT_S + TICK_MARGIN_S)
    backends.kill(fleet.gateways[KILLED])
    seen_at_kill = len(killed.requests)  # every span it acknowledged to the agent is in there
    _, decided_traces = accepted(killed, 0, seen_at_t0)
    # The bound: the steps it had accepted in windows first seen after t0.
    held = [s for s in accepted(killed, seen_at_t0, seen_at_kill)[0] if s.trace_id not in decided_traces]
    time.sleep(OUTAGE_S)
    fleet.start_gateway(KILLED)
    for run in runs:
        run.finish()

    got = {run.service: settled(fleet.jaeger_url, run) for run in runs}
    killed_steps, killed_traces = accepted(killed)
    other_steps, other_traces = accepted(other)
    assert killed_traces and other_traces and not killed_traces & other_traces, \
        "a trace reached both gateways: the agent moved the killed gateway's share"

    def ids(steps: list[Accepted]) -> set[tuple[str, int]]:
        return {(s.service, s.pass_id) for s in steps}

    lost = {(run.service, pass_id) for run in runs for pass_id in got[run.service].missing(run.steps)}
    windows_lost = {s.trace_id for s in killed_steps if (s.service, s.pass_id) in lost}
    print(f"\ngateway {KILLED + 1} SIGKILLed, started again {OUTAGE_S:.0f} s later: "
          f"{len(lost)} of {sum(r.steps for r in runs)} steps lost in {len(windows_lost)} windows; "
          f"bound: {len(held)} steps in {len({s.trace_id for s in held})} windows it held undecided, "
          f"{sum(s.otlp_bytes for s in held)} bytes of OTLP step spans; "
          f"the gateways took {len(killed_traces)} and {len(other_traces)} traces")
    for run in runs:
        assert run.reported_lost == 0, run.stderr  # the engines lost nothing on their side
    assert lost <= ids(held), f"lost beyond the undecided windows: {sorted(lost - ids(held))[:20]}"
    assert not lost & ids(other_steps), "the other gateway lost steps"
    assert 0 < len(lost) <= len(held)
    # What the agent routed to the killed gateway while it was down, it held and delivered
    # after the restart: accepted then, and stored.
    after_restart = ids(accepted(killed, seen_at_kill)[0])
    assert after_restart and not after_restart & lost
