"""Finding an engine's exporter process (:mod:`otel_stepspan.exporter`), for tests and benchmarks.

The exporter runs outside the engine's process tree, so it is found by its command line, which
names the engine's pid.
"""

from __future__ import annotations

import os


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
