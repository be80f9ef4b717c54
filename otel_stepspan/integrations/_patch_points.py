"""The places an integration patches in an engine, and whether a release still has them.

An engine release can rename a class, drop a method or change its parameters. The wrapper then
has nothing to patch, or would read the wrong argument as the batch; either way the user gets
no steps for that part of the engine. Each :class:`PatchPoint` says what it needs (its target,
the leading parameters the wrapper reads) and what the user loses without it, so that the
same check can run in two places:

- when the engine's module is imported (:func:`problem_in_module`, on the loaded class), where
  a problem becomes one WARNING line (see ``_instrumentor``);
- in ``otel-stepspan doctor`` and the version-range tests, on a release that may not import on
  this machine: :func:`problem_in_source` reads the module's source instead (the class, the
  method and its parameters), so a GPU build can be checked without its GPU.
"""

from __future__ import annotations

import ast
import inspect
from typing import Any, Callable, NamedTuple, Optional, Sequence

from packaging.version import InvalidVersion, Version

MakeWrapper = Callable[[Callable[..., Any]], Callable[..., Any]]


class PatchPoint(NamedTuple):
    #: The module the target lives in, e.g. ``"sglang.srt.model_executor.model_runner"``.
    module: str
    #: ``"Class.method"``, or a module-level name.
    target: str
    #: Makes the wrapper from the original; returns the original to decline a shape it was not
    #: written for.
    make: MakeWrapper
    #: What a user loses when the target is missing or declined, in their words.
    loses: str
    #: The parameters the wrapper reads, in order, from the first (``self`` included); empty
    #: when it passes every argument through unread.
    params: tuple[str, ...] = ()
    #: The first release that has the target; older releases lacking it are not a problem.
    since: str = ""
    #: True when the target sits in a module that only some releases or builds ship (a
    #: speculative-decoding runner): a missing module is not a problem, a module without the
    #: target still is.
    optional_module: bool = False

    @property
    def where(self) -> str:
        return f"{self.module}.{self.target}"


_STARS = {inspect.Parameter.VAR_POSITIONAL: "*", inspect.Parameter.VAR_KEYWORD: "**"}


def _resolve(module: Any, dotted: str) -> Any:
    owner = module
    for part in dotted.split("."):
        owner = getattr(owner, part, None)
        if owner is None:
            return None
    return owner


def predates(point: PatchPoint, versions: Sequence[str]) -> bool:
    """True when an installed release (``versions``) is older than the first one with the
    target: its absence there is expected, not drift."""
    try:
        return bool(point.since) and any(Version(v) < Version(point.since) for v in versions)
    except InvalidVersion:
        return False


def _shape_problem(names: list[str], params: tuple[str, ...]) -> Optional[str]:
    if list(names[: len(params)]) == list(params):
        return None
    return f"takes ({', '.join(names)}) where the wrapper reads ({', '.join(params)}, ...)"


def problem_in_module(point: PatchPoint, module: Any) -> Optional[str]:
    """What is wrong with ``point`` in the imported ``module``: None when the target is there
    with the parameters the wrapper reads."""
    target = _resolve(module, point.target)
    if target is None:
        return "is missing"
    if not point.params:
        return None
    try:
        # The original under a wrapper of ours; a classmethod comes bound, without ``cls``.
        parameters = inspect.signature(inspect.unwrap(target), follow_wrapped=False).parameters.values()
        names = [_STARS.get(p.kind, "") + p.name for p in parameters]
    except (TypeError, ValueError):
        return "has no signature to check"
    return _shape_problem(names, point.params)


def problem_in_source(point: PatchPoint, source: str) -> Optional[str]:
    """The same check as :func:`problem_in_module`, made on the module's source text: for a
    release whose modules cannot be imported here (a GPU build's own torch, a missing CUDA)."""
    try:
        tree = ast.parse(source)
    except SyntaxError as exc:
        return f"cannot be read: {exc}"
    class_name, _, name = point.target.rpartition(".")
    body: list[ast.stmt] = tree.body
    for part in filter(None, class_name.split(".")):
        found = next((n for n in body if isinstance(n, ast.ClassDef) and n.name == part), None)
        if found is None:
            return "is missing"
        body = found.body
    function = next(
        (n for n in body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name == name), None
    )
    if function is None:
        return None if not class_name and _binds_name(body, name) else "is missing"
    if not point.params:
        return None
    arguments = function.args
    names = [a.arg for a in arguments.posonlyargs + arguments.args]
    names += ["*" + arguments.vararg.arg] if arguments.vararg else []
    names += [a.arg for a in arguments.kwonlyargs]
    names += ["**" + arguments.kwarg.arg] if arguments.kwarg else []
    if any(isinstance(d, ast.Name) and d.id == "classmethod" for d in function.decorator_list):
        names = names[1:]  # bound to the class when called, as the loaded check sees it
    return _shape_problem(names, point.params)


def _binds_name(body: list[ast.stmt], name: str) -> bool:
    """True when a module's top level binds ``name`` other than by ``def``: an import or an
    assignment (sglang imports ``profile_range`` into the runner's module)."""
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            if any((alias.asname or alias.name.split(".")[0]) == name for alias in node.names):
                return True
        elif isinstance(node, ast.Assign):
            if any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
                return True
        elif isinstance(node, (ast.If, ast.Try)):
            inner = list(node.body) + list(getattr(node, "orelse", [])) + [
                stmt for handler in getattr(node, "handlers", []) for stmt in handler.body
            ]
            if _binds_name(inner, name):
                return True
    return False
