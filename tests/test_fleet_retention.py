"""Retention of the fleet's OpenSearch store (docs/scale.md): the settings and the schedule of
Jaeger's es-index-cleaner (built by scripts/backends.py from the Jaeger module at the pinned
release) as `run --fleet --opensearch` runs it (IndexCleaner), and a cleaner that reaches no
node. The cleaner against a real cluster, and `run --retention-days`, are checked on the fleet
of tests/test_fleet_opensearch.py, which has OpenSearch running already (one cluster start
fewer for the suite).

The cleaner deletes a daily index when its *creation date* (index.creation_date, which
OpenSearch sets and refuses to take from a client) is before 00:00 UTC of the day `days - 1`
days back; the date in the index name only selects which indices are Jaeger's.
"""

from __future__ import annotations

import sys
from datetime import datetime, timezone
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import backends  # noqa: E402
from backends_support import requires_go  # noqa: E402


def test_retention_days_setting(monkeypatch):
    monkeypatch.delenv(backends.ENV_RETENTION_DAYS, raising=False)
    assert backends.retention_days() == backends.DEFAULT_RETENTION_DAYS == 7
    monkeypatch.setenv(backends.ENV_RETENTION_DAYS, "14")
    assert backends.retention_days() == 14
    assert backends.retention_days(3) == 3  # the flag wins
    for bad in ("0", "-2", "7d"):
        monkeypatch.setenv(backends.ENV_RETENTION_DAYS, bad)
        with pytest.raises(backends.BackendError, match=backends.ENV_RETENTION_DAYS):
            backends.retention_days()


def test_the_cleaner_runs_daily_just_after_midnight_utc():
    midnight = datetime(2026, 12, 2, tzinfo=timezone.utc).timestamp()
    assert backends.next_index_cleaning(midnight) == midnight + 300  # 00:05 the same day
    assert backends.next_index_cleaning(midnight + 300) == midnight + 86400 + 300  # then the next
    assert backends.next_index_cleaning(midnight + 13 * 3600) == midnight + 86400 + 300


def test_retention_days_without_opensearch_is_refused(capsys):
    assert backends.main(["run", "--fleet", "--retention-days", "3"]) == 1
    assert "--retention-days needs --opensearch" in capsys.readouterr().err


@pytest.mark.backends
@requires_go
def test_a_cleaner_that_reaches_no_node_says_so_and_stops_at_once(tmp_path, capfd):
    """No node answering: run_index_cleaner fails naming every URL tried; IndexCleaner logs
    it, keeps `run` going, and its thread (waiting an hour to try again) stops on stop()."""
    binary = backends.ensure_built(("es_index_cleaner",))["es_index_cleaner"]
    urls = [f"http://127.0.0.1:{port}" for port in backends.free_ports(2)]
    with pytest.raises(backends.BackendError, match="failed on every node") as failed:
        backends.run_index_cleaner(binary, urls, 7, tmp_path / "cleaner.log", timeout=60)
    assert all(url in str(failed.value) for url in urls)
    cleaner = backends.IndexCleaner(binary, urls, 7, tmp_path / "cleaner.log")
    cleaner.start()
    assert "index cleaner failed, trying again in 1 h" in capfd.readouterr().err
    cleaner.stop()
    assert not cleaner._thread.is_alive()
