"""Finding an engine's exporter process (:mod:`otel_stepspan.exporter`), for tests and benchmarks.

The exporter runs outside the engine's process tree, so it is found by its command line, which
names the engine's pid.
"""

from __future__ import annotations

import os
import subprocess
import time


def exporter_pids(engine_pid: int) -> list[int]:
    """The pids of the exporter processes started by process ``engine_pid`` (Linux: /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as handle:
                argv = handle.read().split(b"\0")
        except OSError:
            continue
        if b"otel_stepspan.exporter" in argv and str(engine_pid).encode() in argv:
            found.append(int(entry))
    return found


def read_until(process: subprocess.Popen, prefix: str, timeout_s: float = 60) -> str:
    """The first line of ``process``'s stdout that starts with ``prefix`` (a test program saying
    where it is). Fails, with the program's stderr when it died and it was captured, when no such
    line comes within ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if line.startswith(prefix):
            return line
        if not line and process.poll() is not None:
            break
    died = process.stderr.read()[-3000:] if process.stderr is not None and process.poll() is not None else ""
    raise AssertionError(f"never printed {prefix!r}" + (f": {died}" if died else ""))
