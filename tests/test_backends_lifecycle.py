"""What scripts/backends.py leaves behind when whoever started a backend is killed: nothing.

A test run, a benchmark or a user's script holding a LocalBackends or LocalFleet can be killed
without running its clean-up (SIGKILL, a CI timeout's SIGTERM that nothing catches); its JVMs
and collectors must not go on running for nobody. No Go or Java needed: the backend here is a
plain sleeping Python process started the way every backend is (backends._start).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"

OWNER = """
import sys, time
sys.path.insert(0, sys.argv[1])
import backends
sleeper = backends._start([sys.executable, "-c", "import time; time.sleep(600)"], backends.Path(sys.argv[2]),
                          None, 10, ready=lambda proc, offset: None)
print(sleeper.pid, flush=True)
time.sleep(600)
"""


def _running(pid: int) -> bool:
    """The process exists and is not a zombie waiting to be reaped."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="no setpriv (util-linux) to tie a backend to its owner")
@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM])
def test_a_backend_ends_when_the_process_that_started_it_is_killed(tmp_path, how):
    owner = subprocess.Popen([sys.executable, "-c", OWNER, str(SCRIPTS), str(tmp_path / "sleeper.log")],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    sleeper = 0
    try:
        sleeper = int(owner.stdout.readline())
        assert _running(sleeper)
        owner.send_signal(how)  # no handler: the owner's clean-up never runs
        owner.wait(timeout=30)
        deadline = time.monotonic() + 15
        while _running(sleeper) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _running(sleeper), f"the backend {sleeper} outlived its owner (killed by {how.name})"
    finally:
        owner.kill()
        if sleeper and _running(sleeper):
            os.kill(sleeper, signal.SIGKILL)
