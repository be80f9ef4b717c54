"""`backends.py run` keeps its stack up: a backend that ends is started again on its ports and
state, named with why it ended and its log, and one that keeps ending is given up on. Here with
stand-in processes; tests/test_fleet_run.py kills a real gateway under `run --fleet`."""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import backends  # noqa: E402


class Proc:
    """A stand-in process: ``poll()`` gives ``code`` (None while it runs)."""

    def __init__(self, name: str, code: int | None = None) -> None:
        self.code = code
        self.log_path = Path(f"/logs/{name}.log")

    def poll(self) -> int | None:
        return self.code


class Stack:
    """A stand-in stack of two backends; ``fail_starts`` starts that raise before one works."""

    def __init__(self, fail_starts: int = 0) -> None:
        self.procs = {"gateway-2": Proc("gateway-2"), "Jaeger": Proc("Jaeger")}
        self.starts: list[str] = []
        self.fail_starts = fail_starts

    def components(self) -> list[backends.Component]:
        return [backends.Component(name, proc, functools.partial(self.start, name)) for name, proc in self.procs.items()]

    def start(self, name: str) -> None:
        self.starts.append(name)
        if self.fail_starts:
            self.fail_starts -= 1
            raise backends.BackendError("port 4317 is already in use")
        self.procs[name] = Proc(name)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_nothing_ended_nothing_is_started():
    stack = Stack()
    assert backends.Supervisor(stack).check() == []
    assert stack.starts == []


def test_a_killed_backend_is_started_again_once_and_named_with_its_log(capsys):
    stack = Stack()
    supervisor = backends.Supervisor(stack)
    stack.procs["gateway-2"].code = -9
    said = supervisor.check()
    assert said == ["gateway-2 ended (killed by SIGKILL); starting it again (log: /logs/gateway-2.log)"]
    assert said[0] in capsys.readouterr().err
    assert stack.starts == ["gateway-2"]
    assert supervisor.check() == [] and stack.starts == ["gateway-2"]  # the new one runs
    stack.procs["Jaeger"].code = 1
    assert supervisor.check() == ["Jaeger ended (exit code 1); starting it again (log: /logs/Jaeger.log)"]


def test_one_that_keeps_ending_is_given_up_on_naming_it():
    stack, clock = Stack(), Clock()
    supervisor = backends.Supervisor(stack, limit=2, window_s=60, clock=clock)
    for _ in range(2):
        stack.procs["gateway-2"].code = 2
        supervisor.check()
        clock.now += 10
    stack.procs["gateway-2"].code = 2
    with pytest.raises(backends.BackendError, match=r"gateway-2 ended 3 times in 60 s, the last with exit code 2; "
                                                    r"not started again \(log: /logs/gateway-2\.log\)"):
        supervisor.check()
    assert stack.starts == ["gateway-2"] * 2


def test_ends_further_apart_than_the_window_never_add_up():
    stack, clock = Stack(), Clock()
    supervisor = backends.Supervisor(stack, limit=2, window_s=60, clock=clock)
    for _ in range(6):
        stack.procs["gateway-2"].code = -15
        supervisor.check()
        clock.now += 31  # at most two ends within any 60 s
    assert stack.starts == ["gateway-2"] * 6


def test_a_start_that_fails_is_said_and_tried_again_at_the_next_check():
    stack = Stack(fail_starts=1)
    supervisor = backends.Supervisor(stack)
    stack.procs["Jaeger"].code = -9
    said = supervisor.check()
    assert said[1] == "Jaeger did not start again: port 4317 is already in use"
    said = supervisor.check()  # the dead one is still there: ended again, started again
    assert said == ["Jaeger ended (killed by SIGKILL); starting it again (log: /logs/Jaeger.log)"]
    assert stack.starts == ["Jaeger", "Jaeger"] and stack.procs["Jaeger"].poll() is None
