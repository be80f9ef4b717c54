"""A parent that steps, then starts workers with fork or spawn that step with their own rank.

    python forking.py fork|spawn WORKERS STEPS
"""

import multiprocessing
import os
import sys

from otel_stepspan import StepInfo, engine_attributes, step_span


def run(rank: int, steps: int) -> None:
    attributes = engine_attributes("forking-test", tp_rank=rank)
    for i in range(steps):
        with step_span(StepInfo("decode", 1000 * rank + i), attributes=attributes):
            pass


def worker(rank: int, steps: int) -> None:
    run(rank, steps)


if __name__ == "__main__":
    method, workers, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    run(0, steps)  # the parent's spans are still queued when it forks
    context = multiprocessing.get_context(method)
    processes = [context.Process(target=worker, args=(rank, steps)) for rank in range(1, workers + 1)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(120)
    print("exit codes", [p.exitcode for p in processes], "parent", os.getpid(), flush=True)
