"""``otel-stepspan run -- CMD``: instrumentation in the command and in every Python process it
spawns, with no code change, configured only by OTEL_* variables.

The command is a small engine stand-in: a ``sglang.srt.model_executor.model_runner`` package
written to tmp_path (``ModelRunner.forward`` with sglang's real signature), driven from a worker
started with multiprocessing ``spawn``, as sglang starts its scheduler processes. Spans are
exported by the SDK's console exporter (OTEL_TRACES_EXPORTER=console) to the worker's stdout.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

MODEL_RUNNER = '''
class ModelRunner:
    """Stand-in for sglang's ModelRunner: only what the instrumentation reads."""

    def __init__(self):
        self.forward_pass_id = 0
        self.tp_rank = 0

    def forward(self, forward_batch, skip_attn_backend_init=None, pp_proxy_tensors=None,
                reinit_attn_backend=False, split_forward_count=1):
        self.forward_pass_id += 1
        return "logits"
'''

CHILD = '''
import enum
import multiprocessing
import os
import signal
import sys
import time

sys.path.insert(0, sys.argv[1])  # where the stand-in sglang package lives


class ForwardMode(enum.IntEnum):
    EXTEND = 1
    DECODE = 2


class ForwardBatch:
    forward_mode = ForwardMode.DECODE
    batch_size = 3
    extend_seq_lens_cpu = None
    extend_num_tokens = None
    spec_info = None


def worker():
    from sglang.srt.model_executor.model_runner import ModelRunner

    runner = ModelRunner()
    result = runner.forward(ForwardBatch(), skip_attn_backend_init=False)
    instrumented = hasattr(ModelRunner.forward, "__wrapped__")
    print(f"worker pid={os.getpid()} result={result} instrumented={instrumented}", flush=True)


if __name__ == "__main__":
    mode = sys.argv[2]
    print(f"main pid={os.getpid()}", flush=True)
    if mode == "wait-for-sigterm":
        signal.signal(signal.SIGTERM, lambda *a: (print("child got SIGTERM", flush=True), sys.exit(42)))
        print("ready", flush=True)
        time.sleep(60)
        sys.exit(1)
    if mode == "sleep":
        print("ready", flush=True)
        time.sleep(60)
        sys.exit(1)
    process = multiprocessing.get_context("spawn").Process(target=worker)
    process.start()
    process.join()
    sys.exit(int(mode) if process.exitcode == 0 else 99)
'''


@pytest.fixture
def engine(tmp_path):
    """(child script, directory holding the stand-in sglang package)."""
    packages = tmp_path / "site"
    runner_dir = packages / "sglang" / "srt" / "model_executor"
    runner_dir.mkdir(parents=True)
    for package in (packages / "sglang", packages / "sglang" / "srt", runner_dir):
        (package / "__init__.py").write_text("")
    (runner_dir / "model_runner.py").write_text(textwrap.dedent(MODEL_RUNNER))
    child = tmp_path / "child.py"
    child.write_text(textwrap.dedent(CHILD))
    return child, packages


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_") and k != "PYTHONPATH"}
    env.update({"OTEL_TRACES_EXPORTER": "console", "OTEL_SERVICE_NAME": "run-test", "PYTHONUNBUFFERED": "1"})
    env.update(extra)
    return env


RUN = [sys.executable, "-m", "otel_stepspan.cli", "run"]


def _step_spans(stdout: str) -> list[dict]:
    """The console exporter's JSON objects that are step spans."""
    decoder = json.JSONDecoder()
    spans, index = [], 0
    while True:
        start = stdout.find("{", index)
        if start < 0:
            return spans
        try:
            obj, end = decoder.raw_decode(stdout, start)
        except json.JSONDecodeError:
            index = start + 1
            continue
        if isinstance(obj, dict) and "forward.mode" in (obj.get("attributes") or {}):
            spans.append(obj)
        index = end


def test_run_instruments_a_spawned_worker_through_otel_env_only(engine):
    child, packages = engine
    result = subprocess.run(
        RUN + ["--", sys.executable, str(child), str(packages), "0"],
        env=_env(), capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    worker = re.search(r"worker pid=(\d+) result=logits instrumented=True", result.stdout)
    assert worker, result.stdout + result.stderr
    main_pid = int(re.search(r"main pid=(\d+)", result.stdout).group(1))
    (span,) = _step_spans(result.stdout)
    assert span["name"] == "step[decode bs=3]"
    assert span["kind"] == "SpanKind.INTERNAL"
    assert span["attributes"]["forward.batch_size"] == 3
    assert span["attributes"]["forward.pass_id"] == 1
    assert span["attributes"]["engine.name"] == "sglang"
    assert span["resource"]["attributes"]["service.name"] == "run-test"
    # exported by the spawned worker, not by the process run started
    assert span["resource"]["attributes"]["process.pid"] == int(worker.group(1)) != main_pid
    # the one-line note on stderr
    notes = [line for line in result.stderr.splitlines() if line.startswith("otel-stepspan run:")]
    assert len(notes) == 1
    assert "sglang" in notes[0] and "console" in notes[0] and "'run-test'" in notes[0]


def test_without_run_nothing_is_instrumented(engine):
    child, packages = engine
    result = subprocess.run(
        [sys.executable, str(child), str(packages), "0"], env=_env(), capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "result=logits instrumented=False" in result.stdout
    assert _step_spans(result.stdout) == []
    assert "step[decode" not in result.stdout


@pytest.mark.parametrize("extra", [[], ["--no-exec"]], ids=["exec", "no-exec"])
def test_exit_status_is_the_commands(engine, extra):
    child, packages = engine
    result = subprocess.run(
        RUN + extra + ["-q", "--", sys.executable, str(child), str(packages), "3"],
        env=_env(), capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 3, result.stderr
    assert "instrumented=True" in result.stdout
    assert "otel-stepspan run:" not in result.stderr  # -q


def test_exec_makes_run_the_command_itself(engine):
    """Default mode: the command replaces run, so signals reach it directly."""
    child, packages = engine
    process = subprocess.Popen(
        RUN + ["--", sys.executable, str(child), str(packages), "wait-for-sigterm"],
        env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert process.stdout.readline().strip() == f"main pid={process.pid}"
        assert process.stdout.readline().strip() == "ready"
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 42
        assert "child got SIGTERM" in process.stdout.read()
    finally:
        process.kill()
        process.wait()


def test_no_exec_forwards_sigterm_and_propagates_the_status(engine):
    child, packages = engine
    process = subprocess.Popen(
        RUN + ["--no-exec", "--", sys.executable, str(child), str(packages), "wait-for-sigterm"],
        env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        line = process.stdout.readline().strip()
        assert line.startswith("main pid=") and line != f"main pid={process.pid}"  # a real child
        assert process.stdout.readline().strip() == "ready"
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 42
        assert "child got SIGTERM" in process.stdout.read()
    finally:
        process.kill()
        process.wait()


def test_no_exec_dies_of_the_signal_that_killed_the_command(engine):
    child, packages = engine
    process = subprocess.Popen(
        RUN + ["--no-exec", "--", sys.executable, str(child), str(packages), "sleep"],
        env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        child_pid = int(process.stdout.readline().strip().split("=")[1])
        assert process.stdout.readline().strip() == "ready"
        os.kill(child_pid, signal.SIGKILL)
        assert process.wait(timeout=30) == -signal.SIGKILL
    finally:
        process.kill()
        process.wait()


def test_chains_to_the_sitecustomize_that_would_have_run(engine, tmp_path):
    """Another sitecustomize on PYTHONPATH (as opentelemetry-instrument installs one) still runs,
    once per process, and instrumentation stays on even when that one fails."""
    child, packages = engine
    other = tmp_path / "other_site"
    other.mkdir()
    (other / "sitecustomize.py").write_text(
        "import os, sys\n"
        "print(f'other sitecustomize pid={os.getpid()}', flush=True)\n"
        "if os.environ.get('OTHER_FAILS'):\n"
        "    raise RuntimeError('other sitecustomize failed')\n"
    )
    # --no-exec: otel-stepspan itself (which also imports the user's sitecustomize) keeps a pid
    # of its own, so each process can be counted.
    result = subprocess.run(
        RUN + ["--no-exec", "--", sys.executable, str(child), str(packages), "0"],
        env=_env(PYTHONPATH=str(other)), capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    main_pid = re.search(r"main pid=(\d+)", result.stdout).group(1)
    worker_pid = re.search(r"worker pid=(\d+) result=logits instrumented=True", result.stdout).group(1)
    ran_in = re.findall(r"other sitecustomize pid=(\d+)", result.stdout)
    assert ran_in.count(main_pid) == 1 and ran_in.count(worker_pid) == 1
    assert len(ran_in) == len(set(ran_in))  # never twice in one process
    assert [s["name"] for s in _step_spans(result.stdout)] == ["step[decode bs=3]"]

    failing = subprocess.run(
        RUN + ["-q", "--", sys.executable, str(child), str(packages), "0"],
        env=_env(PYTHONPATH=str(other), OTHER_FAILS="1"), capture_output=True, text=True, timeout=120,
    )
    assert failing.returncode == 0, failing.stderr
    assert "error in the chained sitecustomize" in failing.stderr
    assert "other sitecustomize failed" in failing.stderr
    assert [s["name"] for s in _step_spans(failing.stdout)] == ["step[decode bs=3]"]


def test_run_keeps_pythonpath_and_bootstrap_comes_first():
    from otel_stepspan.cli.run import BOOTSTRAP_DIR, child_environment

    env = child_environment({"PYTHONPATH": os.pathsep.join(["/a", BOOTSTRAP_DIR, "/b"])}, endpoint="http://h:4317")
    assert env["PYTHONPATH"].split(os.pathsep) == [BOOTSTRAP_DIR, "/a", "/b"]
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://h:4317"
    assert child_environment({})["PYTHONPATH"] == BOOTSTRAP_DIR
    assert (Path(BOOTSTRAP_DIR) / "sitecustomize.py").is_file()


def test_usage_errors(capsys):
    from otel_stepspan.cli.main import main

    assert main(["run"]) == 2
    assert "no command given" in capsys.readouterr().err
    assert main(["run", "--", "/no/such/command-xyz"]) == 127
    assert "command not found" in capsys.readouterr().err


def test_console_script_is_installed(engine):
    script = Path(sys.executable).with_name("otel-stepspan")
    if not script.exists():
        pytest.skip("otel-stepspan console script not installed next to this interpreter")
    child, packages = engine
    result = subprocess.run(
        [str(script), "run", "--", sys.executable, str(child), str(packages), "5"],
        env=_env(), capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 5, result.stderr
    assert "instrumented=True" in result.stdout


# -- demo: delegated to otel_stepspan.engine.demo ------------------------------------------------


def test_demo_delegates_flags_and_exit_status(monkeypatch, capsys):
    import types

    from otel_stepspan.cli.main import main

    seen = {}
    fake = types.ModuleType("otel_stepspan.engine.demo")

    def add_arguments(parser):
        parser.add_argument("--steps", type=int, default=5, help="how many steps")

    def run(args):
        seen["steps"] = args.steps
        return 7

    fake.add_arguments, fake.run = add_arguments, run
    monkeypatch.setitem(sys.modules, "otel_stepspan.engine.demo", fake)
    assert main(["demo", "--steps", "12"]) == 7
    assert seen == {"steps": 12}
    assert main(["demo", "--help"]) == 0
    assert "--steps" in capsys.readouterr().out


def test_demo_missing_engine_is_a_clear_error(monkeypatch, capsys):
    from otel_stepspan.cli.main import main

    monkeypatch.setitem(sys.modules, "otel_stepspan.engine.demo", None)  # as if not installed
    assert main(["demo"]) == 2
    assert "reference engine (otel_stepspan.engine.demo) is not part of this installation" in capsys.readouterr().err
