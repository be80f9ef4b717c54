"""``otel-stepspan run -- CMD ...``: run an engine command with step spans, no code change.

The command, and every Python process it starts (sglang's scheduler and detokenizer processes,
vLLM's engine core, spawned or forked), imports ``sitecustomize`` at start-up. ``run`` puts
``otel_stepspan/cli/_bootstrap`` first on ``PYTHONPATH``, so that import finds ours; it installs
the engine instrumentors and then chains to whatever ``sitecustomize`` Python would have found
otherwise (see ``_bootstrap/sitecustomize.py``). Export is configured the usual way, by the
standard ``OTEL_*`` variables, which the processes inherit.

By default ``run`` then *becomes* the command (``exec``): the exit status, and every signal sent
to the process (Ctrl-C, ``kill``, a supervisor's SIGTERM), are the command's own, with no extra
process in between. ``--no-exec`` keeps ``otel-stepspan`` as the parent instead: it forwards
SIGINT, SIGTERM and SIGHUP to the command and exits with its status (or dies of the same signal).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shlex
import signal
import subprocess
import sys
from typing import Mapping, MutableMapping, Optional, Sequence

from ..integrations._instrumentor import BOOTSTRAP_DIR, pythonpath_with_bootstrap  # noqa: F401 (re-exported)
from ..settings import exporters_requested

#: (name shown to the user, module that provides the instrumentor)
INTEGRATIONS = (
    ("sglang", "otel_stepspan.integrations.sglang"),
    ("vllm", "otel_stepspan.integrations.vllm"),
)

_FORWARDED = tuple(
    getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name)
)


def child_environment(
    environ: Mapping[str, str],
    *,
    service_name: Optional[str] = None,
    endpoint: Optional[str] = None,
) -> dict[str, str]:
    """The command's environment: ours, with the bootstrap directory first on ``PYTHONPATH``."""
    env = dict(environ)
    env["PYTHONPATH"] = pythonpath_with_bootstrap(env.get("PYTHONPATH"))
    if service_name:
        env["OTEL_SERVICE_NAME"] = service_name
    if endpoint:
        env["OTEL_EXPORTER_OTLP_ENDPOINT"] = endpoint
    return env


def available_integrations() -> list[str]:
    names = []
    for name, module in INTEGRATIONS:
        try:
            if importlib.util.find_spec(module) is not None:
                names.append(name)
        except (ImportError, ValueError):
            continue
    return names


def describe_export(env: Mapping[str, str]) -> str:
    """Where the step spans will go, in the words of the variables that decide it."""
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return "OTEL_SDK_DISABLED=true: no spans (torch profiler labels only)"
    exporters = [name for name in exporters_requested(env) if name != "none"]
    if not exporters:
        return (
            "no OTEL_EXPORTER_OTLP_ENDPOINT or OTEL_TRACES_EXPORTER set: spans only if the engine "
            "sets its own tracer provider (torch profiler labels work regardless)"
        )
    parts = []
    for name in exporters:
        if name == "otlp":
            endpoint = (
                env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
                or env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
                or "the default endpoint"
            )
            parts.append(f"otlp to {endpoint}")
        else:
            parts.append(name)
    service = env.get("OTEL_SERVICE_NAME")
    return "export: " + ", ".join(parts) + (f" as service {service!r}" if service else "")


def note(command: Sequence[str], env: Mapping[str, str]) -> str:
    integrations = ", ".join(available_integrations()) or "none"
    shown = shlex.join(command)
    if len(shown) > 60:
        shown = shown[:57] + "..."
    return (
        f"otel-stepspan run: step spans for {integrations} in `{shown}` and every Python process "
        f"it starts; {describe_export(env)}"
    )


def command_of(args: argparse.Namespace) -> list[str]:
    command = list(args.cmd or [])
    if command and command[0] == "--":
        command = command[1:]
    return command


def run(args: argparse.Namespace) -> int:
    command = command_of(args)
    if not command:
        print("otel-stepspan run: no command given; usage: otel-stepspan run -- python -m ...", file=sys.stderr)
        return 2
    env = child_environment(os.environ, service_name=args.service_name, endpoint=args.endpoint)
    if not args.quiet:
        print(note(command, env), file=sys.stderr, flush=True)
    if args.no_exec or os.name != "posix":
        return spawn_and_wait(command, env)
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execvpe(command[0], command, env)
    except (FileNotFoundError, PermissionError) as exc:
        return _cannot_start(command, exc)
    return 0  # pragma: no cover - exec does not return


def _cannot_start(command: Sequence[str], exc: OSError) -> int:
    """Say why the command could not start; the shell's status for it (127 missing, 126 denied)."""
    if isinstance(exc, FileNotFoundError):
        print(f"otel-stepspan run: command not found: {command[0]}", file=sys.stderr)
        return 127
    print(f"otel-stepspan run: permission denied: {command[0]}", file=sys.stderr)
    return 126


def spawn_and_wait(command: Sequence[str], env: MutableMapping[str, str]) -> int:
    """Run the command as a child, forward SIGINT/SIGTERM/SIGHUP to it, return its status.

    A child killed by a signal makes us die of the same signal (after restoring its default
    action), so a shell or supervisor sees exactly what it would have seen without us; where that
    is impossible, the shell convention 128 + signal number is returned.
    """
    try:
        child = subprocess.Popen(list(command), env=dict(env))
    except (FileNotFoundError, PermissionError) as exc:
        return _cannot_start(command, exc)

    def forward(signum: int, _frame: object) -> None:
        try:
            child.send_signal(signum)
        except (ProcessLookupError, OSError):
            pass

    previous = {}
    for sig in _FORWARDED:
        try:
            previous[sig] = signal.signal(sig, forward)
        except (ValueError, OSError):  # not the main thread, or not allowed here
            continue
    try:
        status = child.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if status < 0:
        signum = -status
        try:
            signal.signal(signum, signal.SIG_DFL)
        except (ValueError, OSError):
            pass  # SIGKILL and SIGSTOP cannot be caught anyway
        try:
            os.kill(os.getpid(), signum)
        except (ValueError, OSError):
            pass
        return 128 + signum
    return status
