"""``python -m otel_stepspan.exporter --steps-fd R --status-fd W --engine-pid P``: the exporter process.

Started by the engine process itself (never by hand): see :mod:`otel_stepspan.sinks.otel_process`.
The first thing it does, before any import that starts threads, is to detach from the engine's
process tree: it forks, the parent exits at once (the engine reaps it), and the child starts a
session of its own. An engine that kills its whole process tree at shutdown (sglang's
``kill_process_tree`` walks the children of each process) then leaves the exporter running to
deliver what the pipe holds; the exporter leaves by itself once its engine is gone.
"""

import argparse
import os
import sys


def _detach() -> None:
    if os.fork() != 0:
        os._exit(0)
    os.setsid()


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m otel_stepspan.exporter", description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps-fd", type=int, required=True, help="read end of the step pipe")
    parser.add_argument("--status-fd", type=int, required=True, help="write end of the answers pipe")
    parser.add_argument("--engine-pid", type=int, required=True, help="the engine process to outlive")
    parser.add_argument("--no-detach", action="store_true", help="stay in the engine's process tree (tests)")
    args = parser.parse_args()
    if not args.no_detach:
        _detach()
    from .process import main as run

    return run(args.steps_fd, args.status_fd, args.engine_pid)


if __name__ == "__main__":
    sys.exit(main())
