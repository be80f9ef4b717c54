"""An engine that changed under the integration is loud: the WARNING line when a patch point is
missing or reshaped, and ``otel-stepspan doctor``'s report and exit status.

Stand-in modules check the rules; the engines' real environments (when built) check the real
sglang and vLLM sources and classes, with a patch point removed and one reshaped.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest

import sglang_fakes as fakes
from otel_stepspan.integrations import _instrumentor, sglang
from otel_stepspan.integrations._patch_points import PatchPoint, problem_in_source
from otel_stepspan.integrations.sglang import SGLangInstrumentor
from otel_stepspan.testing.otlp_receiver import OtlpReceiver

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))


@pytest.fixture
def fresh_warnings(monkeypatch, caplog):
    monkeypatch.setattr(_instrumentor, "_drift_reported", set())
    caplog.set_level(logging.WARNING, logger="otel_stepspan")
    return caplog


@pytest.fixture
def runner_module():
    module = fakes.install_model_runner_module()
    sys.modules["sglang"].__version__ = "0.5.22"
    yield module
    SGLangInstrumentor().uninstrument()
    fakes.remove_model_runner_module()


def _drift_lines(caplog) -> list[str]:
    """The lines about patch points (not the one about the version)."""
    return [r.getMessage() for r in caplog.records
            if "otel-stepspan doctor" in r.getMessage() and "is outside the range" not in r.getMessage()]


def test_a_missing_forward_warns_once_with_engine_version_target_and_loss(runner_module, fresh_warnings):
    runner_module.ModelRunner = type("ModelRunner", (), {"forward_step": fakes.ModelRunner.forward})  # renamed
    SGLangInstrumentor().instrument(skip_dep_check=True)
    SGLangInstrumentor().uninstrument()
    SGLangInstrumentor().instrument(skip_dep_check=True)  # a second instrument says nothing new
    lines = [line for line in _drift_lines(fresh_warnings) if "ModelRunner.forward" in line]
    assert lines == [
        "otel_stepspan: sglang 0.5.22: sglang.srt.model_executor.model_runner.ModelRunner.forward is "
        "missing, so sglang's forwards get no step span (no label in the profiler, no OTel span) "
        "(tested: sglang >= 0.5.21, < 0.5.24; `otel-stepspan doctor` checks every patch point)"
    ]
    assert not sglang.is_instrumented()


def test_a_reshaped_forward_is_left_alone_and_named(runner_module, fresh_warnings):
    def forward(self, batch, *args):  # the batch under another name: the wrapper would misread it
        return "untouched"

    runner_module.ModelRunner.forward = forward
    SGLangInstrumentor().instrument(skip_dep_check=True)
    assert runner_module.ModelRunner.forward is forward
    (line,) = [line for line in _drift_lines(fresh_warnings) if "ModelRunner.forward" in line]
    assert "takes (self, batch, *args) where the wrapper reads (self, forward_batch, ...)" in line


def test_names_an_older_release_lacks_are_not_drift(runner_module, fresh_warnings):
    sys.modules["sglang"].__version__ = "0.5.9"  # before sglang's own step range (0.5.11)
    SGLangInstrumentor().instrument(skip_dep_check=True)
    assert sglang.is_instrumented()
    assert not [line for line in _drift_lines(fresh_warnings) if "profile_range" in line or "build_step" in line]
    sys.modules["sglang"].__version__ = "0.5.22"
    SGLangInstrumentor().uninstrument()
    fresh_warnings.clear()
    SGLangInstrumentor().instrument(skip_dep_check=True)  # 0.5.22 has them
    assert {line.split(": ")[2].split(" ")[0] for line in _drift_lines(fresh_warnings)} == {
        f"{sglang.MODULE}.{sglang.STEP_NAME}", f"{sglang.MODULE}.{sglang.STEP_RANGE}"}


def test_instrumenting_without_the_check_says_when_the_version_is_untested(runner_module, fresh_warnings):
    sys.modules["sglang"].__version__ = "0.7.1"
    SGLangInstrumentor().instrument(skip_dep_check=True)  # as `otel-stepspan run` does
    assert sglang.is_instrumented()  # it goes on
    assert any("sglang 0.7.1 is outside the range" in r.getMessage() and "sglang >= 0.5.21, < 0.5.24" in r.getMessage()
               for r in fresh_warnings.records)


# -- the same check on source text -------------------------------------------------------------

_RUNNER_SOURCE = '''
from x.utils import profile_range
def build_step_span_name(batch):
    return ""
class ModelRunner:
    def forward(self, forward_batch, skip=None):
        pass
'''


@pytest.mark.parametrize(
    "edit, problem",
    [
        (lambda s: s, None),
        (lambda s: s.replace("def forward", "def forward_step"), "is missing"),
        (lambda s: s.replace("forward_batch,", "batch,"), "takes (self, batch, skip) where the wrapper reads (self, forward_batch, ...)"),
        (lambda s: s.replace("class ModelRunner", "class Runner"), "is missing"),
    ],
)
def test_source_check_finds_what_the_loaded_check_finds(edit, problem):
    point = PatchPoint(sglang.MODULE, sglang.METHOD, sglang.traced_forward, "x", params=("self", "forward_batch"))
    assert problem_in_source(point, edit(_RUNNER_SOURCE)) == problem
    module = types.ModuleType("m")
    exec(edit(_RUNNER_SOURCE).replace("from x.utils import profile_range", "profile_range = None"), module.__dict__)
    from otel_stepspan.integrations._patch_points import problem_in_module

    assert problem_in_module(point, module) == problem


def test_source_check_sees_imported_module_level_names():
    point = PatchPoint(sglang.MODULE, sglang.STEP_RANGE, sglang.range_unless_unnamed, "x")
    assert problem_in_source(point, _RUNNER_SOURCE) is None
    assert problem_in_source(point, _RUNNER_SOURCE.replace("import profile_range", "import other")) == "is missing"


# -- the command ---------------------------------------------------------------------------------


def _fake_sglang(root: Path, version: str, forward_params: str = "self, forward_batch") -> Path:
    """An installed-looking sglang (its files and dist-info) that only ``doctor`` reads."""
    def write(relative: str, text: str) -> None:
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))

    write("sglang/__init__.py", "raise ImportError('needs a GPU')\n")  # doctor must not import it
    write("sglang/srt/model_executor/model_runner.py", f"""
        from sglang.srt.utils import profile_range
        from sglang.srt.model_executor.step_span_utils import build_step_span_name
        class ModelRunner:
            def forward({forward_params}, pp_proxy_tensors=None):
                pass
        """)
    write("sglang/srt/model_executor/forward_batch_info.py", """
        class ForwardBatch:
            @classmethod
            def init_new(cls, batch, model_runner):
                pass
        """)
    write("sglang/srt/managers/scheduler.py", """
        class Scheduler:
            def __init__(self, server_args):
                pass
        """)
    write(f"sglang-{version}.dist-info/METADATA", f"Metadata-Version: 2.1\nName: sglang\nVersion: {version}\n")
    write(f"sglang-{version}.dist-info/top_level.txt", "sglang\n")
    return root


def _doctor(pythonpath: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    environ.update(env, PYTHONPATH=os.pathsep.join([str(pythonpath), str(ROOT)]))
    return subprocess.run([sys.executable, "-m", "otel_stepspan.cli", "doctor", *args],
                          env=environ, capture_output=True, text=True, timeout=120)


def test_doctor_finds_every_patch_point_and_a_collector_that_answers(tmp_path):
    with OtlpReceiver() as receiver:
        result = _doctor(_fake_sglang(tmp_path, "0.5.23"), "--engine", "sglang",
                         OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{receiver.port}")
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "sglang 0.5.23: inside the tested range (sglang >= 0.5.21, < 0.5.24)"
    assert f"  found    {sglang.MODULE}.{sglang.METHOD}" in lines
    # The speculative runners are in modules this release does not ship.
    assert sum(line.startswith("  -        ") for line in lines) == len(sglang.GRAPH_REPLAYS) + 2
    assert lines[-2].startswith("spans go to: exporter process: OTLP grpc at http://127.0.0.1:")
    assert lines[-1].startswith("collector: answers: accepted an empty export in ")


def test_doctor_exit_status_says_what_is_off(tmp_path):
    reshaped = _doctor(_fake_sglang(tmp_path / "a", "0.5.23", "self, batch"), "--engine", "sglang", "--json")
    assert reshaped.returncode == 1
    report = json.loads(reshaped.stdout)
    (engine,) = report["engines"]
    problems = {p["target"]: p["problem"] for p in engine["points"] if not p["ok"]}
    assert problems == {f"{sglang.MODULE}.{sglang.METHOD}":
                        "takes (self, batch, pp_proxy_tensors) where the wrapper reads (self, forward_batch, ...)"}
    assert report["export"]["where"] == "off" and report["export"]["ok"]

    untested = _doctor(_fake_sglang(tmp_path / "b", "0.6.0"), "--engine", "sglang")
    assert untested.returncode == 1
    assert untested.stdout.startswith("sglang 0.6.0: OUTSIDE the tested range")

    no_collector = _doctor(_fake_sglang(tmp_path / "c", "0.5.23"), "--engine", "sglang",
                           OTEL_EXPORTER_OTLP_ENDPOINT="http://127.0.0.1:9", OTEL_EXPORTER_OTLP_PROTOCOL="http/protobuf")
    assert no_collector.returncode == 1
    assert "collector: DOES NOT ANSWER: ConnectionError" in no_collector.stdout

    nothing = _doctor(tmp_path / "empty", "--engine", "vllm")
    assert nothing.returncode == 1
    assert "no supported engine (sglang, vllm) is importable here" in nothing.stderr


# -- the real engines ----------------------------------------------------------------------------


def _engine_python(name: str) -> Path:
    import engine_envs

    if not engine_envs.is_built(name):
        pytest.skip(f"the {name} environment is not built: python3 scripts/engine_envs.py build {name}")
    return engine_envs.python_of(name)


_REAL_DRIFT = """
import json, logging, sys
records = []
class Keep(logging.Handler):
    def emit(self, record):
        records.append(record.getMessage())
logging.getLogger("otel_stepspan").addHandler(Keep())
from importlib import import_module
from otel_stepspan.integrations import {engine} as integration
from otel_stepspan.integrations._patch_points import problem_in_source
from otel_stepspan.cli.doctor import check_engine, module_file
removed, reshaped = [p for p in integration.patch_points() if p.params][{pick}]
doctor = [[p.target, p.ok, p.how] for p in check_engine("{engine}").points]
doctor_import = [[p.target, p.ok, p.how] for p in check_engine("{engine}", by_import=True).points]
owner_removed = import_module(removed.module)
owner_reshaped = import_module(reshaped.module)
cls_r, _, name_r = removed.target.rpartition(".")
cls_s, _, name_s = reshaped.target.rpartition(".")
delattr(getattr(owner_removed, cls_r), name_r)
setattr(getattr(owner_reshaped, cls_s), name_s, lambda self, x, *a, **k: None)
integration.{instrumentor}().instrument()
source = open(module_file(removed.module)).read()
print(json.dumps({{
    "lines": [r for r in records if "otel-stepspan doctor" in r],
    "removed": removed.where, "reshaped": reshaped.where,
    "doctor": doctor, "doctor_import": doctor_import,
    "source_without": problem_in_source(removed, source.replace("def " + name_r + "(", "def renamed_" + name_r + "(")),
}}))
"""


@pytest.mark.engines
@pytest.mark.parametrize("engine, instrumentor, pick", [
    ("sglang", "SGLangInstrumentor", "0:2"),  # ModelRunner.forward, a draft graph runner's execute
    ("vllm", "VLLMInstrumentor", "3:0:-2"),  # Model Runner V2's execute_model, then V1's
])
def test_a_real_engine_class_changed_under_the_integration(engine, instrumentor, pick):
    python = _engine_python(engine)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "PYTHONPATH", "VLLM_"))}
    result = subprocess.run([str(python), "-c", _REAL_DRIFT.format(engine=engine, instrumentor=instrumentor, pick=pick)],
                            env=dict(env, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1"),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(result.stdout.splitlines()[-1])
    assert len(report["lines"]) == 2, report["lines"]
    removed_line, reshaped_line = sorted(report["lines"], key=lambda line: report["removed"] not in line)
    assert f"{report['removed']} is missing, so " in removed_line
    assert f"{report['reshaped']} takes (self, x, *a, **k) where the wrapper reads" in reshaped_line
    assert all(line.startswith(f"otel_stepspan: {engine} ") for line in report["lines"])
    # Before the change, doctor found every point, from source and imported.
    assert all(ok for _, ok, _ in report["doctor"]), report["doctor"]
    assert all(ok for _, ok, _ in report["doctor_import"]), report["doctor_import"]
    assert {how for _, _, how in report["doctor_import"]} <= {"import", "absent"}
    assert report["source_without"] == "is missing"
