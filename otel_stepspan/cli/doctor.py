"""``otel-stepspan doctor``: will this engine, here, give step spans, and where will they go?

A user who upgrades an engine, or moves to a machine with another build, wants to know before
the next incident whether the integration still finds what it patches. ``doctor`` answers
without starting the engine: for each engine installed, its version against the range this
release was tested with, and each patch point found or not; it reads the modules' source
(``--import`` imports them for real instead), so a GPU build can be checked on a machine
without a GPU. Then where step spans would go with the current ``OTEL_*`` variables, and
whether the Collector there answers an (empty) OTLP export.

Exit status 0 when everything checked is fine, 1 when something is off (a patch point missing,
a version outside the tested range, export configured but the Collector not answering, no
engine installed).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Mapping, Optional, Sequence, TextIO

from ..integrations._instrumentor import installed_versions, module_dependency_conflict
from ..integrations._patch_points import PatchPoint, predates, problem_in_module, problem_in_source

ENGINES = ("sglang", "vllm")


@dataclass
class PointReport:
    target: str
    ok: bool
    problem: str = ""
    loses: str = ""
    how: str = "source"  # "source", "import", or "absent" (a module this release does not ship)


@dataclass
class EngineReport:
    engine: str
    installed: bool
    version: str = ""
    tested: str = ""
    in_range: bool = True
    points: list[PointReport] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.installed and self.in_range and all(p.ok for p in self.points)


def _integration(engine: str) -> tuple[Sequence[PatchPoint], Sequence[str]]:
    """The integration's patch points and its tested range (its ``_instruments``)."""
    module = importlib.import_module(f"otel_stepspan.integrations.{engine}")
    return module.patch_points(), module._instruments


def module_file(module_name: str) -> Optional[str]:
    """The source file of ``module_name``, found from its top-level package's folder without
    importing anything (an engine's package ``__init__`` may need a GPU to import)."""
    top, _, rest = module_name.partition(".")
    try:
        spec = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return spec.origin if spec is not None and not rest else None
    for base in spec.submodule_search_locations:
        path = os.path.join(base, *rest.split(".")) if rest else base
        for candidate in (path + ".py", os.path.join(path, "__init__.py")):
            if os.path.isfile(candidate):
                return candidate
    return None


def check_point(point: PatchPoint, by_import: bool) -> PointReport:
    """One patch point of the installed release: found with the parameters its wrapper reads,
    or what is wrong."""
    versions = installed_versions(point.module.split(".")[0])
    if not by_import:
        path = module_file(point.module)
        if path is None:
            return check_source(point, None, versions)
        with open(path, encoding="utf-8") as source:
            return check_source(point, source.read(), versions)
    report = PointReport(point.where, True, loses=point.loses, how="import")
    try:
        module = importlib.import_module(point.module)
    except ModuleNotFoundError as exc:
        if exc.name == point.module and point.optional_module:
            report.how = "absent"
            return report
        report.ok, report.problem = False, f"cannot be imported: {exc}"
        return report
    except Exception as exc:  # an engine's import failing here is a finding, not a crash
        report.ok, report.problem = False, f"cannot be imported: {type(exc).__name__}: {exc}"
        return report
    problem = problem_in_module(point, module)
    if problem is not None and not predates(point, versions):
        report.ok, report.problem = False, problem
    return report


def check_source(point: PatchPoint, source: Optional[str], versions: Sequence[str]) -> PointReport:
    """One patch point checked on its module's source text (None: the release has no such
    module), for a release at ``versions``: installed here, or a downloaded wheel."""
    report = PointReport(point.where, True, loses=point.loses)
    if source is None:
        if point.optional_module:
            report.how = "absent"
            return report
        problem: Optional[str] = "is missing (no such module)"
    else:
        problem = problem_in_source(point, source)
    if problem is not None and not predates(point, versions):
        report.ok, report.problem = False, problem
    return report


def check_engine(engine: str, by_import: bool = False) -> EngineReport:
    points, requirements = _integration(engine)
    tested = "; ".join(requirements)
    if module_file(engine) is None:
        return EngineReport(engine, False, tested=tested)
    versions = installed_versions(engine)
    return EngineReport(
        engine,
        True,
        version=versions[0] if versions else "unknown",
        tested=tested,
        in_range=all(module_dependency_conflict(engine, r) is None for r in requirements),
        points=[check_point(point, by_import) for point in points],
    )


@dataclass
class ExportReport:
    where: str  # "exporter process", "in-process provider", "off"
    detail: str
    endpoint: str = ""
    answers: Optional[bool] = None
    answer: str = ""

    @property
    def ok(self) -> bool:
        return self.answers is not False


def check_export(environ: Mapping[str, str], timeout_s: float) -> ExportReport:
    """Where step spans go with these variables (as the runtime decides when no provider was
    set in the engine's process), and whether the Collector answers an empty OTLP export."""
    from ..exporter.transport import sender_from_environment
    from ..settings import ExportConfigError, exporters_requested, otlp_protocol, read_settings

    settings = read_settings(environ)
    if settings.sdk_disabled:
        return ExportReport("off", "OTEL_SDK_DISABLED is set: no OpenTelemetry spans (profiler ranges only)")
    names = [name for name in exporters_requested(environ) if name != "none"]
    if not names:
        return ExportReport(
            "off",
            "no OTEL_EXPORTER_OTLP_ENDPOINT or OTEL_TRACES_EXPORTER: spans only where the engine sets "
            "up a tracer provider itself (sglang --enable-trace, vLLM --otlp-traces-endpoint; the "
            "exporter process stands in for one that exports OTLP); profiler ranges always",
        )
    if not settings.otlp_only:
        return ExportReport("in-process provider", f"OTEL_TRACES_EXPORTER={','.join(names)}: built in the engine process")
    try:
        protocol = otlp_protocol(environ)
    except ExportConfigError as exc:
        return ExportReport("off", f"the variables cannot be used: {exc}", answers=False, answer=str(exc))
    env = dict(environ)
    env["OTEL_EXPORTER_OTLP_TIMEOUT"] = env["OTEL_EXPORTER_OTLP_TRACES_TIMEOUT"] = str(max(1, int(timeout_s)))
    try:
        sender = sender_from_environment(env)
    except (ExportConfigError, OSError) as exc:
        return ExportReport("exporter process", f"OTLP {protocol}", answers=False, answer=str(exc))
    started = time.monotonic()
    try:
        sent = sender.send(b"")  # an ExportTraceServiceRequest with no spans
    finally:
        sender.close()
    took_ms = (time.monotonic() - started) * 1000
    report = ExportReport("exporter process", f"OTLP {protocol}", endpoint=sender.endpoint)
    report.answers = sent.ok
    report.answer = f"accepted an empty export in {took_ms:.0f} ms" if sent.ok else sent.reason
    return report


def _print(engines: list[EngineReport], export: ExportReport, out: TextIO) -> None:
    for engine in engines:
        if not engine.installed:
            print(f"{engine.engine}: not installed in {sys.executable}", file=out)
            continue
        verdict = "inside the tested range" if engine.in_range else "OUTSIDE the tested range"
        print(f"{engine.engine} {engine.version}: {verdict} ({engine.tested})", file=out)
        for point in engine.points:
            if point.how == "absent":
                print(f"  -        {point.target}  (not in this release; optional)", file=out)
            elif point.ok:
                print(f"  found    {point.target}", file=out)
            else:
                print(f"  PROBLEM  {point.target} {point.problem}: {point.loses}", file=out)
    where = f"{export.where}: {export.detail}"
    print(f"spans go to: {where}" + (f" at {export.endpoint}" if export.endpoint else ""), file=out)
    if export.answers is not None:
        print(f"collector: {'answers' if export.answers else 'DOES NOT ANSWER'}: {export.answer}", file=out)


def run(engine: Optional[str], by_import: bool, as_json: bool, timeout_s: float, out: TextIO = sys.stdout) -> int:
    engines = [check_engine(name, by_import) for name in ([engine] if engine else ENGINES)]
    export = check_export(os.environ, timeout_s)
    if as_json:
        print(json.dumps({
            "engines": [dict(asdict(e), ok=e.ok) for e in engines],
            "export": dict(asdict(export), ok=export.ok),
        }, indent=2), file=out)
    else:
        _print(engines, export, out)
    installed = [e for e in engines if e.installed]
    if not installed:
        print(f"otel-stepspan doctor: no supported engine ({', '.join(ENGINES)}) is importable here", file=sys.stderr)
    return 0 if installed and all(e.ok for e in installed) and export.ok else 1
