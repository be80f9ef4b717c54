"""Patching helpers shared by the engine integrations, in the OpenTelemetry instrumentor style.

Every wrap has its unwrap beside it. A wrap is applied when the engine module is imported
(wrapt's post-import hook), so instrumenting a process that never loads the engine's model
runner imports nothing heavy. The wrapper itself is a plain function made by
:func:`otel_stepspan.runtime.wrap_method` (see there for why not a wrapt proxy); it keeps the
original as ``__wrapped__``, and unpatching puts the original back only if our wrapper is still
the one in place.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, Callable

import wrapt
from opentelemetry.instrumentation.instrumentor import BaseInstrumentor  # noqa: F401  (re-exported)

MakeWrapper = Callable[[Callable[..., Any]], Callable[..., Any]]

_wanted: dict[tuple[str, str], MakeWrapper] = {}
_installed: dict[tuple[str, str], Callable[..., Any]] = {}
_hook_pending: set[tuple[str, str]] = set()


def _owner(module: Any, class_name: str) -> Any:
    """The class named ``class_name`` in ``module`` (the module itself for a module-level name)."""
    owner = module
    for part in filter(None, class_name.split(".")):
        owner = getattr(owner, part)
    return owner


def _apply(module: Any, key: tuple[str, str]) -> None:
    make = _wanted.get(key)
    if make is None:
        return
    class_name, _, method_name = key[1].rpartition(".")
    owner = _owner_or_none(module, class_name)
    original = getattr(owner, method_name, None) if owner is not None else None
    if original is None:
        return  # a release without this class or name: nothing to patch there
    current = owner.__dict__.get(method_name)
    if current is not None and current is _installed.get(key):
        return
    try:
        wrapper = make(original)
    except Exception:  # never break the engine's own import
        logging.getLogger("otel_stepspan").warning("otel_stepspan: could not patch %s", key[1], exc_info=True)
        return
    if wrapper is original:
        return  # the wrapper maker declined (a shape it was not written for)
    setattr(owner, method_name, wrapper)
    _installed[key] = wrapper


def _owner_or_none(module: Any, class_name: str) -> Any:
    try:
        return _owner(module, class_name)
    except AttributeError:
        return None


def patch_when_imported(module_name: str, dotted: str, make_wrapper: MakeWrapper) -> None:
    """Replace ``module_name.Class.method`` (or a module-level ``module_name.name``) by
    ``make_wrapper(original)`` now, or as soon as the module is imported. A release that lacks
    the name is left alone."""
    key = (module_name, dotted)
    _wanted[key] = make_wrapper
    module = sys.modules.get(module_name)
    if module is not None:
        _apply(module, key)
    elif key not in _hook_pending:
        # wrapt fires a hook once, on the next import; a module imported, dropped from
        # sys.modules and imported again needs a new one.
        _hook_pending.add(key)

        def on_import(mod: Any) -> None:
            _hook_pending.discard(key)
            _apply(mod, key)

        wrapt.register_post_import_hook(on_import, module_name)


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
