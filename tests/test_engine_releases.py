"""The declared range of each integration is the range tested: every release listed in
scripts/engine_releases.py has each patch point (with the parameters its wrapper reads) in its
own source, and the declared ``_instruments`` range holds exactly those releases."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from otel_stepspan.integrations import sglang, vllm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import engine_releases  # noqa: E402

INTEGRATIONS = {"sglang": sglang, "vllm": vllm}
CASES = [(engine, version) for engine, versions in engine_releases.RELEASES.items() for version in versions]


@pytest.mark.engines
@pytest.mark.parametrize("engine, version", CASES, ids=[f"{e}-{v}" for e, v in CASES])
def test_every_patch_point_is_in_the_releases_source(engine, version):
    reports = engine_releases.check_release(engine, version)
    assert [(r.target, r.problem) for r in reports if not r.ok] == []
    # The points every release must have were read from the wheel, not passed as absent.
    points = INTEGRATIONS[engine].patch_points()
    assert [r.how for r, p in zip(reports, points) if not p.optional_module] == ["source"] * sum(
        not p.optional_module for p in points)


@pytest.mark.parametrize("engine", sorted(engine_releases.RELEASES))
def test_the_declared_range_is_the_tested_releases(engine):
    (requirement,) = INTEGRATIONS[engine]._instruments
    specifier = Requirement(requirement).specifier
    tested = [Version(v) for v in engine_releases.RELEASES[engine]]
    assert all(specifier.contains(v) for v in tested)
    first, last = min(tested), max(tested)
    below = Version(f"{first.major}.{first.minor}.{first.micro - 1}") if first.micro else Version(f"{first.major}.{first.minor - 1}.99")
    next_minor = Version(f"{last.major}.{last.minor + 1}.0")
    next_micro = Version(f"{last.major}.{last.minor}.{last.micro + 1}")
    assert not specifier.contains(below)
    # Past the last release tested: a new micro release of sglang, a new minor one of vLLM (whose
    # micro releases are fixes of the same code) is outside.
    assert not specifier.contains(next_micro if engine == "sglang" else next_minor)


def test_a_release_missing_a_patch_point_is_reported(tmp_path, monkeypatch):
    """The check itself: a wheel whose runner lost ``forward`` fails, naming it."""
    import zipfile

    wheel = tmp_path / "sglang-0.5.22-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("sglang/srt/model_executor/model_runner.py", "class ModelRunner:\n    def run(self, forward_batch):\n        pass\n")
    monkeypatch.setenv("OTEL_STEPSPAN_RELEASES_DIR", str(tmp_path))
    problems = {r.target: r.problem for r in engine_releases.check_release("sglang", "0.5.22") if not r.ok}
    assert problems[f"{sglang.MODULE}.{sglang.METHOD}"] == "is missing"
    assert problems[f"{sglang.BATCH_MODULE}.{sglang.INIT_NEW}"] == "is missing (no such module)"
