"""``python -m otel_stepspan.exporter --steps-fd R --status-fd W --ring-fd M --engine-pid P``: the exporter process.

Started by the engine process itself (never by hand): see :mod:`otel_stepspan.sinks.otel_process`.
It runs outside the engine's process tree (the engine starts it through a shell that exits at
once) in a session of its own, so an engine that kills its whole process tree at shutdown
(sglang's ``kill_process_tree`` walks the children of each process) leaves it running to deliver
what the ring holds; it leaves by itself once its engine is gone.
"""

import argparse
import os
import sys


def _detach() -> None:
    """A session of its own: no terminal's Ctrl-C or hang-up reaches it. (The engine starts it
    through a shell that exits at once, so it is already out of the engine's process tree.)"""
    try:
        os.setsid()
    except OSError:
        pass  # already a session leader


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m otel_stepspan.exporter", description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps-fd", type=int, required=True, help="read end of the engine's pipe (its end: the engine is gone)")
    parser.add_argument("--ring-fd", type=int, required=True, help="the shared memory the engine puts step records in")
    parser.add_argument("--status-fd", type=int, required=True, help="write end of the answers pipe")
    parser.add_argument("--engine-pid", type=int, required=True, help="the engine process to outlive")
    parser.add_argument("--no-detach", action="store_true", help="stay in the caller's session (tests)")
    args = parser.parse_args()
    if not args.no_detach:
        _detach()
    from .process import main as run

    return run(args.steps_fd, args.status_fd, args.ring_fd, args.engine_pid)


if __name__ == "__main__":
    sys.exit(main())
