"""``otel-stepspan demo`` end to end, in a subprocess (the OTel global provider can be set once per
process): a run with no backend writes a Chrome trace and an OTLP/JSON spans file into the
current directory that agree step for step, whose labels match their attributes, with all four
modes and no request content; every request has its own span and ``otel-stepspan request`` finds
the steps that computed it; with OTEL_* export variables the same spans also cross the wire."""

from __future__ import annotations

import gzip
import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from otel_stepspan.cli.main import main as cli_main
from otel_stepspan.engine import WorkloadConfig, demo, make_workload
from otel_stepspan.otlp_json import iter_spans, iter_step_spans
from otel_stepspan.testing.otlp_receiver import OtlpReceiver

from span_schema import ENGINE_KEYS, FORWARD_KEYS, PASS_ID_KEY

#: A small run with every mode: seed 2's first request arrives after 125 ms (idle steps first),
#: several arrive within 2 ms of another (mixed steps), prompts up to 256 tokens get chunked at 48.
SMALL = [
    "--requests", "16", "--rate", "25", "--prompt-len", "64", "--output-len", "20", "--chunk-size", "48", "--seed", "2"
]

#: The same workload, as the demo draws it from those flags.
SMALL_WORKLOAD = WorkloadConfig(requests=16, rate=25, prompt_len=64, output_len=20, seed=2)

SCHEMA_KEYS = FORWARD_KEYS | {PASS_ID_KEY}
#: Set per span by the OTel sink (right in forked workers, where a resource built before the fork
#: is not); not in docs/spans.md's table of counts, but no request content either.
SINK_KEYS = {"process.pid"}
#: The scheduler's context, the count of request links and of requests recomputed after a
#: preemption: counts, no content.
CONTEXT_KEYS = {"scheduler.queued_requests", "scheduler.kv_tokens", "forward.request_links", "forward.recomputes"}
#: The step's links' attributes again, as arrays in link order: request ids, work, token counts.
ARRAY_KEYS = {"forward.request_ids", "forward.request_work", "forward.request_tokens"}
#: A step's link to a request, and the request's own span: identifiers and counts only.
LINK_KEYS = {"request.id", "forward.request.work", "forward.request.tokens"}
REQUEST_KEYS = {"request.id", "request.prompt_tokens", "request.output_tokens"}
#: The project's report in a request's trace: its id and counts of what its steps did.
REPORT_KEYS = {
    "request.id", "request.steps", "request.tokens", "request.recomputes", "request.in_steps_ms",
    "request.between_steps_ms", "request.links", "request.reported", "request.prefill_steps",
    "request.prefill_tokens", "request.decode_steps", "request.decode_tokens", "process.pid",
}

LABEL = re.compile(
    r"step\[(?:(?P<idle>idle)"
    r"|prefill bs=(?P<p_bs>\d+) toks=(?P<p_toks>\d+)"
    r"|decode bs=(?P<d_bs>\d+)"
    r"|mixed bs=(?P<m_bs>\d+) ext=(?P<m_ext>\d+) dec=(?P<m_dec>\d+))\]"
)


def run_demo(cwd: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    clean.update(env or {})
    result = subprocess.run(
        [sys.executable, "-m", "otel_stepspan.engine.demo", *args],
        cwd=cwd,
        env=clean,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def trace_step_events(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as handle:
        events = json.load(handle)["traceEvents"]
    steps = [e for e in events if e.get("cat") == "user_annotation" and e.get("name", "").startswith("step[")]
    return sorted(steps, key=lambda e: float(e["ts"]))


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    """The demo as a user runs it first: no OTEL_* variables, no --out-dir."""
    cwd = tmp_path_factory.mktemp("demo")
    result = run_demo(cwd, *SMALL)
    spans = sorted(iter_step_spans(cwd / "spans.jsonl"), key=lambda s: s.start_ns)
    return cwd, result, spans


def test_a_default_run_writes_both_files_here_and_says_how_to_open_them(default_run):
    cwd, result, spans = default_run
    assert (cwd / "trace.json").stat().st_size > 0
    out = result.stdout
    assert "trace.json" in out and "ui.perfetto.dev" in out
    assert "otel-stepspan stats --file spans.jsonl" in out
    assert f"spans.jsonl ({len(spans)} spans" in out
    assert "Also sent to" not in out  # no backend configured
    assert {s.service for s in spans} == {"otel-stepspan-demo"}


def test_the_summary_table_counts_the_steps_that_became_spans(default_run):
    _, result, spans = default_run
    rows = {}
    for line in result.stdout.splitlines():
        cells = line.split()
        if len(cells) == 6 and cells[0] in ("idle", "prefill", "decode", "mixed", "all") and cells[1].isdigit():
            rows[cells[0]] = int(cells[1])
    per_mode = Counter(s.mode for s in spans)
    assert rows == {**{mode: per_mode[mode] for mode in ("idle", "prefill", "decode", "mixed")}, "all": len(spans)}


def test_all_four_modes_appear(default_run):
    _, _, spans = default_run
    assert {s.mode for s in spans} == {"idle", "prefill", "decode", "mixed"}
    assert [s.attributes["forward.pass_id"] for s in spans] == list(range(1, len(spans) + 1))


def test_every_label_matches_its_attributes(default_run):
    _, _, spans = default_run
    for span in spans:
        attrs = span.attributes
        assert span.name == attrs["forward.label"]
        match = LABEL.fullmatch(span.name)
        assert match, span.name
        mode = attrs["forward.mode"]
        keys = ("batch_size", "extend_tokens", "decode_seqs", "prefill_seqs", "num_tokens")
        bs, ext, dec, pre, num = (attrs[f"forward.{key}"] for key in keys)
        if match["idle"]:
            assert (mode, bs, ext, dec, pre, num) == ("idle", 0, 0, 0, 0, 0)
        elif match["p_bs"]:
            assert (mode, bs, ext, dec, pre, num) == ("prefill", int(match["p_bs"]), int(match["p_toks"]), 0, bs, ext)
        elif match["d_bs"]:
            assert (mode, bs, ext, dec, pre, num) == ("decode", int(match["d_bs"]), 0, bs, 0, bs)
        else:
            assert (mode, bs, ext, dec) == ("mixed", int(match["m_bs"]), int(match["m_ext"]), int(match["m_dec"]))
            assert pre >= 1 and dec >= 1 and pre + dec == bs and num == ext + dec


def test_the_chrome_trace_and_the_spans_agree_step_for_step(default_run):
    cwd, _, spans = default_run
    events = trace_step_events(cwd / "trace.json")
    assert [e["name"] for e in events] == [s.name for s in spans]
    # The same steps, not merely the same names: each span is timed inside its profiler range
    # (the range opens before the span's clock starts and closes after it stops), so it is never
    # longer than the range, whatever the machine's load (2 us for the trace's rounding).
    for event, span in zip(events, spans):
        assert span.duration_ns <= float(event["dur"]) * 1e3 + 2_000, span.name


def test_no_request_content_reaches_a_span(default_run):
    cwd, _, spans = default_run
    for span in spans:
        assert set(span.attributes) <= SCHEMA_KEYS | ENGINE_KEYS | SINK_KEYS | CONTEXT_KEYS | ARRAY_KEYS
        assert all(isinstance(v, (str, int)) for k, v in span.attributes.items() if k not in ARRAY_KEYS)
        if not span.links:
            assert not ARRAY_KEYS & set(span.attributes)
            continue
        ids, work, tokens = (span.attributes[key] for key in ("forward.request_ids", "forward.request_work",
                                                              "forward.request_tokens"))
        assert [link.attributes["request.id"] for link in span.links] == list(ids) and all(i.isdigit() for i in ids)
        assert set(work) <= {"prefill", "decode"} and all(isinstance(t, int) for t in tokens)
    everything = list(iter_spans(cwd / "spans.jsonl"))
    for span in everything:
        if span.name == "request":
            assert set(span.attributes) == REQUEST_KEYS and not span.links
        if span.name == "request.steps":
            assert set(span.attributes) <= REPORT_KEYS and span.attributes["request.id"].isdigit()
            assert all(not link.attributes for link in span.links)
            continue
        for link in span.links:
            assert set(link.attributes) == LINK_KEYS and link.attributes["request.id"].isdigit()
    roots = {span.span_id for span in everything if span.name == "timeline"}
    assert roots and all(step.parent_span_id in roots for step in spans)  # every window's root written
    reports = [span for span in everything if span.name == "request.steps"]
    assert len(reports) == SMALL_WORKLOAD.requests  # each request reported once
    assert len(everything) == len(spans) + 2 * SMALL_WORKLOAD.requests + len(roots)  # nothing else
    for line in (cwd / "spans.jsonl").read_text().splitlines():
        for resource_spans in json.loads(line)["resourceSpans"]:
            for scope_spans in resource_spans["scopeSpans"]:
                assert scope_spans["scope"]["name"] in ("otel_stepspan", "otel_stepspan.engine")
                for span in scope_spans["spans"]:
                    assert not span.get("events")


def test_every_request_has_its_span_and_the_steps_that_computed_it(default_run, capsys):
    """The demo traces its requests: one SERVER span each, the root of its trace; each step links
    to every request in its batch, and ``otel-stepspan request <id>`` finds a request's steps:
    its whole prompt in prefill chunks, one decode per output after the first, queued time from
    its own span."""
    cwd, result, spans = default_run
    requests = {s.attributes["request.id"]: s for s in iter_spans(cwd / "spans.jsonl") if s.name == "request"}
    specs = make_workload(SMALL_WORKLOAD)
    assert sorted(requests, key=int) == [str(spec.rid) for spec in specs]
    for span in spans:
        links = span.links
        assert span.attributes["forward.request_links"] == len(links) == span.batch_size
        assert span.attributes["forward.recomputes"] == 0  # the reference engine never preempts
        assert sum(link.attributes["forward.request.tokens"] for link in links) == span.num_tokens
    for spec in specs:
        assert cli_main(["request", str(spec.rid), "--file", str(cwd / "spans.jsonl"), "--json"]) == 0
        report = json.loads(capsys.readouterr().out)
        phases = {p["work"]: p for p in report["phases"]}
        assert phases["prefill"]["tokens"] == spec.prompt_len
        assert phases.get("decode", {"steps": 0})["steps"] == spec.max_new_tokens - 1
        assert report["tokens"] == spec.prompt_len + spec.max_new_tokens - 1
        assert report["trace_id"] == requests[str(spec.rid)].trace_id and report["queued_ms"] >= 0
    assert "otel-stepspan request " in result.stdout


def test_with_otel_variables_the_spans_also_reach_the_collector(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "steps.jsonl").write_text("not spans from this run\n")  # a rerun replaces the file
    with OtlpReceiver("grpc") as receiver:
        result = run_demo(
            tmp_path,
            *SMALL,
            "--no-profiler",
            "--quiet",
            "--out-dir",
            "out",
            "--spans-file",
            "steps.jsonl",
            env={"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint, "OTEL_SERVICE_NAME": "demo-on-the-wire"},
        )
        local = list(iter_spans(out / "steps.jsonl"))  # the steps and the requests' own spans
        received = receiver.wait_for_spans(len(local), timeout_s=10)
    assert result.stdout == ""  # --quiet
    assert not (tmp_path / "trace.json").exists() and not (out / "trace.json").exists()  # --no-profiler
    assert len(received) == len(local) > 0
    assert sorted((s.span_id, s.name) for s in received) == sorted((s.span_id, s.name) for s in local)
    assert sum(1 for s in received if s.name == "request") == SMALL_WORKLOAD.requests
    assert {s.resource["service.name"] for s in received} == {s.service for s in local} == {"demo-on-the-wire"}


def test_a_gzip_trace_file_name_writes_a_compressed_trace(tmp_path):
    tiny = ["--requests", "2", "--rate", "inf", "--prompt-len", "8", "--output-len", "3"]
    run_demo(tmp_path, *tiny, "--trace-file", "t.json.gz", "--quiet")
    names = [e["name"] for e in trace_step_events(tmp_path / "t.json.gz")]
    assert names == [s.name for s in sorted(iter_step_spans(tmp_path / "spans.jsonl"), key=lambda s: s.start_ns)]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--requests", "0"], "--requests: '0' must be at least 1"),
        (["--rate", "fast"], "--rate: 'fast' is not a number"),
        (["--rate", "-2"], "--rate: '-2' must be > 0"),
        (["--device", "tpu"], "--device: invalid choice: 'tpu'"),
        (["--length-dist", "normal"], "--length-dist: invalid choice"),
        (["--chunk-size", "x"], "--chunk-size: 'x' is not an integer"),
        (["--max-batch", "32", "--token-budget", "16"], "--token-budget (16) must be at least --max-batch (32)"),
    ],
)
def test_bad_flags_are_argparse_errors(argv, message, capsys):
    try:
        status = demo.main(argv)
    except SystemExit as exc:
        status = exc.code
    assert status == 2
    err = capsys.readouterr().err
    assert "usage:" in err and message in err


def test_help_explains_every_flag(capsys):
    with pytest.raises(SystemExit) as exc:
        demo.main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for flag in (
        "--requests", "--rate", "--prompt-len", "--output-len", "--length-dist", "--max-batch", "--token-budget",
        "--chunk-size", "--no-mixed", "--device", "--threads", "--seed", "--out-dir", "--trace-file", "--spans-file",
        "--no-profiler", "--quiet",
    ):
        assert flag in text


def test_the_cli_demo_subcommand_takes_the_same_flags(capsys):
    cli = pytest.importorskip("otel_stepspan.cli.main")
    assert cli.main(["demo", "--help"]) == 0
    assert "--token-budget" in capsys.readouterr().out
    assert cli.main(["demo", "--max-batch", "8", "--token-budget", "4"]) == 2
    assert "--token-budget (4) must be at least --max-batch (8)" in capsys.readouterr().err


def test_a_provider_set_before_the_demo_keeps_its_exporters_and_gains_the_file(memory_spans, tmp_path, capsys):
    """As under ``opentelemetry-instrument``: the demo adds its file to the process's provider;
    two runs in one process each write their own steps only."""
    threads = torch.get_num_threads()
    try:
        counts = []
        for name in ("first.jsonl", "second.jsonl"):
            argv = ["--requests", "3", "--rate", "inf", "--output-len", "4", "--no-profiler", "--quiet"]
            assert demo.main([*argv, "--out-dir", str(tmp_path), "--spans-file", name]) == 0
            counts.append(len(list(iter_step_spans(tmp_path / name))))
    finally:
        torch.set_num_threads(threads)
    assert min(counts) > 0
    assert len(memory_spans.spans()) == sum(counts)
    assert "warning" not in capsys.readouterr().err  # the first run's closed file is out of the way
