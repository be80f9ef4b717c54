"""Step spans in every Python process started under ``otel-stepspan run``.

``otel-stepspan run`` puts this file's directory first on ``PYTHONPATH``. Python imports
``sitecustomize`` at start-up (unless ``-S`` or ``-I``), in the command itself and in every
Python process it starts, spawned engine workers included, since they inherit the environment.
Here we:

1. chain to the ``sitecustomize`` that Python would have imported without us (the next one on
   ``sys.path``; ``opentelemetry-instrument`` uses the same mechanism, so running one under the
   other keeps both), with our directory out of ``sys.path`` meanwhile, so a chained module that
   chains in turn cannot find us again;
2. install the engine instrumentors (sglang, vLLM), which patch only when the engine's own
   module is imported: a process that never loads a model pays an import and a hook.

Nothing here may break the process: every failure is one line on stderr, then start-up goes on.
Only the standard library is used at top level, so an interpreter without otel_stepspan
installed still starts (uninstrumented, and says so).
"""

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
_DONE_KEY = "_otel_stepspan_bootstrap_done"


def _warn(message):
    try:
        sys.stderr.write("otel_stepspan: %s\n" % message)
    except Exception:
        pass


def _same_dir(entry):
    try:
        return os.path.abspath(entry or os.curdir) == _HERE
    except Exception:
        return False


def _chain():
    """Import the next ``sitecustomize`` on ``sys.path``, as Python itself would have."""
    import importlib.machinery
    import importlib.util

    ours = sys.modules.get("sitecustomize")
    saved_path = list(sys.path)
    sys.path[:] = [entry for entry in saved_path if not _same_dir(entry)]
    try:
        spec = importlib.machinery.PathFinder.find_spec("sitecustomize", sys.path)
        if spec is None or spec.loader is None:
            return
        module = importlib.util.module_from_spec(spec)
        sys.modules["sitecustomize"] = module
        try:
            spec.loader.exec_module(module)
        except Exception as exc:  # what site.py does for a failing sitecustomize
            _warn("error in the chained sitecustomize %s: %s: %s" % (spec.origin, type(exc).__name__, exc))
    finally:
        # Keep what the chained module did to sys.path; put our entries back where they were.
        restored = list(sys.path)
        for index, entry in enumerate(saved_path):
            if _same_dir(entry):
                restored.insert(min(index, len(restored)), entry)
        sys.path[:] = restored
        if ours is not None:
            sys.modules["sitecustomize"] = ours


_INSTRUMENTORS = (
    ("otel_stepspan.integrations.sglang", "SGLangInstrumentor"),
    ("otel_stepspan.integrations.vllm", "VLLMInstrumentor"),
)


def _import_otel_stepspan():
    """otel_stepspan as this interpreter finds it; else the copy this file belongs to (as for a
    script that imports it from a source checkout and calls ``instrument()``): that package alone
    is loaded from its folder, nothing else of its environment."""
    try:
        import otel_stepspan  # noqa: F401

        return
    except ImportError:
        pass
    import importlib.util

    package_dir = os.path.dirname(os.path.dirname(_HERE))
    spec = importlib.util.spec_from_file_location(
        "otel_stepspan", os.path.join(package_dir, "__init__.py"), submodule_search_locations=[package_dir]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["otel_stepspan"] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules["otel_stepspan"]
        raise


def _instrument():
    try:
        _import_otel_stepspan()
    except Exception as exc:
        _warn(
            "not instrumenting %s: cannot import otel_stepspan (%s); install it into this "
            "interpreter's environment" % (sys.executable, exc)
        )
        return
    import importlib

    for module_name, class_name in _INSTRUMENTORS:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name == module_name:
                continue  # an integration this version does not ship
            _warn("%s not available: %s" % (class_name, exc))
            continue
        except Exception as exc:
            _warn("%s not available: %s: %s" % (class_name, type(exc).__name__, exc))
            continue
        try:
            instrumentor = getattr(module, class_name)()
            if not getattr(instrumentor, "is_instrumented_by_opentelemetry", False):
                instrumentor.instrument(skip_dep_check=True)
        except Exception as exc:
            _warn("%s failed: %s: %s" % (class_name, type(exc).__name__, exc))


def _main():
    if sys.modules.get(_DONE_KEY) is not None:
        return  # imported a second time (a chained sitecustomize re-importing): done already
    sys.modules[_DONE_KEY] = sys.modules[__name__]
    try:
        _chain()
    except Exception as exc:
        _warn("could not chain to the next sitecustomize: %s: %s" % (type(exc).__name__, exc))
    try:
        _instrument()
    except Exception as exc:
        _warn("instrumentation failed: %s: %s" % (type(exc).__name__, exc))


_main()
