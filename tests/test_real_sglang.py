"""The real sglang 0.5.23 engine is the judge: every step span against what its scheduler scheduled.

A tiny random-weight Llama is made locally; sglang's own ``Engine`` runs it on the CPU
(``tests/real_engines/sglang/drive.py``) in the environment ``scripts/engine_envs.py`` builds, its
scheduler instrumented the way a user does it (``otel-stepspan run``'s bootstrap on
``PYTHONPATH``, export configured by ``OTEL_*`` variables only, spans read from a real OTLP
receiver). A hook of our own in the scheduler process (``truth/sitecustomize.py``) records, per
forward, the scheduler's ``ScheduleBatch`` and the scheduler around it; every span is compared
with it, attribute by attribute. In the overlap session sglang also traces requests
(``enable_trace``) and each request comes with a client's ``traceparent``: the steps
``otel-stepspan request`` finds for each request are compared with the rows the scheduler ran
for it. Everything is sglang's own code but one kernel binding it imports and never calls here
(``stand_in/vllm``).
"""

from __future__ import annotations

import contextlib
import gzip
import importlib.util
import io
import json
import os
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import pytest

from span_schema import ENGINE_KEYS, FORWARD_KEYS, PASS_ID_KEY
from otel_stepspan.cli.main import main as cli_main
from otel_stepspan.otlp_json import iter_step_spans
from otel_stepspan.testing.otlp_receiver import OtlpReceiver, ReceivedSpan
from backends_support import requires_go
from jaeger_requests import assert_reports_lead_to_the_windows_of_their_steps, replay, wait_until_stored
from jaeger_requests import request_report as jaeger_report
from timelines import assert_steps_form_timelines

pytestmark = pytest.mark.engines

ROOT = Path(__file__).resolve().parent.parent
HERE = ROOT / "tests" / "real_engines" / "sglang"
BOOTSTRAP = ROOT / "otel_stepspan" / "cli" / "_bootstrap"
COMPARED_KEYS = FORWARD_KEYS | ENGINE_KEYS | {PASS_ID_KEY}


def _engine_envs() -> Any:
    spec = importlib.util.spec_from_file_location("engine_envs", ROOT / "scripts" / "engine_envs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def engine_python() -> Path:
    envs = _engine_envs()
    if not envs.is_built("sglang"):
        pytest.skip("the sglang environment is not built: python3 scripts/engine_envs.py build sglang")
    return envs.python_of("sglang")


@pytest.fixture(scope="module")
def tiny_model(engine_python, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("sglang-model")
    subprocess.run([str(engine_python), str(HERE / "make_model.py"), str(path)], check=True, capture_output=True)
    return path


@dataclass
class Run:
    """One engine session: the scheduler's truth, the spans received, the tokens generated, and
    sglang's own profiler trace when one was taken."""

    truth: list[dict]
    spans: list[ReceivedSpan]
    outputs: dict[str, list[int]]
    trace: Optional[list[dict]]
    log: str
    timelines: list[ReceivedSpan] = field(default_factory=list)
    #: With request tracing: each request's client trace context, and every span received
    #: (sglang's request spans and the step spans) as an OTLP/JSON lines file.
    client_traces: dict[str, dict] = field(default_factory=dict)
    spans_file: Optional[Path] = None
    #: When the driver called ``Engine.shutdown()`` (time.time_ns()).
    shutdown_ns: Optional[int] = None


def _truth(folder: Path) -> list[dict]:
    records = []
    for path in sorted(folder.glob("truth-*.jsonl")):
        records += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return records


def _trace(folder: Path) -> list[dict]:
    (path,) = folder.glob("*.trace.json.gz")
    with gzip.open(path) as handle:
        return json.load(handle)["traceEvents"]


def _wait_for_steps(receiver: OtlpReceiver, count: int, timeout_s: float, in_timelines: bool = False) -> None:
    """Until ``count`` step spans arrived (spans with ``forward.mode``: sglang's own request
    spans arrive at the same receiver) and, with ``in_timelines``, timeline roots counting them
    all and the report (``request.steps``) of every request they link to, or the timeout."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        steps = receiver.steps()
        counted = sum(r.attributes.get("timeline.steps", 0) for r in receiver.timelines()) if in_timelines else count
        linked = {rid for s in steps for rid in s.attributes.get("forward.request_ids", ())} if in_timelines else set()
        reported = {s.attributes.get("request.id") for s in receiver.spans() if s.name == "request.steps"}
        if len(steps) >= count and counted >= count and linked <= reported:
            return
        time.sleep(0.2)


def _write_otlp_json(receiver: OtlpReceiver, path: Path) -> None:
    """Every export request the receiver got, one OTLP/JSON document a line (the protobuf JSON
    mapping: ids in base64, which the readers of ``otel_stepspan.otlp_json`` take)."""
    from google.protobuf import json_format

    with open(path, "w") as handle:
        for request in receiver.requests:
            handle.write(json.dumps(json_format.MessageToDict(request, use_integers_for_enums=True)) + "\n")


def run_engine(
    python: Path,
    model: Path,
    workdir: Path,
    *,
    instrumented: bool,
    overlap: str = "on",
    profile: bool = False,
    annotations: bool = False,
    short: bool = False,
    prompt_shutdown: bool = False,
    trace_requests: bool = False,
    sglang_export_delay: Optional[int] = 100,
    busy_seconds: float = 0.0,
) -> Run:
    """Run the driver; unless ``prompt_shutdown``, keep the engine up until every recorded forward's
    span has arrived, so that what is compared is labelling, not delivery at shutdown.

    With ``trace_requests``, sglang traces requests and exports them to the same receiver; its
    scheduler then has sglang's own tracer provider, which the exporter process stands in for
    (same endpoint, sglang's resource), and the engine stays up until the timeline roots have
    arrived too (their windows are short here: one second)."""
    workdir.mkdir(parents=True)
    (workdir / "truth").mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    paths = [str(HERE / "truth"), str(HERE / "stand_in"), str(ROOT)]
    if instrumented:
        paths.insert(0, str(BOOTSTRAP))
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env["SGLANG_TRUTH_DIR"] = str(workdir / "truth")
    out, ready = workdir / "outputs.json", workdir / "spans-arrived"
    argv = [str(python), str(HERE / "drive.py"), "--model", str(model), "--out", str(out), "--overlap", overlap]
    if profile:
        argv += ["--profile-dir", str(workdir / "profile")]
    if annotations:
        argv.append("--annotations")
    if short:
        argv.append("--short")
    if busy_seconds:
        argv += ["--busy-seconds", str(busy_seconds)]
    if not prompt_shutdown:
        argv += ["--wait-for", str(ready)]
    requests_out = workdir / "requests.json"
    with OtlpReceiver(protocol="grpc") as receiver:
        if instrumented:
            env.update(
                OTEL_EXPORTER_OTLP_ENDPOINT=receiver.endpoint,
                OTEL_SERVICE_NAME="sglang-real-engine-test",
                OTEL_BSP_SCHEDULE_DELAY="100",
            )
        if trace_requests:
            argv += ["--trace-endpoint", f"127.0.0.1:{receiver.port}", "--requests-out", str(requests_out)]
            env["OTEL_STEPSPAN_TIMELINE_SECONDS"] = "1"
            env["OTEL_STEPSPAN_REQUEST_IDLE_SECONDS"] = "1"  # reports before the shutdown
            if sglang_export_delay is not None:  # None: sglang's own default (500 ms)
                env["SGLANG_OTLP_EXPORTER_SCHEDULE_DELAY_MILLIS"] = str(sglang_export_delay)
        with open(workdir / "log.txt", "w") as log:
            process = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=workdir)
            try:
                if not prompt_shutdown:
                    deadline = time.monotonic() + 300
                    while not out.exists() and process.poll() is None and time.monotonic() < deadline:
                        time.sleep(0.1)
                    if instrumented:
                        _wait_for_steps(receiver, len(_truth(workdir / "truth")), 60, in_timelines=trace_requests)
                    ready.touch()
                process.wait(timeout=300)
            finally:
                if process.poll() is None:
                    process.kill()
        if instrumented and prompt_shutdown:
            _wait_for_steps(receiver, len(_truth(workdir / "truth")), 20)
        if instrumented:
            receiver.wait_until_quiet(quiet_s=2.0, timeout_s=30)  # the exporter processes deliver last
        spans = [s for s in receiver.steps() if s.scope_name == "otel_stepspan"]
        timelines = [s for s in receiver.timelines() if s.scope_name == "otel_stepspan"]
        if trace_requests:
            _write_otlp_json(receiver, workdir / "spans.jsonl")
    text = (workdir / "log.txt").read_text()
    assert process.returncode == 0 and out.exists(), f"the engine run failed:\n{text[-6000:]}"
    return Run(
        truth=_truth(workdir / "truth"),
        spans=spans,
        timelines=timelines,
        outputs=json.loads(out.read_text()),
        trace=_trace(workdir / "profile") if profile else None,
        log=text,
        client_traces=json.loads(requests_out.read_text()) if trace_requests else {},
        spans_file=workdir / "spans.jsonl" if trace_requests else None,
        shutdown_ns=int((workdir / "shutdown-ns").read_text()),
    )


@pytest.fixture(scope="module")
def runs(engine_python, tiny_model, tmp_path_factory) -> dict[str, Run]:
    """The engine sessions, each started once for the module, on first use."""
    made: dict[str, Run] = {}
    settings = {
        "overlap": dict(instrumented=True, overlap="on", profile=True, trace_requests=True),
        "no_overlap": dict(instrumented=True, overlap="off", profile=True, annotations=True),
        "uninstrumented": dict(instrumented=False, overlap="on"),
    }
    root = tmp_path_factory.mktemp("sglang-runs")

    class Lazy(dict):
        def __missing__(self, name: str) -> Run:
            made[name] = run_engine(engine_python, tiny_model, root / name, **settings[name])
            self[name] = made[name]
            return made[name]

    return Lazy()


# -- what the scheduler scheduled, written out by hand from docs/spans.md's counting ------------


def expected_attributes(record: dict) -> dict[str, Any]:
    """docs/spans.md applied to one ``ScheduleBatch`` record of the truth hook."""
    mode, rows, lens = record["mode"], record["rows"], record["extend_lens"]
    if mode == "DECODE":
        counts, label = ("decode", rows, 0, rows, 0, rows), f"step[decode bs={rows}]"
    elif mode == "EXTEND":
        ext = sum(lens)
        counts, label = ("prefill", rows, ext, 0, rows, ext), f"step[prefill bs={rows} toks={ext}]"
    elif mode == "MIXED":
        prompts = record["prompt_rows"]
        assert all(n == 1 for n in lens[prompts:]), record  # the appended decodes come last
        ext, dec = sum(lens[:prompts]), rows - prompts
        counts, label = ("mixed", rows, ext, dec, prompts, ext + dec), f"step[mixed bs={rows} ext={ext} dec={dec}]"
    else:
        raise AssertionError(f"a mode these workloads do not run: {record}")
    keys = ("forward.mode", "forward.batch_size", "forward.extend_tokens", "forward.decode_seqs",
            "forward.prefill_seqs", "forward.num_tokens")
    expected: dict[str, Any] = dict(zip(keys, counts))
    expected.update({
        "forward.label": label,
        PASS_ID_KEY: record["pass_id"],
        "engine.name": "sglang",
        "engine.tp_rank": record["tp_rank"],
        "engine.dp_rank": record["dp_rank"],
        "engine.pp_rank": record["pp_rank"],
    })
    return expected


def mismatches(run: Run) -> list[tuple[dict, dict, str]]:
    by_pass = {span.attributes.get(PASS_ID_KEY): span for span in run.spans}
    wrong = []
    for record in run.truth:
        expected = expected_attributes(record)
        span = by_pass.get(record["pass_id"])
        got = {k: v for k, v in span.attributes.items() if k in COMPARED_KEYS} if span else {}
        name = span.name if span else None
        if got != expected or name != expected["forward.label"]:
            wrong.append((expected, got, name))
    return wrong


@pytest.mark.parametrize("name", ["overlap", "no_overlap"])
def test_every_step_span_equals_what_the_scheduler_scheduled(runs, name):
    run = runs[name]
    truth = run.truth
    # The hook saw every forward of the runner (its counter has no gaps), and the workloads ran
    # what this test is about.
    assert [r["pass_id"] for r in truth] == list(range(1, len(truth) + 1))
    modes = [r["mode"] for r in truth]
    assert {"EXTEND", "DECODE", "MIXED"} <= set(modes)
    assert any(r["mode"] == "EXTEND" and r["prefix_lens"][0] > 0 for r in truth), "no chunked prefill ran"
    assert any(
        r["mode"] == "MIXED" and 1 in r["extend_lens"][: r["prompt_rows"]] for r in truth
    ), "no fully cached prompt joined a running batch"
    assert len(run.spans) == len(truth), "spans received != forward passes"
    assert mismatches(run) == []


@pytest.mark.parametrize("name", ["overlap", "no_overlap"])
def test_one_step_range_per_forward_in_sglangs_own_trace_named_like_its_span(runs, name):
    run = runs[name]
    steps = sorted((e for e in run.trace if e.get("ph") == "X" and e["name"].startswith("step[")),
                   key=lambda e: e["ts"])
    spans = sorted(run.spans, key=lambda s: s.attributes[PASS_ID_KEY])
    assert len(steps) == len(run.truth)
    assert [e["name"] for e in steps] == [s.name for s in spans]


def test_sglangs_detailed_annotations_stay_inside_the_step(runs):
    """start_profile(detailed_annotations=True): sglang's per-forward aggregates, its own name
    and forward_id included, are one ``sglang[...]`` range inside each step range."""
    run = runs["no_overlap"]
    events = [e for e in run.trace if e.get("ph") == "X"]
    steps = sorted((e for e in events if e["name"].startswith("step[")), key=lambda e: e["ts"])
    notes = sorted((e for e in events if e["name"].startswith("sglang[")), key=lambda e: e["ts"])
    assert len(notes) == len(steps) == len(run.truth)
    for pass_id, (step, note) in enumerate(zip(steps, notes), start=1):
        assert step["ts"] <= note["ts"] and note["ts"] + note["dur"] <= step["ts"] + step["dur"]
        assert note["name"].endswith(f" forward_id={pass_id}]"), note["name"]
    mixed = [n["name"] for n in notes if n["name"].startswith("sglang[MIXED")]
    assert mixed and all(" c_sq=" in n and " g_sq=" in n for n in mixed)


@pytest.mark.parametrize("name", ["overlap", "no_overlap"])
def test_the_steps_form_engine_timelines_whose_roots_count_them(runs, name):
    assert_steps_form_timelines(runs[name].spans, runs[name].timelines)


def test_generated_tokens_are_the_same_with_and_without_instrumentation(runs):
    on, off = runs["overlap"].outputs, runs["uninstrumented"].outputs
    assert set(on) == {"pair_a", "pair_b", "chunked", "behind_chunked", "running", "joining", "joining_cached"}
    assert on == off


# -- requests <-> steps, and the scheduler's context -----------------------------------------------


def scheduled_for_each_request(truth: list[dict]) -> dict[str, list[tuple[int, str, int]]]:
    """(pass id, work, tokens) of every row the scheduler ran, by request id: docs/spans.md's counting applied
    by hand to the truth records (a MIXED batch's rows after its prompt rows are the running
    decodes; a prompt row computes its extend length)."""
    steps: dict[str, list[tuple[int, str, int]]] = {}
    for record in truth:
        mode, lens = record["mode"], record["extend_lens"]
        for row, rid in enumerate(record["rids"]):
            if mode == "DECODE" or (mode == "MIXED" and row >= record["prompt_rows"]):
                work = ("decode", 1)
            elif mode in ("EXTEND", "MIXED"):
                work = ("prefill", lens[row])
            else:
                raise AssertionError(f"a mode these workloads do not run: {record}")
            steps.setdefault(rid, []).append((record["pass_id"], *work))
    return steps


def cached_prefix(truth: list[dict], rid: str) -> int:
    """The prompt tokens the radix cache already held when the request's first chunk ran."""
    first = next(r for r in truth if rid in r["rids"])
    return first["prefix_lens"][first["rids"].index(rid)]


def request_report(spans_file: Path, key: str) -> dict:
    """``otel-stepspan request KEY --file SPANS --json``, the CLI itself, in this process."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = cli_main(["request", key, "--file", str(spans_file), "--json"])
    assert status == 0, out.getvalue()
    return json.loads(out.getvalue())


def test_each_requests_steps_found_by_otel_stepspan_request_are_what_the_scheduler_ran_for_it(runs):
    """sglang traces requests, each sent with a client's traceparent: from the spans received
    (sglang's request spans and the step spans), ``otel-stepspan request <client trace id>``
    lists exactly the forwards whose batch held the request, with the prompt tokens each chunk
    computed and every decode; the request's tokens are its steps' sum, which is what it needed:
    its prompt past the cached prefix, and one decode per output after the first."""
    run = runs["overlap"]
    scheduled = scheduled_for_each_request(run.truth)
    pass_of = {s.span_id: s.attributes[PASS_ID_KEY] for s in iter_step_spans(run.spans_file)}
    assert set(scheduled) == set(run.client_traces) == set(run.outputs)
    for name, client in run.client_traces.items():
        report = request_report(run.spans_file, client["trace_id"])
        expected = scheduled[name]
        assert [(pass_of[s["span_id"]], s["work"], s["tokens"]) for s in report["steps"]] == expected, name
        assert (report["request_id"], report["trace_id"]) == (name, client["trace_id"])
        phases = {p["work"]: (p["steps"], p["tokens"]) for p in report["phases"]}
        for work in ("prefill", "decode"):
            mine = [tokens for _, w, tokens in expected if w == work]
            assert phases[work] == (len(mine), sum(mine)), (name, work)
        assert report["tokens"] == sum(tokens for _, _, tokens in expected)
        needed = client["prompt_len"] - cached_prefix(run.truth, name) + len(run.outputs[name]) - 1
        assert report["tokens"] == needed, name
        # sglang's own span for the request (in the client's trace) was found: it started first
        assert report["queued_ms"] is not None and report["queued_ms"] >= 0
    chunks = {name: sum(1 for _, w, _ in steps if w == "prefill") for name, steps in scheduled.items()}
    assert chunks["chunked"] == 3, "the chunked prompt was not prefilled in three chunks"


def test_the_request_id_finds_the_same_steps_as_the_trace_id(runs):
    run = runs["overlap"]
    client = run.client_traces["chunked"]
    by_trace, by_id = request_report(run.spans_file, client["trace_id"]), request_report(run.spans_file, "chunked")
    assert [s["span_id"] for s in by_id["steps"]] == [s["span_id"] for s in by_trace["steps"]]


@pytest.mark.backends
@requires_go
def test_each_requests_report_from_jaeger_equals_the_one_from_the_spans_file(runs, jaeger_stack, capsys):
    """Every span sglang and the steps sent (request tracing on) goes to the real Collector and
    Jaeger, which drops link attributes: ``otel-stepspan request`` from Jaeger is still the
    report from the spans file, by trace id and by request id, and each request's trace holds its
    ``request.steps`` span linked to exactly the windows of its steps."""
    run = runs["overlap"]
    replay(run.spans_file, jaeger_stack.otlp_http_endpoint)
    held = wait_until_stored(jaeger_stack.jaeger_url, run.spans_file)
    source = ("--jaeger", jaeger_stack.jaeger_url, "--since", "1h")
    for name, client in run.client_traces.items():
        from_file = jaeger_report(capsys, client["trace_id"], "--file", str(run.spans_file))
        assert jaeger_report(capsys, client["trace_id"], *source) == from_file, name
        assert jaeger_report(capsys, name, *source) == {**from_file, "key": name}
        assert_reports_lead_to_the_windows_of_their_steps(held, client["trace_id"])


def test_without_request_tracing_no_step_links_to_a_request(runs):
    assert all("forward.request_links" not in s.attributes for s in runs["no_overlap"].spans)
    assert all(s.attributes["forward.request_links"] == len(r["rids"]) for s, r in _span_and_record(runs["overlap"]))


def _span_and_record(run: Run) -> list[tuple[ReceivedSpan, dict]]:
    by_pass = {span.attributes.get(PASS_ID_KEY): span for span in run.spans}
    return [(by_pass[record["pass_id"]], record) for record in run.truth]


@pytest.mark.parametrize("name", ["overlap", "no_overlap"])
def test_every_step_carries_the_schedulers_queue_and_kv_tokens_in_use(runs, name):
    """``scheduler.queued_requests`` is sglang's waiting queue and ``scheduler.kv_tokens`` its own
    ``#token`` (``get_pool_stats()``) at the forward; the workloads made a request wait."""
    pairs = _span_and_record(runs[name])
    got = [(s.attributes.get("scheduler.queued_requests"), s.attributes.get("scheduler.kv_tokens")) for s, _ in pairs]
    assert got == [(r["queued"], r["kv_used"]) for _, r in pairs]
    assert any(r["queued"] > 0 for _, r in pairs), "no request waited"


def test_no_step_span_is_lost_when_the_engine_shuts_down_right_after_its_last_request(
    engine_python, tiny_model, tmp_path
):
    """A script that calls ``Engine.shutdown()`` right after its last request: sglang SIGKILLs
    its scheduler process; every step must still arrive."""
    run = run_engine(engine_python, tiny_model, tmp_path / "run", instrumented=True, short=True, prompt_shutdown=True)
    assert run.truth, "no forward ran"
    assert sorted(s.attributes[PASS_ID_KEY] for s in run.spans) == [r["pass_id"] for r in run.truth]
    assert mismatches(run) == []


def test_with_sglang_tracing_requests_a_prompt_shutdown_loses_no_step(engine_python, tiny_model, tmp_path):
    """With ``enable_trace`` sglang sets its own tracer provider in the scheduler process (OTLP
    gRPC, its own batch delay: 500 ms unless set). The exporter process stands in for it, so a
    script that shuts the engine down right after its last request (sglang SIGKILLs the
    scheduler) loses no step, where the provider's batch processor would lose its last moments,
    as sglang loses its own request spans."""
    run = run_engine(engine_python, tiny_model, tmp_path / "run", instrumented=True, prompt_shutdown=True,
                     trace_requests=True, sglang_export_delay=None, short=True, busy_seconds=3.0)
    assert run.truth, "no forward ran"
    assert sorted(s.attributes[PASS_ID_KEY] for s in run.spans) == [r["pass_id"] for r in run.truth]
    assert "through the tracer provider in place" not in run.log  # no fallback to the provider


# -- sglang's own classes on the paths this machine cannot run end to end --------------------------


@pytest.fixture(scope="module")
def real_classes(engine_python) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env["PYTHONPATH"] = os.pathsep.join([str(HERE / "stand_in"), str(ROOT)])
    done = subprocess.run(
        [str(engine_python), str(HERE / "real_classes.py")], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-6000:]
    return json.loads(done.stdout)


#: docs/spans.md's counting applied by hand to each case's batch (see real_classes.py):
#: label, mode, batch_size, extend_tokens, decode_seqs, prefill_seqs, num_tokens (-1: unknown).
REAL_CLASS_CASES = {
    # DP attention pads an idle rank's batch: nothing real is computed.
    "idle": ("step[idle]", "idle", 0, 0, 0, 0, 0),
    # EAGLE: draft_token_num tokens per request.
    "verify": ("step[verify bs=3 toks=12]", "verify", 3, 0, 3, 0, 12),
    # DSpark/DFlash ragged verify: each request its own count (3 + 1 + 5), not bs * draft_token_num.
    "ragged_verify": ("step[verify bs=3 toks=9]", "verify", 3, 0, 3, 0, 9),
    "draft_runner": ("step[draft bs=3]", "draft", 3, 0, 0, 0, -1),
    # SPLIT_PREFILL: one forward per layer slice; the prompt's 5 + 7 tokens count on the first.
    "split_prefill_0": ("step[split_prefill bs=2]", "split_prefill", 2, 12, 0, 2, 12),
    "split_prefill_1": ("step[split_prefill bs=2]", "split_prefill", 2, 0, 0, 0, 0),
    # dLLM: each request denoises a block of 8 tokens.
    "dllm_extend": ("step[dllm_extend bs=2]", "dllm_extend", 2, 16, 0, 2, 16),
    # DP attention's convert_decode_to_extend: EXTEND of length-1 rows that are all decodes.
    "dp_converted_decode": ("step[decode bs=4]", "decode", 4, 0, 4, 0, 4),
    # EAGLE v2's draft CUDA graph, replayed without ModelRunner.forward.
    "draft_graph_replay": ("step[draft bs=3]", "draft", 3, 0, 0, 0, -1),
    # Multi-layer EAGLE's draft-extend replays (rows of 2, 1 and 3 tokens), also outside forward.
    "multi_layer_draft_replay": ("step[draft bs=3]", "draft", 3, 5, 1, 2, 6),
}


@pytest.mark.parametrize("case", sorted(REAL_CLASS_CASES))
def test_paths_the_cpu_cannot_run_are_labelled_on_sglangs_own_classes(real_classes, case):
    (result,) = [c for c in real_classes["cases"] if c["case"] == case]
    assert result["outcome"] == "passed through"  # the forward's own exception, unchanged
    (span,) = result["spans"]
    label, *counts = REAL_CLASS_CASES[case]
    keys = ("forward.mode", "forward.batch_size", "forward.extend_tokens", "forward.decode_seqs",
            "forward.prefill_seqs", "forward.num_tokens")
    assert span["name"] == label == span["attributes"]["forward.label"]
    assert tuple(span["attributes"][k] for k in keys) == tuple(counts)
    assert span["status"] == "ERROR"


def test_a_graph_replayed_inside_a_traced_forward_is_not_a_second_step(real_classes):
    (result,) = [c for c in real_classes["cases"] if c["case"] == "graph_replay_inside_forward"]
    assert result["outcome"] == "passed through" and result["spans"] == []


def test_real_forward_shows_one_step_range_and_sglangs_annotations_inside(real_classes):
    ranges = real_classes["ranges"]
    decode, extend = ranges["decode"], ranges["extend"]
    assert [n for n in decode if n.startswith("step[")] == ["step[decode bs=2]"]
    assert [n for n in extend if n.startswith("step[")] == ["step[prefill bs=2 toks=12]"]
    assert ranges["multi_layer"] == ["step[draft bs=3]"]
    last = real_classes["pass_id_after"]
    assert decode[1] == f"sglang[DECODE bs=2 g_sq=2 g_sqsq=2 g_sqsk=32 g_sk=32 forward_id={last - 1}]"
    assert extend[1].startswith("sglang[EXTEND bs=2 toks=12 c_sq=12 ") and extend[1].endswith(f"forward_id={last}]")
