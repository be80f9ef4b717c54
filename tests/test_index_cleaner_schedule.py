"""jaeger/index-cleaner.sh's schedule (the compose fleet's retention, docs/scale.md): when it
runs the cleaner and how long it sleeps, with the clock, `sleep` and the cleaner stood in for.

The real service runs the script under busybox's sh in its image, where `date` and `sleep`
are busybox's own applets and cannot be stood in for on PATH; here it runs under the host's
POSIX sh with stand-ins first on PATH. What is checked is the script's own logic:

- after each run it sleeps until the next 00:05 UTC: from 10:00 that is 14 h 5 min; from
  00:04:59, 1 s; at 00:05:00 exactly, a whole day (not 0, which would run twice);
- a run the first node fails and the second takes is a success (the first failure logged);
- a run every node fails is tried again an hour later, or at 00:05 if that comes sooner;
- each run logs what the cleaner deleted; SIGTERM during a sleep ends it with status 0.

tests/test_compose_fleet.py runs the real image once (its start, its refusals);
tests/test_fleet_retention.py the cleaner itself against OpenSearch.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from datetime import datetime, timezone
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "jaeger" / "index-cleaner.sh"
SH = shutil.which("sh")


def _epoch(text: str) -> int:
    return int(datetime.strptime(text, "%Y-%m-%d %H:%M:%S").replace(tzinfo=timezone.utc).timestamp())


def _stand_in(path: Path, body: str) -> None:
    path.write_text(f"#!{SH}\n{body}")
    path.chmod(0o755)


def _pop(queue: Path) -> str:
    """Shell that prints the first line of ``queue`` and removes it."""
    return f'first=$(head -n 1 "{queue}"); sed -i 1d "{queue}"; '


@pytest.mark.skipif(SH is None, reason="no POSIX sh")
def test_the_cleaner_runs_at_start_then_daily_at_0005_utc_and_retries_hourly(tmp_path):
    bin_dir, state = tmp_path / "bin", tmp_path / "state"
    bin_dir.mkdir()
    state.mkdir()
    clock, outcomes, slept, calls = tmp_path / "clock", tmp_path / "outcomes", tmp_path / "slept", tmp_path / "calls"
    # What `date -u +%s` answers at the end of each run, one line per run.
    nows = ["2026-12-03 10:00:00", "2026-12-04 00:04:59", "2026-12-04 00:05:00",
            "2026-12-05 10:00:00", "2026-12-05 23:30:00"]
    clock.write_text("".join(f"{_epoch(now)}\n" for now in nows))
    # The cleaner's exit status, one line per call: runs 1-2 on the first node; run 3 the
    # first node fails and the second takes it; runs 4-5 both fail.
    outcomes.write_text("0\n0\n1\n0\n1\n1\n1\n1\n")
    _stand_in(bin_dir / "date", f'[ "$*" = "-u +%s" ] || exit 9\n{_pop(clock)}echo "$first"\n')
    _stand_in(bin_dir / "es-index-cleaner", f'echo "$1 $2" >>"{calls}"\n{_pop(outcomes)}'
              '[ "$first" = 0 ] || { echo "connection refused"; exit 1; }\n'
              'echo \'{"level":"info","msg":"Deleting indices","indices":[{"Index":"jaeger-span-2026-11-20"}]}\'\n')
    # The fifth sleep stops the script as `docker compose down` does.
    _stand_in(bin_dir / "sleep", f'echo "$1" >>"{slept}"\n'
              f'[ "$(wc -l <"{slept}")" -lt {len(nows)} ] || kill -TERM "$PPID"\n')
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "TMPDIR": str(state),
           "STEPSPAN_INDEX_CLEANER": str(bin_dir / "es-index-cleaner"), "STEPSPAN_RETENTION_DAYS": "3",
           "STEPSPAN_OPENSEARCH_URLS": "[http://os1:9200, http://os2:9201]"}
    done = subprocess.run([SH, str(SCRIPT)], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    day = 24 * 3600
    assert [int(line) for line in slept.read_text().split()] == [14 * 3600 + 5 * 60, 1, day, 3600, 35 * 60]
    assert calls.read_text().splitlines() == ["3 http://os1:9200", "3 http://os1:9200", "3 http://os1:9200",
                                              "3 http://os2:9201", *["3 http://os1:9200", "3 http://os2:9201"] * 2]
    out = done.stdout.splitlines()
    deleted = [line for line in out if line.startswith("index cleaner (keeps")]
    assert deleted == ["index cleaner (keeps 3 days, http://os1:9200): deleted 1 indices: jaeger-span-2026-11-20"] * 2 + [
        "index cleaner (keeps 3 days, http://os2:9201): deleted 1 indices: jaeger-span-2026-11-20"]
    assert sum("http://os1:9200 failed (exit 1): connection refused" in line for line in out) == 3
    assert sum("failed on every node, trying again in at most 1 h" in line for line in out) == 2
    assert (state / "index-cleaner.settings").read_text() == "accepted\n"
