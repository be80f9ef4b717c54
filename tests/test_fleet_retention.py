"""Retention of the fleet's OpenSearch store (docs/scale.md), for real: Jaeger's own
es-index-cleaner (built by scripts/backends.py from the Jaeger module at the pinned release),
run the way `run --fleet --opensearch` runs it (IndexCleaner), against the three-node OpenSearch
2.19 cluster holding Jaeger's daily indices (jaeger/opensearch.yaml).

The cleaner deletes a daily index when its *creation date* (index.creation_date, which
OpenSearch sets and refuses to take from a client) is before 00:00 UTC of the day `days - 1`
days back; the date in the index name only selects which indices are Jaeger's. Every index a
test makes is made today, so no test here can hold a genuinely old index: what is checked is

1. LocalFleet with retention_days=7 runs the cleaner at start (it logs "deleted 0 indices"),
   and again on demand (what its daily thread runs) with today's real steps stored and indices
   planted under names 10 and 3 days back, as Jaeger names them: the cutoff the cleaner
   computed is 00:00 UTC six days back (its own log line), nothing made today is deleted, and
   every step of today is still found through Jaeger's HTTP API.
2. The same cleaner with 0 days (cutoff: tomorrow, as Jaeger's own integration test runs it)
   deletes exactly the indices of Jaeger's daily layout, today's real ones and the planted
   ones, and keeps an index outside that layout; Jaeger's search then finds none of the steps.
   So the listing, the name filter for "2006-01-02" and the DELETE work against OpenSearch
   2.19, and the test fails if the cleaner does nothing.
3. `python scripts/backends.py run --fleet --opensearch --retention-days 5` as a user runs it:
   it prints the retention, runs the cleaner at start (its log line; the cutoff 00:00 UTC four
   days back in the cleaner's log), and SIGTERM still stops everything (exit 0, ports free).

About three minutes once built (`python scripts/backends.py build --fleet`). Skips where Go or
Java is absent; CI (OTEL_STEPSPAN_REQUIRE_BACKENDS=1) turns those skips into failures.
"""

from __future__ import annotations

import re
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import backends  # noqa: E402
from backends_support import (  # noqa: E402
    EngineRun, assert_all_stored, cleaner_cutoffs, expected_cutoff, opensearch_request, requires_go,
    requires_opensearch, sigterm, start_run, stored,
)

RATE = 100.0  # steps per second
ENGINE_ENV = {"OTEL_STEPSPAN_TIMELINE_SECONDS": "2"}
KEEP_DAYS = 7
needs_all = [pytest.mark.backends, requires_go, requires_opensearch]


def _mark(test):
    """The marks of a test on the real tier: skipped without Go or Java (failed in CI)."""
    for mark in needs_all:
        test = mark(test)
    return test


def _day(days_back: int) -> str:
    return (datetime.now(timezone.utc) - timedelta(days=days_back)).strftime("%Y-%m-%d")


def plant_day(url: str, days_back: int) -> list[str]:
    """The span and service indices named for the day ``days_back`` days ago, as Jaeger names
    them (its index templates apply), one document each: their names."""
    stamp = _day(days_back)
    micros = int((datetime.now(timezone.utc) - timedelta(days=days_back)).timestamp() * 10**6)
    documents = {
        f"jaeger-span-{stamp}": {"traceID": f"{days_back + 1:032x}", "spanID": f"{days_back + 1:016x}",
                                 "operationName": "old-step", "startTime": micros,
                                 "startTimeMillis": micros // 1000, "duration": 1000,
                                 "process": {"serviceName": "retention-old"}},
        f"jaeger-service-{stamp}": {"serviceName": "retention-old", "operationName": "old-step"},
    }
    for index, document in documents.items():
        opensearch_request("POST", f"{url}/{index}/_doc?refresh=true", document)
    return sorted(documents)


def jaeger_indices(url: str) -> set[str]:
    return {i["index"] for i in opensearch_request("GET", f"{url}/_cat/indices/jaeger-*?format=json")}


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


@_mark
def test_the_cleaner_keeps_the_retention_and_deletes_jaegers_daily_indices(tmp_path, capfd):
    policies = {"STEPSPAN_KEEP_PERCENT": "100", "STEPSPAN_DECISION_WAIT": "5s"}
    with backends.LocalFleet(tmp_path, opensearch=True, retention_days=KEEP_DAYS, collector_env=policies) as fleet:
        assert fleet.index_cleaner is not None
        assert f"index cleaner (keeps {KEEP_DAYS} days): deleted 0 indices" in capfd.readouterr().err  # at start
        url = fleet.opensearch_urls[0]
        run = EngineRun.start(fleet.otlp_grpc_endpoint, "retention", 4, RATE, **ENGINE_ENV).finish()
        assert_all_stored(fleet, run)
        today = {f"jaeger-span-{_day(0)}", f"jaeger-service-{_day(0)}"}
        planted = plant_day(url, 10) + plant_day(url, 3)
        opensearch_request("PUT", f"{url}/jaeger-span-archive")  # Jaeger's archive index: not a daily one
        before = jaeger_indices(url)
        assert today | set(planted) | {"jaeger-span-archive"} <= before, sorted(before)

        assert fleet.index_cleaner.run_once()  # what the daily thread runs
        log = (tmp_path / "es-index-cleaner.log").read_text()
        assert cleaner_cutoffs(log) == [expected_cutoff(KEEP_DAYS)] * 2, log[-2000:]
        assert jaeger_indices(url) == before  # all made today, whatever their name
        assert f"index cleaner (keeps {KEEP_DAYS} days): deleted 0 indices" in capfd.readouterr().err
        assert_all_stored(fleet, run)  # today's steps, through Jaeger's HTTP API

        deleted = backends.run_index_cleaner(fleet.binaries["es_index_cleaner"], fleet.opensearch_urls, 0,
                                             tmp_path / "es-index-cleaner.log")
        assert sorted(deleted) == sorted(today | set(planted))
        assert jaeger_indices(url) == {"jaeger-span-archive"}
        assert stored(fleet.jaeger_url, run.service, run.started_ns, 2000).unique == 0


@_mark
def test_run_cleans_at_start_and_stops_on_sigterm(tmp_path):
    ports = backends.free_ports(5)
    proc, text = start_run(tmp_path, ports, "--opensearch", "--retention-days", "5")
    try:
        assert "the last 5 days kept" in text, text
        nodes = re.findall(r"http://127\.0\.0\.1:(\d+)", next(line for line in text.splitlines()
                                                            if line.startswith("OpenSearch ")))
        assert len(nodes) == 3, text
        log = (tmp_path / "run.stderr").read_text()
        assert "index cleaner (keeps 5 days): deleted 0 indices" in log, log[-3000:]
        assert cleaner_cutoffs((tmp_path / "es-index-cleaner.log").read_text()) == [expected_cutoff(5)]
    finally:
        status = sigterm(proc)
    assert status == 0
    backends._check_free(ports)
    backends._check_free([int(port) for port in nodes])  # every node gone
