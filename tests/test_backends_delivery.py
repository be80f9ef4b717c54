"""Delivery and structure through the real Collector into the real Jaeger (the Go-built
releases docker-compose.yml pins, run by scripts/backends.py with the project's configs).

- An engine SIGKILLed a second after its last step: every step of its run is in Jaeger (the
  exporter process outlives it and delivers what reached its pipe).
- Engine timelines: the traces Jaeger returns hold the run's steps as children of timeline roots,
  in order, none missing or duplicated across windows; steps stay searchable by their mode.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from backends_support import PACED_MODES, engine_env, requires_go, wait_stored
from otel_stepspan.cli.jaeger import JaegerClient
from otel_stepspan.cli.main import main as cli_main
from otel_stepspan.otlp_json import iter_spans

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import backends  # noqa: E402

pytestmark = [pytest.mark.backends, requires_go]

PACED_STEPS = Path(__file__).parent / "programs" / "paced_steps.py"


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    with backends.LocalBackends(tmp_path_factory.mktemp("delivery")) as running:
        yield running


def test_an_engine_sigkilled_a_second_after_its_last_step_has_every_step_in_jaeger(stack):
    since = time.time_ns()
    steps = 400
    program = subprocess.Popen(
        [sys.executable, str(PACED_STEPS), "0", "200", "--forever", "--stop-after", str(steps)],
        # No export before the end: only the engine's death makes the exporter send.
        env=engine_env(stack.otlp_grpc_endpoint, "delivery-sigkill", OTEL_BSP_SCHEDULE_DELAY="600000"),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and program.stdout.readline().strip() != f"done {steps}":
            pass
        time.sleep(1.0)
        program.send_signal(signal.SIGKILL)
        program.wait(10)
    finally:
        if program.poll() is None:
            program.kill()
    got = wait_stored(stack.jaeger_url, "delivery-sigkill", since, steps)
    print(f"\nSIGKILL 1 s after the last step: sent {steps}, in Jaeger {got.unique}, duplicates {got.duplicates}")
    assert got.missing(steps) == []
    assert got.duplicates == 0


def _run_modes(stack, service: str, seconds: float, rate: float, **env: str) -> dict:
    result = subprocess.run(
        [sys.executable, str(PACED_MODES), str(seconds), str(rate)],
        env=engine_env(stack.otlp_grpc_endpoint, service, **env),
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return json.loads([line for line in result.stdout.splitlines() if line.startswith('{"steps"')][-1])


def test_timeline_traces_in_jaeger_hold_the_runs_steps_in_order_and_stay_searchable_by_mode(stack, capsys):
    since = time.time_ns()
    service = "delivery-timeline"
    summary = _run_modes(stack, service, 3.0, 200, OTEL_STEPSPAN_TIMELINE_STEPS="250")
    sent = summary["steps"]
    wait_stored(stack.jaeger_url, service, since, sent)
    documents = JaegerClient(stack.jaeger_url, timeout_s=60).find_traces(
        service, since - 10**10, time.time_ns() + 10**10, search_depth=1000
    )
    spans = list(iter_spans(documents))
    roots = {s.span_id: s for s in spans if s.name == "timeline"}
    steps = [s for s in spans if "forward.mode" in s.attributes]
    assert len(roots) == -(-sent // 250)  # windows of 250 steps
    by_window: dict[str, list] = defaultdict(list)
    for step in steps:
        root = roots.get(step.parent_span_id)
        assert root is not None and root.trace_id == step.trace_id, step.name
        by_window[root.span_id].append(step)
    pass_ids = Counter(s.attributes["forward.pass_id"] for s in steps)
    assert sorted(pass_ids) == list(range(1, sent + 1)) and set(pass_ids.values()) == {1}
    order = []
    for root in sorted(roots.values(), key=lambda r: r.start_ns):
        members = sorted(by_window[root.span_id], key=lambda s: s.start_ns)
        ids = [s.attributes["forward.pass_id"] for s in members]
        assert ids == list(range(ids[0], ids[0] + len(ids)))  # consecutive steps, in order
        assert root.attributes["timeline.steps"] == len(members)
        assert root.start_ns == members[0].start_ns and root.end_ns == members[-1].end_ns
        order += ids
    assert order == list(range(1, sent + 1))  # windows follow one another
    # Searchable by mode: the CLI asks Jaeger and gets every decode step, and only those.
    assert cli_main(["search", "--jaeger", stack.jaeger_url, "--service", service, "--mode", "decode",
                     "--limit", "0", "--json"]) == 0
    found = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert {f["mode"] for f in found} == {"decode"}
    assert len(found) == summary["sent"]["decode"]
